"""Reading one HipMRI slice and fitting it to the network's size (and back).

Slices are mostly (256, 128), some (256, 144), some stored with a trailing singleton axis
(256, 128, 1); masks are stored as floats (5.0, 0.99998) and are rounded to class indices.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# A stored mask value further than this from an integer is not a class label (corrupt file).
MASK_TOLERANCE = 0.1


def plane_shape(shape: tuple[int, ...], path: Path | str) -> tuple[int, int]:
    """(H, W) of a stored slice shape (H, W) or (H, W, 1); ValueError naming ``path`` otherwise."""
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        return int(shape[0]), int(shape[1])
    raise ValueError(f"{path}: expected a 2-D slice (H, W) or (H, W, 1), got shape {shape}")


def _pixels(path: Path | str) -> np.ndarray:
    """(H, W) float32 pixels of a slice file; a truncated or unreadable file is a ValueError naming it."""
    try:
        img = nib.load(str(path))
        h, w = plane_shape(img.shape, path)
        return np.asarray(img.dataobj, dtype=np.float32).reshape(h, w)
    except (OSError, EOFError, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(f"{path}: unreadable NIfTI slice ({err})") from err


def read_image(path: Path | str) -> np.ndarray:
    """(H, W) float32 raw MR intensities (unnormalised) of a slice file."""
    return _pixels(path)


def read_mask(path: Path | str, n_classes: int) -> np.ndarray:
    """(H, W) uint8 class indices of a float mask file (values rounded to the nearest class)."""
    raw = _pixels(path)
    labels = np.rint(raw)
    off = np.abs(raw - labels)
    if off.max(initial=0) > MASK_TOLERANCE:
        worst = float(raw.flat[int(off.argmax())])
        raise ValueError(f"{path}: mask values are not class indices (e.g. {worst})")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= n_classes:
        raise ValueError(
            f"{path}: mask values {labels.min():.0f}..{labels.max():.0f} outside 0..{n_classes - 1}"
        )
    return labels.astype(np.uint8)


def normalise(img: np.ndarray) -> np.ndarray:
    """Per-slice z-score, (H, W) float32: MR intensities have no absolute scale across patients."""
    std = float(img.std())
    return ((img - img.mean()) / max(std, 1e-6)).astype(np.float32)


def _windows(orig: int, size: int) -> tuple[slice, slice]:
    """(source slice in the original axis, destination slice in the fitted axis), centred."""
    if orig >= size:  # crop
        start = (orig - size) // 2
        return slice(start, start + size), slice(0, size)
    start = (size - orig) // 2  # pad
    return slice(0, orig), slice(start, start + orig)


def fit(arr: np.ndarray, size: tuple[int, int], fill: float) -> np.ndarray:
    """Centre-crop or pad (with ``fill``) the first two axes of ``arr`` to ``size`` (H, W)."""
    (s0, d0), (s1, d1) = _windows(arr.shape[0], size[0]), _windows(arr.shape[1], size[1])
    out = np.full((*size, *arr.shape[2:]), fill, dtype=arr.dtype)
    out[d0, d1] = arr[s0, s1]
    return out


def unfit(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`fit` for a prediction: (h, w, ...) -> ``shape`` (H, W, ...).

    Rows/columns that ``fit`` cropped away were never seen by the network and come back as 0
    (background); padding is cut off again.
    """
    (s0, d0), (s1, d1) = _windows(shape[0], arr.shape[0]), _windows(shape[1], arr.shape[1])
    out = np.zeros((*shape, *arr.shape[2:]), dtype=arr.dtype)
    out[s0, s1] = arr[d0, d1]
    return out
