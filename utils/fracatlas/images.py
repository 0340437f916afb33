"""FracAtlas pixels: tolerant JPEG decoding, COCO polygon rasterisation, aspect-preserving resize."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from pycocotools import mask as coco_mask

OK, TRUNCATED, UNREADABLE = "ok", "truncated_recovered", "unreadable"


class UnreadableImage(ValueError):
    """An image file that cannot be decoded, not even partially."""


@contextlib.contextmanager
def _lenient_decoding() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def read_gray(path: str | Path) -> tuple[np.ndarray, str]:
    """(H, W) uint8 luma of an image file (RGB JPEGs of grayscale X-rays included) and its status.

    Status ``ok``, or ``truncated_recovered`` when the file is cut short and PIL decodes what is
    there (the missing rows come out grey). A file that cannot be decoded at all raises
    :class:`UnreadableImage`.
    """
    try:
        return _decode(Path(path)), OK
    except (OSError, UnidentifiedImageError, SyntaxError) as strict_err:
        try:
            with _lenient_decoding():
                return _decode(Path(path)), TRUNCATED
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise UnreadableImage(f"{path}: {strict_err}; {err}") from None


def rasterise(segmentations: Sequence, height: int, width: int) -> np.ndarray:
    """Union of every instance's segmentation as one (height, width) uint8 mask of 0/1.

    ``segmentations``: one COCO ``segmentation`` per instance (a list of polygons
    ``[x1, y1, x2, y2, ...]`` in pixel coordinates of the original image, or an RLE dict),
    rasterised by pycocotools at the image's own size. Polygons with fewer than 3 points are
    ignored (COCO cannot fill them).
    """
    rles = []
    for seg in segmentations:
        if isinstance(seg, dict):
            rles.extend(
                coco_mask.frPyObjects([seg], height, width)
                if isinstance(seg.get("counts"), list)
                else [seg]
            )
            continue
        polygons = [list(map(float, p)) for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if polygons:
            rles.extend(coco_mask.frPyObjects(polygons, height, width))
    if not rles:
        return np.zeros((height, width), np.uint8)
    return coco_mask.decode(coco_mask.merge(rles)).astype(np.uint8)


def fitted_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(H, W) scaled so the longer side is ``max_side`` px (aspect kept); unchanged for None or smaller."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_pair(
    image: np.ndarray, mask: np.ndarray, max_side: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W) uint8 and mask (H, W) 0/1 resized identically (aspect kept, see :func:`fitted_size`).

    Both go through area interpolation; the mask is the pixels at least half covered by the
    fracture, so a pixel of the resized mask sits where the resized image shows the fracture.
    """
    h, w = fitted_size(*image.shape, max_side)
    if (h, w) == image.shape:
        return image, mask
    small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    cover = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return small, (cover >= 0.5).astype(np.uint8)


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W[, C]) -> (size, size[, C]): aspect-preserving resize of the longer side to ``size``,
    zero padding at the bottom / right (X-ray background is dark)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.zeros((size, size, *image.shape[2:]), image.dtype)
    out[:nh, :nw] = resized.reshape(nh, nw, *image.shape[2:])
    return out
