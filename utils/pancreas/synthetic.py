"""Synthetic pancreas quiz data in the real layout: ``python -m utils.pancreas.synthetic --out D --preset tiny|demo|check [--seed N]``.

Writes ``train/subtype{0,1,2}/quiz_<s>_<id>.nii.gz`` (+ ``_0000`` image), the same under
``validation/`` and ``test/quiz_<id>_0000.nii.gz`` (layout in utils/pancreas/layout.py). Each case
is a small cropped-abdomen CT volume (int16 HU, anisotropic spacing: in-plane 0.7-0.8 mm, slices
2.0-2.5 mm, an LPS-style NIfTI affine): fat and soft tissue as smooth random fields, a curved
tube of pancreas (label 1) holding one lesion (label 2). The lesion's look depends on its subtype
with overlapping ranges, so classification is learnable but not trivial:

- subtype 0: cyst-like, hypodense (mean ~5 HU) and homogeneous;
- subtype 1: solid, ~40 HU and heterogeneous (strong texture);
- subtype 2: ~20 HU with an enhancing rim.

Class sizes follow the real set's imbalance (train 62/106/84, validation 9/15/12). As in the real
set, about three masks in four store the pancreas label as the float 1.0000153.
Deterministic for a seed: each case draws from its own generator (seed, case index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from utils import cli
from utils.io import atomic_path
from utils.pancreas import layout


@dataclass(frozen=True)
class Preset:
    """Cases per subtype of each labelled split, test cases, and the volume size range."""

    train: tuple[int, int, int]
    validation: tuple[int, int, int]
    test: int
    shape_min: tuple[int, int, int]  # (z, y, x) voxels
    shape_max: tuple[int, int, int]


PRESETS = {
    "tiny": Preset((3, 4, 3), (1, 2, 1), 2, (12, 32, 32), (14, 36, 40)),
    # 48 train / 24 validation cases in the real 62:106:84 proportions, volumes ~18 x 44 x 52
    # voxels (small enough for 3D nnU-Net iterations on a CPU).
    "demo": Preset((12, 20, 16), (6, 10, 8), 6, (16, 40, 48), (20, 48, 56)),
    # bench/check_full.py: one training case per subtype, one validation and one test case, at
    # the real spacing but ~0.6x the real ROIs' median shape (64 x 119 x 179 voxels): nnU-Net
    # trains in fp32 on a CPU, where the real ResEnc M plan needs more memory than the check's
    # limit (docs/benchmarks.md). No case exceeds the patch planned for these, so one tile each.
    "check": Preset((1, 1, 1), (0, 1, 0), 1, (38, 70, 100), (42, 78, 110)),
}
FLOAT_ONE = np.float32(1.0000153)  # how 214 of the 288 real masks store the pancreas label
# Lesion look per subtype: (mean HU, spread of the case mean, texture std, rim enhancement HU).
LESION_LOOK = {0: (5.0, 12.0, 4.0, 0.0), 1: (40.0, 12.0, 16.0, 0.0), 2: (20.0, 12.0, 6.0, 45.0)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (z, y, x)."""
    field = gaussian_filter(rng.normal(size=shape), sigma=(sigma / 3, sigma, sigma))
    return (field - field.mean()) / (field.std() + 1e-8)


