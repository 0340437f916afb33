"""Synthetic FracAtlas in the download's layout: ``python -m utils.fracatlas.synthetic --out DIR [--preset tiny|demo|check]``.

Bright bone shapes (capsules with a marrow core) over soft tissue, with body-part-specific
arrangements; fractured images carry 1-3 thin jagged breaks across a bone, each annotated by one
COCO polygon in original pixel coordinates (a band around the break). What keeps both tasks from
saturating: breaks range from clear to barely above the noise, partial breaks stop inside the
bone, and every image may carry look-alikes that are not fractures (straight growth lines across
a bone, joint gaps between bone segments, bright hardware). Images are grayscale content saved
as 3-channel JPEG in real sizes (portrait / landscape near 454x373, a few narrow and a few
2880x2304 ones); about 18 % are fractured; a couple of non-fractured JPGs are truncated (one
recoverable, one not); one fractured image is listed as not fractured in ``dataset.csv`` (the
label fault of an early release). Split files list the fractured images only (80 / 12 / 8 %).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from utils import cli
from utils.fracatlas import layout
from utils.io import write_text

PARTS = ("hand", "leg", "hip", "shoulder")
VIEWS = ("frontal", "lateral", "oblique")
SIZES = ((454, 373), (373, 454))  # (H, W) of most images
ODD_SIZES = ((454, 181), (181, 454), (440, 373))
LARGE = (2880, 2304)


@dataclass(frozen=True)
class Preset:
    n_images: int
    n_large: int  # images of LARGE size (slow to convert; the real set has some)


PRESETS = {
    "tiny": Preset(n_images=28, n_large=1),
    "demo": Preset(n_images=400, n_large=4),
    # bench/check_full.py: the download's common sizes (no max_side in the full profile), enough
    # images for a full classifier batch (32) per training fold of two; no 2880 x 2304 one, whose
    # nnU-Net sliding window alone would outlast the check.
    "check": Preset(n_images=76, n_large=0),
}
FRACTURED_SHARE = 0.18


@dataclass(frozen=True)
class Bone:
    """A capsule from ``p0`` to ``p1`` (x, y px) of full width ``width`` px."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    width: float


