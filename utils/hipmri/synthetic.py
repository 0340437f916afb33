"""Synthetic HipMRI slices in the real layout: ``python -m utils.hipmri.synthetic --out D --preset tiny|demo|bench|check [--seed N]``.

Writes ``keras_slices_{train,validate,test}/case_<p>_week_<w>_slice_<s>.nii.gz`` and
``keras_slices_seg_{...}/seg_...nii.gz`` with a patient-level split (patients numbered from 004
as in the course set). Each scan (patient, week) is a stack of axial pelvis slices with the six
classes (0 background, 1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate) drawn as ellipses
that grow and shrink along the stack. As in the real set: slices mostly (256, 128), the scans
of some patients (256, 144), some scans stored (256, 128, 1); images int16 T2-like intensities
with a per-patient scale, a bias field and Rician noise (unnormalised); masks stored as float32
with values like 0.99998; an LPS-style affine with per-patient spacing and the slice position.
The prostate is a small irregular blob only ~10 % brighter than the muscle around it (the hard
class).
Deterministic for a seed: every scan draws from its own generator (seed, patient, week).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

from utils import cli
from utils.hipmri import layout


@dataclass(frozen=True)
class Preset:
    """Patients per split, weeks per patient and slices per scan."""

    patients: tuple[int, int, int]  # train, validate, test
    weeks: int
    slices: int


PRESETS = {
    "tiny": Preset(patients=(3, 1, 1), weeks=1, slices=8),
    "demo": Preset(patients=(10, 2, 3), weeks=2, slices=32),
    # 30 train patients x 5 weeks x 76 slices = 11,400 train slices, the size of the real set.
    "bench": Preset(patients=(30, 1, 1), weeks=5, slices=76),
    # bench/check_full.py: one scan per split and two train scans, the bench preset's slice count.
    "check": Preset(patients=(2, 1, 1), weeks=1, slices=76),
}
FIRST_PATIENT = 4  # the course set starts at case_004


@dataclass(frozen=True)
class Scan:
    """One patient-week: geometry and intensity draws shared by its slices."""

    width: int  # 128, or 144 for a few patients
    trailing_axis: bool  # stored as (256, W, 1)
    centre: tuple[float, float]  # body centre (row, col) in px
    body: tuple[float, float]  # body semi-axes (rows, cols) in px
    bladder_fill: float  # bladder size factor (varies week to week)
    prostate: tuple[float, float]  # prostate semi-axes (rows, cols) in px at its widest slice
    prostate_phase: float  # orientation of the prostate's lobes (radians)
    scale: float  # intensity scale of the patient (scanner gain)
    spacing: tuple[float, float, float]  # mm per voxel (row, col, slice)


def _scan_params(rng: np.random.Generator, patient: int, week: int) -> Scan:
    prng = np.random.default_rng(patient)  # per-patient traits shared by all weeks
    width = 144 if patient % 5 == 0 else 128  # every fifth patient stored 256 x 144
    return Scan(
        width=width,
        trailing_axis=(patient + week) % 5 == 2,
        centre=(128 + rng.normal(0, 4), width / 2 + rng.normal(0, 2)),
        body=(prng.uniform(100, 116), prng.uniform(48, 56)),
        bladder_fill=rng.uniform(0.6, 1.2),
        prostate=(prng.uniform(10, 13), prng.uniform(7.5, 9.5)),
        prostate_phase=float(prng.uniform(0, 2 * np.pi)),
        scale=float(prng.uniform(300, 1500)),
        spacing=(prng.uniform(0.9, 1.2), prng.uniform(0.9, 1.2), prng.uniform(2.0, 3.0)),
    )


def _ellipse(rr, cc, centre, axes) -> np.ndarray:
    return ((rr - centre[0]) / axes[0]) ** 2 + ((cc - centre[1]) / axes[1]) ** 2 <= 1.0


def _blob(rr, cc, centre, axes, phase: float, grow: float) -> np.ndarray:
    """An ellipse whose radius wobbles with the angle (lobes), scaled by ``grow``."""
    y, x = (rr - centre[0]) / axes[0], (cc - centre[1]) / axes[1]
    angle = np.arctan2(y, x)
    radius = 1 + 0.15 * np.sin(2 * angle + phase) + 0.1 * np.sin(3 * angle + 2 * phase)
    return np.hypot(y, x) <= radius * grow


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (tissue texture, bias field)."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def _bump(t: float, lo: float, hi: float) -> float:
    """0 outside [lo, hi], rising to 1 in the middle: an organ's extent along the stack."""
    if not lo < t < hi:
        return 0.0
    return float(np.sin(np.pi * (t - lo) / (hi - lo)) ** 0.5)