def make_case(rng: np.random.Generator, subtype: int, preset: Preset):
    """(image int16 (z, y, x) HU, labels uint8 (z, y, x) in {0, 1, 2}, spacing (z, y, x) mm)."""
    shape = tuple(
        int(rng.integers(lo, hi + 1))
        for lo, hi in zip(preset.shape_min, preset.shape_max, strict=True)
    )
    nz, ny, nx = shape
    spacing = (float(rng.uniform(2.0, 2.5)), *(2 * [float(rng.uniform(0.7, 0.8))]))
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")

    # Pancreas: a tube along x whose centre line bends in y and z; radius in voxels per axis.
    radius = rng.uniform(0.14, 0.2) * ny
    rz = radius * spacing[1] / spacing[0] * rng.uniform(1.2, 1.6)
    cy = (
        ny / 2
        + rng.uniform(-0.1, 0.1) * ny
        + rng.uniform(0.08, 0.15) * ny * np.sin(xx / nx * np.pi * rng.uniform(1, 2))
    )
    cz = nz / 2 + rng.uniform(-1.5, 1.5) + rng.uniform(0, 2) * np.cos(xx / nx * np.pi)
    tube = ((yy - cy) / radius) ** 2 + ((zz - cz) / rz) ** 2 <= 1.0
    tube &= (xx > 0.12 * nx) & (xx < 0.88 * nx)

    # Lesion: an ellipsoid on the tube's centre line that may bulge out of it (as real lesions
    # deform the gland); the pancreas label covers tube and lesion.
    lx = rng.uniform(0.3, 0.7) * nx
    centre = (float(cz[0, 0, int(lx)]), float(cy[0, 0, int(lx)]), lx)
    axes = (
        rng.uniform(0.8, 1.2) * rz,
        rng.uniform(0.8, 1.3) * radius,
        rng.uniform(0.9, 1.5) * radius,
    )
    dist = sum(((g - c) / a) ** 2 for g, c, a in zip((zz, yy, xx), centre, axes, strict=True))
    lesion = dist <= 1.0
    tube |= lesion
    labels = tube.astype(np.uint8)
    labels[lesion] = 2

    tissue = np.where(_smooth_field(rng, shape, 6.0) > rng.uniform(-0.3, 0.3), 45.0, -90.0)
    image = gaussian_filter(tissue, sigma=(0.5, 1.5, 1.5)) + 10.0 * _smooth_field(rng, shape, 2.0)
    image[tube] = rng.normal(95, 10) + 6.0 * _smooth_field(rng, shape, 1.5)[tube]
    mean, spread, texture, rim = LESION_LOOK[subtype]
    image[lesion] = rng.normal(mean, spread) + texture * _smooth_field(rng, shape, 1.0)[lesion]
    if rim:
        shell = (dist > 0.55) & lesion
        image[shell] += rim * rng.uniform(0.6, 1.2)
    image += rng.normal(0, 12, shape)
    return image.round().astype(np.int16), labels, spacing


def _affine(spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """LPS-style NIfTI affine of an (x, y, z) array: flipped x and y, a random origin."""
    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = rng.uniform(-150, 150, 3)
    return affine


def _save(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a (z, y, x) array as an (x, y, z) NIfTI, atomically."""
    img = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp.with_suffix(".nii.gz"))
        tmp.with_suffix(".nii.gz").replace(tmp)


def generate(out: Path | str, preset: str = "demo", seed: int = 0) -> dict[str, int]:
    """Write every case of the preset named ``preset`` under ``out``; returns case counts."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    out, preset, index = Path(out), PRESETS[preset], 0
    for split in layout.LABELLED_SPLITS:
        for subtype, count in enumerate(getattr(preset, split)):
            for _ in range(count):
                rng = np.random.default_rng([seed, index])
                image, labels, spacing = make_case(rng, subtype, preset)
                affine = _affine(spacing, rng)
                case = f"quiz_{subtype}_{index:03d}"
                folder = out / split / f"subtype{subtype}"
                _save(image, affine, folder / layout.image_name(case))
                mask = labels.astype(np.float32) if rng.random() < 0.75 else labels
                if mask.dtype == np.float32:
                    mask[labels == 1] = FLOAT_ONE
                _save(mask, affine, folder / layout.mask_name(case))
                index += 1
    for k in range(preset.test):
        rng = np.random.default_rng([seed, index])
        image, _, spacing = make_case(rng, int(rng.integers(0, 3)), preset)
        _save(
            image,
            _affine(spacing, rng),
            out / layout.TEST_SPLIT / layout.image_name(f"quiz_{k:03d}"),
        )
        index += 1
    return {"labelled": index - preset.test, "test": preset.test}


def main(argv: list[str] | None = None) -> dict[str, int]:
    return cli.generator(__doc__, generate, PRESETS, argv, default="demo")


if __name__ == "__main__":
    main()