def _capsule(canvas: np.ndarray, bone: Bone, value: float, shrink: float = 0.0) -> None:
    w = max(1, int(round(bone.width - shrink)))
    p0, p1 = (tuple(int(round(c)) for c in p) for p in (bone.p0, bone.p1))
    cv2.line(canvas, p0, p1, value, w, cv2.LINE_AA)
    for p in (p0, p1):
        cv2.circle(canvas, p, w // 2, value, -1, cv2.LINE_AA)


def _bones(part: str, h: int, w: int, rng: np.random.Generator) -> list[Bone]:
    """The bones of a body part in an (h, w) image, placed and angled at random."""
    s = min(h, w)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    angle = rng.uniform(-0.5, 0.5) + (np.pi / 2 if h >= w else 0.0)
    d = np.array([np.cos(angle), np.sin(angle)])
    n = np.array([-d[1], d[0]])
    length = max(h, w) * rng.uniform(0.55, 0.8)
    if part == "hand":
        count, width, gap = int(rng.integers(3, 6)), s * rng.uniform(0.04, 0.06), s * 0.13
        offsets = (np.arange(count) - (count - 1) / 2) * gap
        lengths = [length * rng.uniform(0.5, 0.75) for _ in offsets]
    elif part == "leg":
        offsets, lengths = [-s * 0.1, s * 0.12], [length, length * 0.95]
        width = s * rng.uniform(0.08, 0.11)
    else:  # hip, shoulder: one large long bone
        offsets, lengths, width = [0.0], [length * 0.8], s * rng.uniform(0.11, 0.15)
    bones = []
    for k, (off, ln) in enumerate(zip(offsets, lengths, strict=True)):
        centre = np.array([cx, cy]) + off * n
        tilt = d + rng.normal(0, 0.05, 2)
        tilt /= np.linalg.norm(tilt)
        width_k = width * (0.55 if part == "leg" and k == 1 else 1.0)
        bones.append(Bone(tuple(centre - tilt * ln / 2), tuple(centre + tilt * ln / 2), width_k))
    return bones


def _crack(bone: Bone, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One jagged break across ``bone``: (the dark line, its annotation), (K, 2) polygons (x, y).

    The annotation is a band three times the line's width around it, as annotators outline a
    fracture region rather than trace the crack.
    """
    p0, p1 = np.array(bone.p0), np.array(bone.p1)
    axis = (p1 - p0) / np.linalg.norm(p1 - p0)
    normal = np.array([-axis[1], axis[0]])
    centre = p0 + (p1 - p0) * rng.uniform(0.25, 0.75)
    theta = rng.uniform(-0.6, 0.6)  # break direction: across the bone, up to ~35 deg off
    direction = np.cos(theta) * normal + np.sin(theta) * axis
    side = np.array([-direction[1], direction[0]])
    reach = bone.width / 2 * 0.95
    start = -reach if rng.random() < 0.7 else -reach * rng.uniform(-0.2, 0.5)  # 30 %: partial
    ts = np.linspace(start, reach, 7)
    width = max(2.0, min(h, w) * rng.uniform(0.015, 0.025))
    jitter = rng.normal(0, width * 0.8, len(ts))
    spine = centre + ts[:, None] * direction + jitter[:, None] * side
    half = width / 2 * rng.uniform(0.7, 1.3, len(ts))[:, None]

    def band(scale: float) -> np.ndarray:
        return np.concatenate([spine + scale * half * side, (spine - scale * half * side)[::-1]])

    return band(1.0), band(3.0)


def _fill(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    """Anti-aliased float coverage in [0, 1] of a float polygon (sub-pixel accurate)."""
    canvas = np.zeros(shape, np.float32)
    pts = np.round(polygon * 16).astype(np.int32)[None]
    cv2.fillPoly(canvas, pts, 1.0, cv2.LINE_AA, shift=4)
    return canvas


def render(
    h: int, w: int, part: str, n_breaks: int, hardware: bool, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One X-ray: (h, w) uint8 image and the annotation polygons ((K, 2) x, y px) of its breaks."""
    s = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.06 + 0.04 * (yy / h) * rng.uniform(-1, 1)
    tissue = np.zeros((h, w), np.float32)
    cv2.ellipse(
        tissue,
        (int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6))),
        (int(w * rng.uniform(0.3, 0.45)), int(h * rng.uniform(0.35, 0.48))),
        float(rng.uniform(0, 180)),
        0,
        360,
        1.0,
        -1,
    )
    img = img + 0.22 * cv2.GaussianBlur(tissue, (0, 0), s * 0.03)
    bones = _bones(part, h, w, rng)
    bone_mask = np.zeros((h, w), np.float32)
    for bone in bones:
        _capsule(bone_mask, bone, 1.0)
    marrow = np.zeros((h, w), np.float32)
    for bone in bones:
        _capsule(marrow, bone, 1.0, shrink=bone.width * 0.45)
    brightness = rng.uniform(0.5, 0.7)
    img = img + bone_mask * (brightness - 0.12 * marrow)
    # Look-alikes of a break: straight growth lines across a bone, joint gaps (a dark band with
    # soft edges), both sharper or fainter than the real breaks.
    for bone in bones:
        if rng.random() < 0.35:
            p0, p1 = np.array(bone.p0), np.array(bone.p1)
            axis = (p1 - p0) / np.linalg.norm(p1 - p0)
            normal = np.array([-axis[1], axis[0]])
            centre = p0 + (p1 - p0) * rng.uniform(0.15, 0.85)
            half = bone.width * 0.6
            a, b = (tuple(int(c) for c in centre + k * half * normal) for k in (-1, 1))
            line = np.zeros((h, w), np.float32)
            thick = max(1, int(s * rng.uniform(0.006, 0.02)))
            cv2.line(line, a, b, 1.0, thick, cv2.LINE_AA)
            img = img * (1 - rng.uniform(0.15, 0.5) * line * bone_mask)
    if hardware:
        plate = np.zeros((h, w), np.float32)
        bone = bones[0]
        _capsule(plate, Bone(bone.p0, bone.p1, bone.width * 0.25), 1.0)
        img = np.maximum(img, plate * 0.97)
    polygons = []
    for _ in range(n_breaks):
        bone = bones[int(rng.integers(len(bones)))]
        line, polygon = _crack(bone, h, w, rng)
        crack = cv2.GaussianBlur(_fill((h, w), line), (0, 0), 0.6)
        # Contrast from clear to faint: a quarter of the breaks sit near the noise level.
        contrast = rng.uniform(0.1, 0.25) if rng.random() < 0.25 else rng.uniform(0.35, 0.75)
        img = img * (1 - contrast * crack * bone_mask)
        polygons.append(polygon)
    img = cv2.GaussianBlur(img, (0, 0), max(0.6, s * 0.0015))
    img = img + rng.normal(0, rng.uniform(0.02, 0.05), img.shape).astype(np.float32)
    out = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.2)
    return (out * 255).astype(np.uint8), polygons