def render_slice(scan: Scan, t: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One slice at relative position ``t`` in [0, 1] (feet -> head).

    Returns (image (256, W) float32 in scanner units, labels (256, W) uint8).
    """
    h, w = 256, scan.width
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    r0, c0 = scan.centre
    labels = np.zeros((h, w), np.uint8)
    tissue = np.zeros((h, w), np.float32)  # relative T2 signal before scale, bias and noise

    body = _ellipse(rr, cc, (r0, c0), (scan.body[0] * (0.95 + 0.05 * t), scan.body[1]))
    inner = _ellipse(rr, cc, (r0, c0), (scan.body[0] - 9, scan.body[1] - 7))
    labels[body] = 1
    tissue[body] = 0.75  # subcutaneous fat is bright on T2
    tissue[inner] = 0.42 + 0.05 * _smooth_noise(rng, (h, w), 6)[inner]  # muscle

    # Bone: femoral heads (lateral), pubis (anterior, low slices), sacrum (posterior, high slices).
    bones = []
    if t < 0.75:
        radius = 15 * _bump(t, -0.1, 0.75) + 3
        bones += [((r0 - 62, c0 + 4), (radius, radius)), ((r0 + 62, c0 + 4), (radius, radius))]
    if t < 0.35:
        bones.append(((r0, c0 - 38), (14 * _bump(t, -0.2, 0.35) + 2, 5)))
    if t > 0.5:
        bones.append(((r0, c0 + 36), (22 * _bump(t, 0.45, 1.3) + 2, 9)))
    for centre, axes in bones:
        outer = _ellipse(rr, cc, centre, axes)
        marrow = _ellipse(rr, cc, centre, (max(axes[0] - 2.5, 1), max(axes[1] - 2.5, 1)))
        labels[outer] = 2
        tissue[outer] = 0.08  # cortex: no signal
        tissue[marrow] = 0.6  # fatty marrow

    # Bladder: anterior, fluid (very bright), present in the upper part of the stack.
    size = _bump(t, 0.32, 1.05) * scan.bladder_fill
    if size > 0.05:
        bladder = _ellipse(rr, cc, (r0 + rng.normal(0, 1), c0 - 17), (30 * size, 17 * size))
        labels[bladder] = 3
        tissue[bladder] = 0.95

    # Rectum: posterior, dark wall around a lumen of gas (dark) or content (mid).
    rect_c = (r0 + rng.normal(0, 1.5), c0 + 21)
    rect = _ellipse(rr, cc, rect_c, (10 + 2 * np.sin(5 * t), 8.5))
    labels[rect] = 4
    tissue[rect] = 0.28
    tissue[_ellipse(rr, cc, rect_c, (5, 4))] = 0.05 if rng.random() < 0.5 else 0.5

    # Prostate: between bladder and rectum in the lower-middle stack, an irregular blob only
    # ~10 % brighter than the muscle around it, behind a faint capsule: the hard class.
    grow = _bump(t, 0.12, 0.55)
    if grow > 0.1:
        centre = (r0 + rng.normal(0, 1.5), c0 + 3 + rng.normal(0, 1))
        axes = (scan.prostate[0] * grow, scan.prostate[1] * grow)
        prostate = _blob(rr, cc, centre, axes, scan.prostate_phase + 0.3 * t, 1.0)
        capsule = _blob(rr, cc, centre, axes, scan.prostate_phase + 0.3 * t, 1.15) & ~prostate
        labels[prostate] = 5
        tissue[capsule & (labels != 3)] = 0.39
        tissue[prostate] = 0.46 + 0.06 * _smooth_noise(rng, (h, w), 2)[prostate]
    return tissue, labels


def to_scanner(tissue: np.ndarray, scan: Scan, rng: np.random.Generator) -> np.ndarray:
    """Relative signal -> int16 scanner units: bias field, patient scale, Rician noise."""
    bias = 1.0 + 0.15 * _smooth_noise(rng, tissue.shape, 40)
    signal = tissue * bias * scan.scale
    sigma = 0.05 * scan.scale
    noisy = np.hypot(
        signal + rng.normal(0, sigma, tissue.shape), rng.normal(0, sigma, tissue.shape)
    )
    return np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)


def float_mask(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 labels as stored by the course set's export: some values off by ~1e-5 (0.99998)."""
    jitter = rng.choice([0.0, -2e-5, 1e-5], size=labels.shape, p=[0.6, 0.2, 0.2])
    return np.abs(labels.astype(np.float32) + jitter.astype(np.float32))


def affine(scan: Scan, index: int) -> np.ndarray:
    """(4, 4) voxel -> mm (LPS-style flips of rows and columns, slice position along z)."""
    sr, sc, sz = scan.spacing
    return np.array(
        [
            [-sr, 0, 0, sr * 128],
            [0, -sc, 0, sc * scan.width / 2],
            [0, 0, sz, -60.0 + index * sz],
            [0, 0, 0, 1],
        ]
    )


def write_scan(root: Path, split: str, patient: int, week: int, n_slices: int, seed: int) -> int:
    """Render and write one scan's slices; returns the number written."""
    rng = np.random.default_rng([seed, patient, week])
    scan = _scan_params(rng, patient, week)
    pid = f"{patient:03d}"
    for s in range(n_slices):
        tissue, labels = render_slice(scan, s / max(n_slices - 1, 1), rng)
        image, mask = to_scanner(tissue, scan, rng), float_mask(labels, rng)
        if scan.trailing_axis:
            image, mask = image[..., None], mask[..., None]
        name = layout.image_name(pid, week, s)
        nib.save(nib.Nifti1Image(image, affine(scan, s)), layout.image_dir(root, split) / name)
        nib.save(
            nib.Nifti1Image(mask, affine(scan, s)),
            layout.mask_dir(root, split) / layout.mask_name_of(name),
        )
    return n_slices


def generate(out: Path | str, preset: str = "tiny", seed: int = 0) -> dict[str, int]:
    """Write the data set of ``preset`` into ``out``; returns slices per split."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    spec, root = PRESETS[preset], Path(out)
    counts: dict[str, int] = {}
    patient = FIRST_PATIENT
    for split, n_patients in zip(layout.SPLITS, spec.patients, strict=True):
        layout.image_dir(root, split).mkdir(parents=True, exist_ok=True)
        layout.mask_dir(root, split).mkdir(parents=True, exist_ok=True)
        counts[split] = 0
        for _ in range(n_patients):
            for week in range(spec.weeks):
                counts[split] += write_scan(root, split, patient, week, spec.slices, seed)
            patient += 1
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    return cli.generator(__doc__, generate, PRESETS, argv)


if __name__ == "__main__":
    main()