def _size(index: int, large: set[int], rng: np.random.Generator) -> tuple[int, int]:
    if index in large:
        return LARGE if rng.random() < 0.5 else LARGE[::-1]
    if rng.random() < 0.06:
        return ODD_SIZES[int(rng.integers(len(ODD_SIZES)))]
    return SIZES[int(rng.integers(len(SIZES)))]


def _coco_annotation(ann_id: int, image_id: int, polygon: np.ndarray) -> dict:
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    x, y = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "area": round(area, 2),
        "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
    }


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(64, int(len(data) * keep))])  # 64 bytes: not even a header


def generate(out: Path | str, preset: str = "tiny", seed: int = 0) -> dict[str, int]:
    """Write the data set of ``preset`` into ``out``; returns image counts."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    spec, root = PRESETS[preset], Path(out)
    rng = np.random.default_rng(seed)
    n = spec.n_images
    fractured = np.zeros(n, bool)
    fractured[rng.choice(n, max(4, round(n * FRACTURED_SHARE)), replace=False)] = True
    negatives = np.flatnonzero(~fractured)
    large = set(rng.choice(n, spec.n_large, replace=False).tolist())
    truncated = dict(zip(rng.choice(negatives, 2, replace=False).tolist(), (0.6, 0.0), strict=True))
    mislabelled = int(rng.choice(np.flatnonzero(fractured)))
    for folder in layout.FOLDERS:
        layout.image_dir(root, folder).mkdir(parents=True, exist_ok=True)
    rows, coco_images, coco_anns = [], [], []
    for i in tqdm(range(n), desc="synthetic FracAtlas", leave=False):
        name = f"IMG{i + 1:07d}.jpg"
        h, w = _size(i, large, rng)
        part = PARTS[int(rng.integers(len(PARTS)))]
        n_breaks = int(rng.choice([1, 2, 3], p=[0.72, 0.23, 0.05])) if fractured[i] else 0
        hardware = bool(rng.random() < 0.08)
        img, polygons = render(h, w, part, n_breaks, hardware, rng)
        folder = "Fractured" if fractured[i] else "Non_fractured"
        path = layout.image_dir(root, folder) / name
        cv2.imwrite(str(path), cv2.merge([img, img, img]), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if i in truncated:
            _truncate(path, truncated[i])
        if fractured[i]:
            coco_images.append(
                {"id": len(coco_images) + 1, "file_name": name, "width": w, "height": h}
            )
            for polygon in polygons:
                coco_anns.append(_coco_annotation(len(coco_anns) + 1, len(coco_images), polygon))
        view = VIEWS[int(rng.integers(len(VIEWS)))]
        rows.append(
            {
                layout.ID: name,
                **{p: int(p == part) for p in PARTS},
                "mixed": 0,
                "hardware": int(hardware),
                "multiscan": int(rng.random() < 0.05),
                "fractured": int(fractured[i] and i != mislabelled),
                "fracture_count": n_breaks,
                **{v: int(v == view) for v in VIEWS},
            }
        )
    table = pd.DataFrame(rows, columns=list(layout.CSV_COLUMNS))
    # dataset.csv of the download starts with a UTF-8 byte-order mark.
    write_text("\ufeff" + table.to_csv(index=False), layout.dataset_csv(root))
    coco = {
        "info": {"description": "synthetic FracAtlas"},
        "categories": [{"id": 1, "name": "fractured"}],
        "images": coco_images,
        "annotations": coco_anns,
    }
    layout.coco_json(root).parent.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(coco), layout.coco_json(root))
    names = [im["file_name"] for im in coco_images]
    order = rng.permutation(len(names))
    cuts = np.cumsum([round(len(names) * 0.8), round(len(names) * 0.12)])
    for name, part in zip(layout.SPLIT_NAMES, np.split(order, cuts), strict=True):
        ids = pd.DataFrame({layout.ID: sorted(names[k] for k in part)})
        layout.split_csv(root, name).parent.mkdir(parents=True, exist_ok=True)
        write_text(ids.to_csv(index=False), layout.split_csv(root, name))
    return {"images": n, "fractured": int(fractured.sum()), "instances": len(coco_anns)}


def main(argv: list[str] | None = None) -> dict[str, int]:
    return cli.generator(__doc__, generate, PRESETS, argv)


if __name__ == "__main__":
    main()
