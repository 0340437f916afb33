"""Synthetic RSNA 2022 cervical-spine CT data in the real Kaggle on-disk layout.

Usage::

    python -m utils.rsna.synthetic --out data/rsna_demo --preset demo [--seed 0] [--workers 2]
        [--overwrite]

Presets: ``tiny`` (tests: 8 train + 2 test studies of 32-48 slices of 64 x 64), ``demo``
(90 train studies of mixed styles, a third segmented, + 3 test; 80-110 slices of 256 x 256 at
~2 mm), ``unseen`` (24 test studies with their answers in test_labels.csv,
no training half, in a style the demo never uses: the cross-style check), ``bench`` (one 300-slice 512 x 512 JPEG
Lossless train study for bench/bench_dicom.py; header-only test CSVs), ``check`` (3 segmented
train studies + 1 test study of 280-320 slices of 512 x 512 with the format quirks, for
bench/check_full.py).

Styles (``STYLES``) set how studies look, independently of the preset's size: anatomy proportions,
intensities, noise, blur, slice thickness (with partial volume along z) and crack drawing (width,
contrast, extent, orientation). Each study draws one of its preset's styles (``Preset.styles``,
``style_weights``): ``tiny`` uses ``classic`` (the original, obvious cracks); ``demo`` draws
``classic`` for half its studies and ``subtle`` (faint, thin, partial cracks) or ``lean`` (another
anatomy and acquisition) for a quarter each; ``unseen`` uses ``unseen`` only.

Layout written under ``--out`` (as the competition)::

    train.csv  train_bounding_boxes.csv  test.csv  sample_submission.csv
    train_images/<uid>/<n>.dcm  test_images/<uid>/<n>.dcm  segmentations/<uid>.nii
    test_labels.csv      # NOT part of the Kaggle layout: the answers for the synthetic test
                         # studies (train.csv schema), to score a submission with utils/rsna/metric.py

Each study is a phantom neck CT in HU (air, fat, soft tissue, airway, spinal canal, C1..C7 and a
few thoracic vertebrae separated by discs) with per-study variation of position, rotation, size,
pixel spacing, slice spacing and slice count. Around the spine lies what tells the levels apart
on a real scan: most studies start in the skull base (occipital bone, condyles), the mandible
spans the upper levels, the lung apices, clavicles and first ribs appear from about C7 down, the
neck widens into the head and the shoulders, and the spinous process is long at C7; where each of
these lies varies from study to study, so a vertebra's level is not its position in the stack.
A fractured vertebra carries one or two cracks: thin soft-tissue bands (vertical planes, so
visible on every axial slice of the vertebra) through its body and/or posterior arch, sometimes
with a step-off of one fragment. A segmentation holds the
phantom's own vertebra voxels (cracks included), so it coincides with the bone. Labels follow the
real prevalences with a rounded (stratified) assignment, so small datasets hit the targets.

Real-format odd cases (every preset except ``bench``; each at least once per split): JPEG Lossless SV1 and RLE studies among
Explicit VR ones, reversed studies (file number ascending feet -> head, including a segmented one),
numbering from 2, a non-square study (the 512 x 519 analogue), signed pixel data.

Deterministic for a seed: the same files, bytes and CSVs. The dataset is built in a hidden sibling
folder and moved onto ``--out`` only when complete; a non-empty ``--out`` needs ``--overwrite``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from utils import cli
from utils.errors import InputError
from utils.io import write_csv
from utils.rsna.metric import VERTEBRAE
from utils.rsna.synthetic.writers import save_rsna_seg, write_slice

log = logging.getLogger(__name__)

LABEL_COLS = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
BOX_COLS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
UID_ROOT = "1.2.826.0.1.3680043"

# Label statistics of the competition's 2,019 train studies (counted from its train.csv).
POSITIVE_RATE = 961 / 2019
FRACTURED_COUNT = {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}  # vertebrae per positive study
VERTEBRA_POSITIVES = np.array([146, 285, 73, 108, 162, 277, 393], dtype=np.float64)  # C1..C7
BOX_STUDY_RATE = 235 / 961  # share of positive studies with fracture boxes

# Tissue HU; bone values are drawn per study around these.
AIR, FAT, CANAL, DISC, LUNG = -1000.0, -100.0, 20.0, 80.0, -850.0

# Vertebra heights along z (mm at z-scale 1): C1, C2 body, C3..C7, thoracic; disc heights.
C_HEIGHTS = (11.0, 18.0, 14.0, 14.0, 14.0, 14.0, 14.0)
T_HEIGHT, DISC_HEIGHT, C1_C2_GAP = 17.0, 5.0, 1.5
# In-plane size of each level relative to the study's size scale (C1 uses its own ring geometry).
LEVEL_SCALE = (1.0, 0.92, 0.95, 1.0, 1.03, 1.07, 1.1)
T_SCALE = 1.2
# Spinous-process length (mm at size 1) of C2..C7 and of the thoracic levels: short in mid neck,
# long at C7 (the vertebra prominens). With the transverse processes (longer at C7) and the
# anatomy around the spine (Context), this is what tells the lower levels apart on one slice.
SPINOUS = {2: 15.0, 3: 9.0, 4: 9.0, 5: 10.0, 6: 13.0, 7: 20.0}
T_SPINOUS = 17.0


@dataclass(frozen=True)
class Preset:
    """Size of a generated dataset.

    ``fov_mm`` is the field of view across ``rows`` pixels (pixel spacing = fov / rows);
    ``crack_px`` is the fracture crack width in pixels, so cracks stay visible at every size.
    """

    n_train: int
    n_test: int
    rows: int
    n_slices: tuple[int, int]  # inclusive range of slices per study
    fov_mm: tuple[float, float]
    seg_fraction: float  # share of train studies with a segmentation
    crack_px: float
    odd_cases: bool  # reversed / start at 2 / non-square / signed / compressed studies
    syntax: str = "explicit"  # transfer syntax of the ordinary studies
    styles: tuple[str, ...] = ("classic",)  # each study draws one of these (STYLES)
    style_weights: tuple[float, ...] | None = None  # their probabilities (None: equal)


Range = tuple[float, float]  # a uniform draw's (low, high)


@dataclass(frozen=True)
class Style:
    """How the studies of a style look, independently of the data set's size (``Preset``).

    Anatomy proportions, intensities, acquisition and crack drawing are drawn per study from
    these ranges. A model trained on some styles and scored on another shows whether it learnt
    fractures or the look of its training data (the cross-style report of ``make demo``).
    """

    height: Range = (0.9, 1.1)  # vertebra and disc heights (z scale)
    c_share: Range = (0.72, 0.84)  # share of the stack the C-spine fills
    size: Range = (0.9, 1.15)  # in-plane vertebra size
    rotation: Range = (-8.0, 8.0)  # degrees in-plane
    lordosis: Range = (2.0, 6.0)  # mm anterior bow
    soft: Range = (35.0, 50.0)  # HU
    cortical: Range = (750.0, 1000.0)  # HU
    cancellous: Range = (320.0, 420.0)  # HU
    noise: Range = (10.0, 14.0)  # HU, Gaussian sigma
    thickness: Range = (1.0, 1.25)  # SliceThickness / slice spacing
    blur: Range = (0.0, 0.0)  # in-plane Gaussian sigma (px) of the reconstruction
    z_samples: int = 1  # sub-slices averaged over the thickness (partial volume along z)
    crack_width: Range = (1.0, 1.0)  # x the preset's crack_px
    crack_contrast: Range = (1.0, 1.0)  # share of the bone-to-soft-tissue drop inside a crack
    crack_extent: Range = (1.0, 1.0)  # share of the vertebra's height a crack spans
    crack_slope: Range = (-0.15, 0.15)  # in-plane drift (mm per mm of depth)
    body_angle: Range = (0.0, np.pi)  # direction of a body crack's normal (radians)


STYLES = {
    # The original phantom: cracks are soft-tissue bands through the whole vertebra (tests).
    "classic": Style(),
    # Fainter, thinner, partial cracks (down to a quarter of the bone-to-soft-tissue drop, over
    # 40 % of the vertebra): some are hard to see, so the demo's AUCs stay below 1.
    "subtle": Style(
        crack_width=(0.6, 1.2), crack_contrast=(0.25, 0.8), crack_extent=(0.4, 1.0),
        noise=(10.0, 16.0), blur=(0.0, 0.4),
    ),
    # Another anatomy and acquisition (taller, slimmer vertebrae, longer scans, softer bone,
    # more noise, thicker slices), with slightly fainter cracks.
    "lean": Style(
        height=(1.0, 1.2), c_share=(0.78, 0.9), size=(0.82, 1.0), rotation=(-12.0, 12.0),
        soft=(45.0, 65.0), cortical=(650.0, 900.0), cancellous=(280.0, 380.0),
        noise=(12.0, 18.0), thickness=(1.0, 1.4), blur=(0.2, 0.5), z_samples=2,
        crack_width=(0.9, 1.3), crack_contrast=(0.7, 1.0), crack_extent=(0.7, 1.0),
        crack_slope=(-0.25, 0.25),
    ),
    # Never used for training: scored by the cross-style report.
    "unseen": Style(
        height=(0.8, 0.95), c_share=(0.6, 0.72), size=(1.1, 1.3), rotation=(-15.0, 15.0),
        lordosis=(5.0, 10.0), soft=(25.0, 40.0), cortical=(900.0, 1200.0),
        cancellous=(380.0, 500.0), noise=(18.0, 26.0), thickness=(1.4, 2.0), blur=(0.5, 1.0),
        z_samples=3, crack_width=(0.9, 1.3), crack_contrast=(0.7, 1.0),
        crack_extent=(0.6, 1.0), crack_slope=(0.2, 0.4), body_angle=(1.2, 1.95),
    ),
}  # fmt: skip


PRESETS = {
    "tiny": Preset(8, 2, 64, (32, 48), (140.0, 180.0), 0.375, 2.0, True),
    "demo": Preset(
        90,
        3,
        256,
        (80, 110),
        (140.0, 180.0),
        1 / 3,
        5.0,
        True,
        styles=("classic", "subtle", "lean"),
        style_weights=(0.5, 0.25, 0.25),
    ),
    # The cross-style set: test studies only (with test_labels.csv), in the style training never saw.
    "unseen": Preset(0, 24, 256, (80, 110), (140.0, 180.0), 0.0, 5.0, True, styles=("unseen",)),
    "bench": Preset(1, 0, 512, (300, 300), (140.0, 180.0), 0.0, 5.0, False, "jpeg_lossless"),
    # bench/check_full.py: the full recipe on real-size studies (512 px, ~300 slices), every train
    # study segmented so that each of the check's folds has stage-1 rows, with the format quirks.
    "check": Preset(3, 1, 512, (280, 320), (140.0, 180.0), 1.0, 5.0, True),
}


@dataclass(frozen=True)
class StudySpec:
    """What one study is: identity, labels and format quirks (decided before rendering)."""

    uid: str
    split: str  # train | test
    index: int  # position within its split; seeds the study's own random stream
    labels: tuple[int, ...]  # C1..C7, 0/1
    segmented: bool = False
    boxes: bool = False
    reversed: bool = False  # file number ascending runs feet -> head
    first_number: int = 1
    non_square: bool = False
    syntax: str = "explicit"
    pixel_representation: int = 0
    rescale_intercept: float = -1024.0


# ---- label and role planning ------------------------------------------------------------------
def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``weights`` (Hamilton rounding)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def assign_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 7) int array of C1..C7 labels whose rates follow the real train set as closely as
    ``n`` allows: positives, fractured-vertebra counts and per-vertebra quotas are rounded, not
    sampled, and both classes exist whenever ``n >= 2``."""
    labels = np.zeros((n, 7), dtype=int)
    n_pos = round(n * POSITIVE_RATE)
    if n >= 2:
        n_pos = min(max(n_pos, 1), n - 1)
    if n_pos == 0:
        return labels
    sizes = np.array(list(FRACTURED_COUNT), dtype=int)
    per_study = np.repeat(
        sizes, _largest_remainder(np.array(list(FRACTURED_COUNT.values()), float), n_pos)
    )
    quota = _largest_remainder(VERTEBRA_POSITIVES, int(per_study.sum())).astype(np.float64)
    positives = rng.choice(n, size=n_pos, replace=False)
    for study, k in zip(positives, rng.permutation(per_study), strict=True):
        # Drawing by remaining quota keeps each vertebra near its target count; the small floor
        # lets a study with many fractures still find k distinct vertebrae.
        p = quota + 1e-3
        chosen = rng.choice(7, size=k, replace=False, p=p / p.sum())
        labels[study, chosen] = 1
        quota[chosen] = np.maximum(quota[chosen] - 1, 0)
    return labels


def _pick(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct members of ``pool`` (fewer if the pool is smaller)."""
    return rng.choice(pool, size=min(k, len(pool)), replace=False)


def _at_least_one(n: int, rate: float) -> int:
    return max(1, round(rate * n)) if n else 0


def plan_split(
    uids: list[str], split: str, preset: Preset, rng: np.random.Generator
) -> list[StudySpec]:
    """Labels and format roles of the studies of one split."""
    n = len(uids)
    labels = assign_labels(n, rng)
    positive = labels.any(axis=1)
    specs = [
        StudySpec(uid, split, i, tuple(int(v) for v in row), syntax=preset.syntax)
        for i, (uid, row) in enumerate(zip(uids, labels, strict=True))
    ]
    everyone = np.arange(n)
    segmented = np.array([], dtype=int)
    if split == "train" and preset.seg_fraction > 0 and n:
        n_seg = min(n, max(3, round(preset.seg_fraction * n)))
        n_seg_pos = round(n_seg * positive.mean())
        n_seg_pos = min(max(n_seg_pos, 1), n_seg - 1, int(positive.sum()))
        segmented = np.concatenate(
            [
                _pick(rng, everyone[positive], n_seg_pos),
                _pick(rng, everyone[~positive], n_seg - n_seg_pos),
            ]
        )
        for i in segmented:
            specs[i] = replace(specs[i], segmented=True)
    if split == "train":
        for i in _pick(rng, everyone[positive], _at_least_one(int(positive.sum()), BOX_STUDY_RATE)):
            specs[i] = replace(specs[i], boxes=True)
    if preset.odd_cases and n:
        _plan_odd_cases(specs, segmented, rng)
    return specs


def _plan_odd_cases(
    specs: list[StudySpec], segmented: np.ndarray, rng: np.random.Generator
) -> None:
    """Spread the real-format quirks over ``specs`` in place (each at least once)."""
    n = len(specs)
    everyone = np.arange(n)
    rev = _pick(rng, segmented, 1) if len(segmented) else np.array([], dtype=int)
    rev = np.concatenate(
        [rev, _pick(rng, np.setdiff1d(everyone, rev), _at_least_one(n, 0.1) - len(rev))]
    )
    compressed = rng.permutation(n)
    n_jpeg = _at_least_one(n, 0.15)
    n_rle = min(_at_least_one(n, 0.1), n - n_jpeg)
    signed = _pick(rng, everyone, _at_least_one(n, 0.1))
    roles: dict[int, dict] = {i: {} for i in range(n)}
    for i in rev:
        roles[i]["reversed"] = True
    for i in _pick(rng, everyone, _at_least_one(n, 0.03)):
        roles[i]["first_number"] = 2
    for i in _pick(rng, everyone, 1):
        roles[i]["non_square"] = True
    for i in compressed[:n_jpeg]:
        roles[i]["syntax"] = "jpeg_lossless"
    for i in compressed[n_jpeg : n_jpeg + n_rle]:
        roles[i]["syntax"] = "rle"
    for k, i in enumerate(signed):
        # Some scanners store signed HU directly (intercept 0); most keep the -1024 offset.
        roles[i].update(pixel_representation=1, rescale_intercept=0.0 if k == 0 else -1024.0)
    for i, role in roles.items():
        specs[i] = replace(specs[i], **role)


def plan_dataset(preset: Preset, seed: int) -> list[StudySpec]:
    """Every study of the dataset, train first. UIDs look like the real ones
    (``1.2.826.0.1.3680043.<int>``) and depend only on the seed and the study's position."""
    rng = np.random.default_rng([seed, 0])
    n = preset.n_train + preset.n_test
    numbers = rng.choice(np.arange(1000, 33000), size=n, replace=False)
    uids = [f"{UID_ROOT}.{k}" for k in numbers]
    return plan_split(uids[: preset.n_train], "train", preset, rng) + plan_split(
        uids[preset.n_train :], "test", preset, rng
    )


# ---- study geometry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Crack:
    """A fracture plane of one vertebra, in the vertebra's frame (mm, relative to its body centre).

    The plane is vertical, so it cuts every axial slice of the vertebra; its in-plane line drifts
    by ``slope`` mm per mm of depth. ``part`` is the bone it cuts ("body" or "arch"); ``shift``
    (mm) is a step-off of the fragment on the positive side, along the crack.
    """

    anchor: tuple[float, float]
    angle: float  # direction of the normal, radians from the +u axis
    slope: float
    width: float  # mm
    part: str
    shift: float = 0.0
    contrast: float = 1.0  # 1: the crack is soft tissue; less: partial volume with the bone
    depths: tuple[float, float] = (-np.inf, np.inf)  # mm from the vertebra's mid depth it spans

    def cuts(self, depth_offset: float) -> bool:
        """Whether the crack is drawn at ``depth_offset`` mm from the vertebra's mid depth."""
        return self.depths[0] <= depth_offset <= self.depths[1]


@dataclass(frozen=True)
class Level:
    """One vertebra along z: label, depth range below the top slice (mm) and in-plane scale."""

    label: int  # 1..7 = C1..C7, 8.. = T1..
    top: float
    bottom: float
    scale: float
    cracks: tuple[Crack, ...] = ()


@dataclass(frozen=True)
class Context:
    """Anatomy around the spine that a real neck CT shows, as depths below the top slice (mm).

    Which slices hold the skull base, the mandible, the lung apices and the clavicles varies
    from study to study (posture, body build, field of view), so the level of a vertebra has to
    be read from what is around it, not from its position in the stack.
    """

    head: float  # skull base covered above C1 (mm; 0: the scan starts at C1)
    mandible: tuple[float, float]  # depth range of the mandible
    lung_top: float  # depth where the lung apices start
    clavicle: float  # depth of the clavicles' centre line
    shoulder: float  # outline growth into the shoulders: x (1 + this * depth below C7 / coverage)


@dataclass(frozen=True)
class Geometry:
    """Everything needed to render one study; all lengths in mm, angles in radians."""

    rows: int
    cols: int
    n_slices: int
    pixel_spacing: float
    dz: float
    thickness: float
    z_top: float  # patient z of the head-most slice (LPS: head = larger z)
    origin_xy: tuple[float, float]  # IPP x, y of the first pixel
    centre_px: tuple[float, float]  # neck centre (row, col) in pixels
    rotation: float
    size: float  # vertebra size scale
    neck_axes: tuple[float, float]  # semi-axes (left-right, anterior-posterior)
    fat: float  # subcutaneous fat thickness
    airway: float  # airway radius
    spine_v: float  # body centre behind the neck centre
    lordosis: float  # anterior bow of the mid cervical spine
    levels: tuple[Level, ...]
    soft: float
    cortical: float
    cancellous: float
    noise: float
    context: Context  # skull base, mandible, lungs, clavicles
    blur: float = 0.0  # in-plane Gaussian sigma, px
    z_samples: int = 1  # sub-slices averaged over the slice thickness

    @property
    def coverage(self) -> float:
        """Depth covered by the stack (mm)."""
        return self.n_slices * self.dz


def _cracks(
    level: int,
    rng: np.random.Generator,
    size: float,
    width: float,
    style: Style,
    look: np.random.Generator,
    height: float,
) -> tuple[Crack, ...]:
    """One or two cracks for a fractured vertebra (C1: through the ring, else body then arch).

    ``rng`` draws what the classic phantom always drew; ``look`` draws the style's crack
    appearance (width, contrast, extent over ``height`` mm), so the classic style is unchanged.
    """
    n = 1 if rng.random() < 0.65 else 2
    shift = float(rng.uniform(0.5, 1.5) * width) if rng.random() < 0.5 else 0.0
    cracks = []
    for k in range(n):
        slope = float(rng.uniform(*style.crack_slope))
        if level == 1 or k == 1:
            # Through the ring/lamina on one side, running roughly anterior-posterior.
            side = rng.choice([-1.0, 1.0])
            anchor = (float(side * 8.0 * size), float(rng.uniform(8.0, 14.0) * size))
            angle = float(rng.uniform(-0.5, 0.5))
            part = "arch"
        else:
            anchor = (float(rng.uniform(-2.5, 2.5) * size), float(rng.uniform(-2.0, 2.0) * size))
            angle = float(rng.uniform(*style.body_angle))
            part = "body"
        span = float(look.uniform(*style.crack_extent)) * height
        centre = float(look.uniform(-0.5, 0.5)) * (height - span)
        depths = (-np.inf, np.inf) if span >= height else (centre - span / 2, centre + span / 2)
        cracks.append(
            Crack(
                anchor,
                angle,
                slope,
                width * float(look.uniform(*style.crack_width)),
                part,
                shift if k == 0 else 0.0,
                float(look.uniform(*style.crack_contrast)),
                depths,
            )
        )
    return tuple(cracks)


def _levels(
    labels: tuple[int, ...],
    top: float,
    z_scale: float,
    coverage: float,
    size: float,
    crack_width: float,
    rng: np.random.Generator,
    style: Style,
    look: np.random.Generator,
) -> tuple[Level, ...]:
    """C1..C7 from depth ``top`` down, then thoracic vertebrae until the stack ends."""
    levels, depth = [], top
    for i, height in enumerate(C_HEIGHTS):
        label = i + 1
        cracks = (
            _cracks(label, rng, size, crack_width, style, look, height * z_scale)
            if labels[i]
            else ()
        )
        levels.append(Level(label, depth, depth + height * z_scale, LEVEL_SCALE[i], cracks))
        depth += (height + (C1_C2_GAP if label == 1 else DISC_HEIGHT)) * z_scale
    label = 8
    while depth < coverage:
        levels.append(Level(label, depth, depth + T_HEIGHT * z_scale, T_SCALE))
        depth += (T_HEIGHT + DISC_HEIGHT) * z_scale
        label += 1
    return tuple(levels)


def study_style(spec: StudySpec, preset: Preset, seed: int) -> str:
    """The style of one study: one of the preset's, drawn from the study's own stream."""
    if len(preset.styles) == 1:
        return preset.styles[0]
    rng = np.random.default_rng([seed, 5 if spec.split == "train" else 6, spec.index])
    weights = preset.style_weights
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    return preset.styles[int(rng.choice(len(preset.styles), p=p))]


def _context_rng(spec: StudySpec, seed: int) -> np.random.Generator:
    """The study's own stream for the anatomy around the spine (the other draws stay as they
    were before it existed)."""
    return np.random.default_rng([seed, 9 if spec.split == "train" else 10, spec.index])


def _head_cover(rng: np.random.Generator) -> float:
    """mm of skull base above C1: most scans start in the skull base, some at C1."""
    cover, starts_in_skull = rng.uniform(8.0, 40.0), rng.random() < 0.7
    return float(cover) if starts_in_skull else 0.0


def _context(
    rng: np.random.Generator, head: float, levels: tuple[Level, ...], z_scale: float
) -> Context:
    """Where the skull base, mandible, lung apices and clavicles lie for this study."""
    c1_top, c7_bottom = levels[0].top, levels[6].bottom
    mandible_top = c1_top + rng.uniform(-5.0, 12.0) * z_scale
    return Context(
        head=head,
        mandible=(mandible_top, mandible_top + rng.uniform(22.0, 40.0) * z_scale),
        lung_top=c7_bottom + rng.uniform(-10.0, 6.0) * z_scale,
        clavicle=c7_bottom + rng.uniform(4.0, 24.0) * z_scale,
        shoulder=float(rng.uniform(0.8, 2.5)),
    )


def make_geometry(spec: StudySpec, preset: Preset, seed: int) -> Geometry:
    """Draw one study's anatomy and acquisition from its own random streams (``rng`` for what
    the classic phantom draws, ``look`` for the style's additions)."""
    style = STYLES[study_style(spec, preset, seed)]
    rng = np.random.default_rng([seed, 1 if spec.split == "train" else 2, spec.index])
    look = np.random.default_rng([seed, 7 if spec.split == "train" else 8, spec.index])
    rows = preset.rows
    cols = rows + max(1, round(rows * 7 / 512)) if spec.non_square else rows
    n = int(rng.integers(preset.n_slices[0], preset.n_slices[1] + 1))
    z_scale = rng.uniform(*style.height)
    c_length = z_scale * (sum(C_HEIGHTS) + C1_C2_GAP + 5 * DISC_HEIGHT)
    # The skull base above C1 comes on top of the cervical share, so the thorax keeps its share.
    context_rng = _context_rng(spec, seed)
    head = _head_cover(context_rng)
    dz = round((c_length + head) / (rng.uniform(*style.c_share) * n), 2)
    coverage = n * dz
    ps = round(rng.uniform(*preset.fov_mm) / rows, 4)
    size = rng.uniform(*style.size)
    shift = rng.uniform(-0.05, 0.05, size=2) * rows
    levels = _levels(
        spec.labels,
        head + coverage * rng.uniform(0.03, 0.08),
        z_scale,
        coverage,
        size,
        preset.crack_px * ps,
        rng,
        style,
        look,
    )
    return Geometry(
        rows=rows,
        cols=cols,
        n_slices=n,
        pixel_spacing=ps,
        dz=dz,
        thickness=round(dz * rng.uniform(*style.thickness), 2),
        z_top=round(rng.uniform(-250.0, 50.0), 1),
        origin_xy=(
            round(-(cols - 1) / 2 * ps + rng.uniform(-15, 15), 3),
            round(-(rows - 1) / 2 * ps + rng.uniform(-15, 15), 3),
        ),
        centre_px=((rows - 1) / 2 + shift[0], (cols - 1) / 2 + shift[1]),
        rotation=np.deg2rad(rng.uniform(*style.rotation)),
        size=size,
        neck_axes=(rng.uniform(50.0, 58.0), rng.uniform(44.0, 50.0)),
        fat=rng.uniform(4.0, 8.0),
        airway=rng.uniform(5.0, 8.0),
        spine_v=rng.uniform(0.0, 4.0),
        lordosis=rng.uniform(*style.lordosis),
        levels=levels,
        soft=rng.uniform(*style.soft),
        cortical=rng.uniform(*style.cortical),
        cancellous=rng.uniform(*style.cancellous),
        noise=rng.uniform(*style.noise),
        context=_context(context_rng, head, levels, z_scale),
        blur=float(look.uniform(*style.blur)),
        z_samples=style.z_samples,
    )


# ---- rendering --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Pixel coordinates of one study in the neck frame (mm; u left-right, v anterior ->
    posterior, origin at the neck centre, rotated with the neck). ``roi`` is the window that can
    hold spine voxels; ``u_roi``/``v_roi`` are its views."""

    u: np.ndarray  # (H, W) float32
    v: np.ndarray  # (H, W) float32
    roi: tuple[slice, slice]

    @property
    def u_roi(self) -> np.ndarray:
        return self.u[self.roi]

    @property
    def v_roi(self) -> np.ndarray:
        return self.v[self.roi]


def make_grid(geom: Geometry) -> Grid:
    """Neck-frame coordinates of every pixel and the spine window."""
    ps = geom.pixel_spacing
    rows = (np.arange(geom.rows, dtype=np.float32) - geom.centre_px[0]) * ps
    cols = (np.arange(geom.cols, dtype=np.float32) - geom.centre_px[1]) * ps
    dy, dx = np.meshgrid(rows, cols, indexing="ij")
    cos, sin = np.float32(np.cos(geom.rotation)), np.float32(np.sin(geom.rotation))
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    # Spine centre in pixels, and a radius that holds the largest (thoracic) vertebra.
    centre_v = geom.spine_v + 14.0 * geom.size
    r0 = geom.centre_px[0] + cos * centre_v / ps
    c0 = geom.centre_px[1] - sin * centre_v / ps
    radius = (34.0 * geom.size * T_SCALE + geom.lordosis) / ps + 2
    roi = (
        slice(max(0, int(r0 - radius)), min(geom.rows, int(r0 + radius) + 1)),
        slice(max(0, int(c0 - radius)), min(geom.cols, int(c0 + radius) + 1)),
    )
    return Grid(u, v, roi)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float) -> np.ndarray:
    return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 <= 1.0


def _ring(u: np.ndarray, v: np.ndarray, cv: float, a: float, b: float, t: float) -> np.ndarray:
    """Elliptical band ``t`` mm thick centred at (0, ``cv``) mm."""
    return _ellipse(u, v, 0.0, cv, a, b) & ~_ellipse(u, v, 0.0, cv, a - t, b - t)


def _canal(size: float) -> tuple[float, float, float]:
    """Spinal canal centre v and semi-axes (mm) relative to the body centre."""
    a, b = 11.0 * size, 7.0 * size
    return 7.5 * size + b - 1.0, a, b


def _shell(
    u: np.ndarray, v: np.ndarray, cv: float, a: float, b: float, t: float
) -> tuple[np.ndarray, np.ndarray]:
    """(cortical, cancellous) masks of an elliptical bone centred at (0, ``cv``) mm with a
    cortical shell ``t`` mm thick."""
    return _ring(u, v, cv, a, b, t), _ellipse(u, v, 0.0, cv, a - t, b - t)


def _body(
    level: Level, u: np.ndarray, v: np.ndarray, depth: float, geom: Geometry
) -> tuple[np.ndarray, np.ndarray]:
    """(cortical, cancellous) masks of a vertebral body (C2 and below; C1 has none)."""
    s = geom.size * level.scale
    shell = max(1.5 * geom.size, 1.2 * geom.pixel_spacing)  # at least a pixel, even when tiny
    cortical, cancellous = _shell(u, v, 0.0, 9.0 * s, 7.5 * s, shell)
    if min(depth - level.top, level.bottom - depth) < 1.2:  # endplates are solid cortex
        return cortical | cancellous, np.zeros_like(cancellous)
    return cortical, cancellous


def _dens(u: np.ndarray, v: np.ndarray, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(cortical, cancellous) masks of the C2 dens, which rises inside the C1 ring."""
    shell = max(1.2 * geom.size, 1.2 * geom.pixel_spacing)
    return _shell(u, v, 1.0 * geom.size, 3.5 * geom.size, 3.5 * geom.size, shell)


def _atlas(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """C1 (cortical mask): a ring around the dens and the canal, lateral masses, transverse
    processes."""
    cv, ca, cb = _canal(size)
    front, back = -6.75 * size, cv + cb + 3.5 * size
    vm, b1, a1 = (front + back) / 2, (back - front) / 2, ca + 5.0 * size
    t = 3.5 * size
    ring = _ring(u, v, vm, a1, b1, t)
    masses = _ellipse(np.abs(u), v, 11.5 * size, 6.0 * size, 3.5 * size, 5.0 * size)
    transverse = (np.abs(v - vm) < 2.5 * size) & (np.abs(u) > a1 - 1.0)
    return ring | masses | (transverse & (np.abs(u) < a1 + 9.0 * size))


def _arch(level: Level, u: np.ndarray, v: np.ndarray, geom: Geometry) -> np.ndarray:
    """Posterior elements (cortical mask) of C2 and below: the half ring behind the body around
    the canal, the spinous process and the transverse processes."""
    cv, ca, cb = _canal(geom.size)
    s = geom.size * level.scale
    t = 3.0 * s
    ring = _ring(u, v, cv, ca + t, cb + t, t) & (v >= 0)
    spine_len = SPINOUS.get(level.label, T_SPINOUS) * s
    spinous = (np.abs(u) < 1.75 * s) & (v >= cv + cb) & (v <= cv + cb + t + spine_len)
    transverse = (np.abs(v - (cv - 0.3 * cb)) < 2.0 * s) & (np.abs(u) > 0.8 * ca)
    reach = (11.0 if level.label == 7 else 8.0) * s  # C7's transverse processes are the longest
    return ring | spinous | (transverse & (np.abs(u) < ca + reach))


def _crack_band(
    crack: Crack, u: np.ndarray, v: np.ndarray, depth_offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """(signed distance to the crack plane in mm, |distance| < width / 2) on one slice;
    ``depth_offset``: mm from the vertebra's mid depth."""
    nu, nv = float(np.cos(crack.angle)), float(np.sin(crack.angle))
    dist = (u - crack.anchor[0]) * nu + (v - crack.anchor[1]) * nv - crack.slope * depth_offset
    return dist, np.abs(dist) < crack.width / 2


def _part_coords(
    cracks: tuple[Crack, ...], part: str, u: np.ndarray, v: np.ndarray, depth_offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates at which to evaluate ``part``: the fragment beyond a displaced crack is
    stepped off along the crack line."""
    for crack in cracks:
        if crack.part == part and crack.shift:
            dist, _ = _crack_band(crack, u, v, depth_offset)
            step = (dist > 0) * np.float32(crack.shift)
            return u + step * float(np.sin(crack.angle)), v - step * float(np.cos(crack.angle))
    return u, v


@dataclass(frozen=True)
class VertebraMasks:
    """(h, w) bool masks of one vertebra on one slice, in the spine window."""

    cortical: np.ndarray
    cancellous: np.ndarray
    crack: np.ndarray  # bone replaced (contrast 1) or thinned (less) by soft tissue
    crack_cancellous: np.ndarray  # the part of ``crack`` that was cancellous bone
    contrast: float = 1.0

    @property
    def bone(self) -> np.ndarray:
        """Every voxel of the vertebra (its segmentation label), cracks included."""
        return self.cortical | self.cancellous | self.crack


def _vertebra(
    level: Level, kind: str, u: np.ndarray, v: np.ndarray, depth: float, geom: Geometry
) -> VertebraMasks:
    """Masks of ``level`` at ``depth``; ``kind`` "dens" draws only the C2 dens (at C1 depths).

    ``u``, ``v``: (h, w) float32 mm in the frame of the vertebra's body centre.
    """
    offset = depth - (level.top + level.bottom) / 2
    bu, bv = _part_coords(level.cracks, "body", u, v, offset)
    au, av = _part_coords(level.cracks, "arch", u, v, offset)
    none = np.zeros(u.shape, dtype=bool)
    if kind == "dens":
        (cortical, cancellous), arch = _dens(bu, bv, geom), none
    elif level.label == 1:
        cortical, cancellous, arch = none, none, _atlas(au, av, geom.size)
    else:
        (cortical, cancellous), arch = _body(level, bu, bv, depth, geom), _arch(level, au, av, geom)
    body = cortical | cancellous
    crack = none.copy()
    drawn = [c for c in level.cracks if c.cuts(offset)]
    for c in drawn:
        band = _crack_band(c, u, v, offset)[1]
        crack |= band & (body if c.part == "body" else arch & ~body)
    contrast = max((c.contrast for c in drawn), default=1.0)
    return VertebraMasks(
        (cortical | arch) & ~crack, cancellous & ~crack, crack, crack & cancellous, contrast
    )


@dataclass
class SliceRender:
    """One rendered slice: HU (H, W) float32 without noise, labels (H, W) uint8, and per
    fractured vertebra the box of its crack pixels in full-image pixel units."""

    hu: np.ndarray
    labels: np.ndarray
    boxes: dict[int, tuple[int, int, int, int]]  # label -> (x, y, width, height)


def _levels_at(geom: Geometry, depth: float) -> tuple[list[tuple[Level, str]], Level | None]:
    """Bone parts present at ``depth`` as (level, "vertebra" | "dens"), and the level below a
    disc at this depth (None when there is no disc)."""
    parts, disc = [], None
    levels = geom.levels
    dens_top = levels[0].top + 0.2 * (levels[0].bottom - levels[0].top)
    for k, level in enumerate(levels):
        if level.top <= depth < level.bottom:
            parts.append((level, "vertebra"))
        if level.label == 2 and dens_top <= depth < level.top:
            parts.append((level, "dens"))
        if level.label > 2 and levels[k - 1].bottom <= depth < level.top:
            disc = level
    return parts, disc


def _neck_axes(geom: Geometry, depth: float) -> tuple[float, float]:
    """Semi-axes (mm) of the body outline at ``depth``: the neck, widening into the head above
    C1 and into the shoulders below C7."""
    ctx = geom.context
    c1_top, c7_bottom = geom.levels[0].top, geom.levels[6].bottom
    grow = 1.0 + ctx.shoulder * max(0.0, depth - c7_bottom) / geom.coverage
    if depth < c1_top:
        grow += 0.25 * (c1_top - depth) / max(ctx.head, 1.0)
    return geom.neck_axes[0] * grow, geom.neck_axes[1] * grow


def _draw_neck(hu: np.ndarray, grid: Grid, geom: Geometry, depth: float) -> None:
    """Fat-lined soft-tissue neck with its airway into ``hu`` (H, W)."""
    a, b = _neck_axes(geom, depth)
    hu[_ellipse(grid.u, grid.v, 0.0, 0.0, a, b)] = FAT
    hu[_ellipse(grid.u, grid.v, 0.0, 0.0, a - geom.fat, b - geom.fat)] = geom.soft
    hu[_ellipse(grid.u, grid.v, 0.0, -0.45 * b, geom.airway, geom.airway)] = AIR


def _capsule(u: np.ndarray, v: np.ndarray, p: tuple, q: tuple, r: float) -> np.ndarray:
    """Points within ``r`` mm of the segment ``p``-``q`` (mm, (u, v))."""
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * du + (v - p[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return (u - p[0] - t * du) ** 2 + (v - p[1] - t * dv) ** 2 <= r * r


def context_bone(geom: Geometry, u: np.ndarray, v: np.ndarray, depth: float) -> np.ndarray:
    """Bone outside the spine at ``depth`` (mask over the full slice): the skull base and its
    occipital condyles above C1, the mandible, the clavicles and the ribs of the thoracic
    levels. Shapes follow the outline's axes, so they sit where they would in that body."""
    ctx, size = geom.context, geom.size
    a, b = _neck_axes(geom, depth)
    canal_v = geom.spine_v + _canal(size)[0]
    c1_top = geom.levels[0].top
    bone = np.zeros(u.shape, dtype=bool)
    if c1_top - ctx.head <= depth < c1_top:
        # The occipital bone: a posterior bowl that closes in on the foramen magnum near C1.
        f = 0.45 + 0.55 * (c1_top - depth) / max(ctx.head, 1.0)
        bone |= _ring(u, v, canal_v, 0.8 * a * f, 0.7 * b * f, 6.0) & (v > canal_v - 0.3 * b * f)
        if c1_top - depth < 7.0:  # the condyles resting on the C1 lateral masses
            bone |= _ellipse(np.abs(u), v, 11.5 * size, geom.spine_v + 6.0 * size, 5.0, 5.0)
    if ctx.mandible[0] <= depth < ctx.mandible[1]:
        bone |= _ring(u, v, -0.05 * b, 0.72 * a, 0.85 * b, 5.0) & (v < -0.2 * b)
    if abs(depth - ctx.clavicle) < 7.0:
        lift = 0.6 * (depth - ctx.clavicle)  # they rise laterally: the bar moves with depth
        for side in (-1.0, 1.0):
            p, q = (side * 0.12 * a, -0.85 * b), (side * 0.95 * a, -0.3 * b + lift)
            bone |= _capsule(u, v, p, q, 5.0)
    for level in geom.levels[7:]:  # a pair of ribs leaves each thoracic vertebra
        mid, half = (level.top + level.bottom) / 2, 0.3 * (level.bottom - level.top)
        if abs(depth - mid) < half:
            rib = _ring(u, v, geom.spine_v - 8.0, 0.65 * a, 0.6 * b, 4.5)
            bone |= rib & (np.abs(u) > 16.0 * size) & (v > -0.45 * b)
    return bone & _ellipse(u, v, 0.0, 0.0, a - geom.fat, b - geom.fat)


def _draw_context(hu: np.ndarray, grid: Grid, geom: Geometry, depth: float) -> None:
    """The lung apices (air) and the bone around the spine into ``hu`` (H, W)."""
    ctx = geom.context
    a, _ = _neck_axes(geom, depth)
    if depth > ctx.lung_top:
        r = 0.3 * a * min(1.0, np.sqrt((depth - ctx.lung_top) / 40.0))
        lungs = _ellipse(np.abs(grid.u), grid.v, 0.5 * a, geom.spine_v, r, 1.2 * r)
        hu[lungs] = LUNG
    hu[context_bone(geom, grid.u, grid.v, depth)] = geom.cortical


def _spine_frame(grid: Grid, geom: Geometry, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Spine-window coordinates relative to the vertebral body centre at ``depth``; the
    cervical spine bows forward (lordosis), most at its middle."""
    top, bottom = geom.levels[0].top, geom.levels[6].bottom
    mid = (top + bottom) / 2
    bow = max(0.0, 1.0 - ((depth - mid) / (bottom - mid)) ** 2)
    return grid.u_roi, grid.v_roi - np.float32(geom.spine_v - geom.lordosis * bow)


def render_slice(geom: Geometry, grid: Grid, index: int, offset: float = 0.0) -> SliceRender:
    """Slice ``index`` (head -> feet) of the phantom, ``offset`` mm feet-ward of its centre."""
    depth = (index + 0.5) * geom.dz + offset
    hu = np.full((geom.rows, geom.cols), AIR, dtype=np.float32)
    labels = np.zeros((geom.rows, geom.cols), dtype=np.uint8)
    _draw_neck(hu, grid, geom, depth)
    _draw_context(hu, grid, geom, depth)
    u, v = _spine_frame(grid, geom, depth)
    roi_hu, roi_labels = hu[grid.roi], labels[grid.roi]  # views: drawing on them draws on hu
    cv, ca, cb = _canal(geom.size)
    roi_hu[_ellipse(u, v, 0.0, cv, ca, cb)] = CANAL
    parts, disc = _levels_at(geom, depth)
    if disc is not None:
        s = geom.size * disc.scale
        roi_hu[_ellipse(u, v, 0.0, 0.0, 9.0 * s, 7.5 * s)] = DISC
    boxes = {}
    for level, kind in parts:
        masks = _vertebra(level, kind, u, v, depth, geom)
        roi_hu[masks.cortical] = geom.cortical
        roi_hu[masks.cancellous] = geom.cancellous
        # Partial volume: a crack keeps (1 - contrast) of its bone's excess over soft tissue.
        keep = 1.0 - masks.contrast
        roi_hu[masks.crack] = geom.soft + keep * (geom.cortical - geom.soft)
        roi_hu[masks.crack_cancellous] = geom.soft + keep * (geom.cancellous - geom.soft)
        roi_labels[masks.bone] = level.label
        if masks.crack.any():
            rr, cc = np.nonzero(masks.crack)
            x, y = cc.min() + grid.roi[1].start, rr.min() + grid.roi[0].start
            boxes[level.label] = (int(x), int(y), int(np.ptp(cc)) + 1, int(np.ptp(rr)) + 1)
    return SliceRender(hu, labels, boxes)


def acquire_slice(geom: Geometry, grid: Grid, index: int) -> SliceRender:
    """The slice as the scanner reconstructs it: HU averaged over ``z_samples`` depths across
    the slice thickness, then blurred in-plane; labels and boxes of the slice centre."""
    render = render_slice(geom, grid, index)
    if geom.z_samples > 1:
        depths = np.linspace(-geom.thickness / 2, geom.thickness / 2, geom.z_samples + 2)[1:-1]
        sub = [render_slice(geom, grid, index, d).hu for d in depths]
        render.hu = np.mean(sub, axis=0, dtype=np.float32)
    if geom.blur > 0:
        render.hu = cv2.GaussianBlur(render.hu, (0, 0), geom.blur)
    return render


# ---- writing ----------------------------------------------------------------------------------
def _file_number(spec: StudySpec, n_slices: int, index: int) -> int:
    """File number of head -> feet slice ``index``; reversed studies number feet -> head."""
    return spec.first_number + (n_slices - 1 - index if spec.reversed else index)


def write_study(spec: StudySpec, preset: Preset, seed: int, root: Path) -> tuple[list[tuple], int]:
    """Render and write one study (DICOM files, and its segmentation when ``spec.segmented``).

    Returns the fracture-box rows ``(uid, x, y, width, height, slice_number)`` (empty unless
    ``spec.boxes``) and the number of slices.
    """
    geom = make_geometry(spec, preset, seed)
    grid = make_grid(geom)
    noise_rng = np.random.default_rng([seed, 3 if spec.split == "train" else 4, spec.index])
    folder = root / f"{spec.split}_images" / spec.uid
    series_uid = f"{spec.uid}.1"
    ps = geom.pixel_spacing
    seg = np.zeros((geom.n_slices, geom.rows, geom.cols), np.uint8) if spec.segmented else None
    boxes = []
    for i in range(geom.n_slices):
        render = acquire_slice(geom, grid, i)
        noise = noise_rng.standard_normal(render.hu.shape, dtype=np.float32)
        number = _file_number(spec, geom.n_slices, i)
        write_slice(
            folder / f"{number}.dcm",
            render.hu + np.float32(geom.noise) * noise,
            study_uid=spec.uid,
            series_uid=series_uid,
            sop_uid=f"{series_uid}.{number}",
            instance_number=number,
            position=(*geom.origin_xy, round(geom.z_top - i * geom.dz, 3)),
            pixel_spacing=(ps, ps),
            slice_thickness=geom.thickness,
            rescale_intercept=spec.rescale_intercept,
            pixel_representation=spec.pixel_representation,
            transfer_syntax=spec.syntax,
        )
        if seg is not None:
            seg[i] = render.labels
        if spec.boxes:
            boxes += [(spec.uid, *box, number) for _, box in sorted(render.boxes.items())]
    if seg is not None:
        save_rsna_seg(
            root / "segmentations" / f"{spec.uid}.nii",
            seg,
            pixel_spacing=(ps, ps),
            z_spacing=geom.dz,
        )
    log.debug("%s %s: %d slices", spec.split, spec.uid, geom.n_slices)
    return boxes, geom.n_slices


def _write_study_job(job: tuple[StudySpec, Preset, int, Path]) -> tuple[list[tuple], int]:
    return write_study(*job)


def _label_frame(specs: list[StudySpec]) -> pd.DataFrame:
    """train.csv schema: StudyInstanceUID, patient_overall, C1..C7 (0/1 ints)."""
    rows = [(s.uid, int(any(s.labels)), *s.labels) for s in specs]
    return pd.DataFrame(rows, columns=LABEL_COLS)


def _write_tables(specs: list[StudySpec], boxes: list[tuple], root: Path) -> None:
    """The competition CSVs plus test_labels.csv."""
    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    write_csv(_label_frame(test), root / "test_labels.csv")
    if train:  # a test-only set (preset unseen) has no training half at all
        write_csv(_label_frame(train), root / "train.csv")
        box_frame = pd.DataFrame(boxes, columns=BOX_COLS).astype(
            {"x": float, "y": float, "width": float, "height": float, "slice_number": int}
        )
        write_csv(box_frame, root / "train_bounding_boxes.csv")
    types = [*VERTEBRAE, "patient_overall"]
    test_rows = [(f"{s.uid}_{t}", s.uid, t) for s in test for t in types]
    test_frame = pd.DataFrame(test_rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    write_csv(test_frame, root / "test.csv")
    write_csv(test_frame[["row_id"]].assign(fractured=0.5), root / "sample_submission.csv")


def _move_into_place(partial: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty, or an old dataset) by the finished ``partial`` folder."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        partial.rename(out)


def generate(
    out: str | Path, preset: str = "tiny", seed: int = 0, workers: int = 1, overwrite: bool = False
) -> dict:
    """Write a synthetic dataset of ``preset`` into ``out``; returns a summary.

    ``workers`` > 1 renders studies in that many processes (the output does not depend on it).
    Raises ``InputError`` when ``out`` is a non-empty folder and ``overwrite`` is false.
    Summary keys: preset, seed, train_studies, test_studies, train_positives, test_positives,
    segmented, box_studies, box_rows, slices, reversed, start_at_2, non_square, syntaxes
    (syntax -> studies), signed, seconds.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: folder not empty; pass --overwrite to replace it")
    start = time.perf_counter()
    config = PRESETS[preset]
    specs = plan_dataset(config, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        subs = ("train_images", "segmentations") if config.n_train else ()
        for sub in (*subs, "test_images"):
            (partial / sub).mkdir(parents=True)
        jobs = [(spec, config, seed, partial) for spec in specs]
        if workers > 1:
            with mp.Pool(min(workers, len(jobs))) as pool:
                results = pool.map(_write_study_job, jobs, chunksize=1)
        else:
            results = [_write_study_job(job) for job in jobs]
        boxes = [row for rows, _ in results for row in rows]
        _write_tables(specs, boxes, partial)
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary = _summary(preset, seed, specs, boxes, sum(n for _, n in results))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    log.info("wrote %s dataset to %s: %s", preset, out, summary)
    return summary


def _summary(
    preset: str, seed: int, specs: list[StudySpec], boxes: list[tuple], slices: int
) -> dict:
    def count(split: str, test) -> int:
        return sum(1 for s in specs if (split == "all" or s.split == split) and test(s))

    syntaxes: dict[str, int] = {}
    for s in specs:
        syntaxes[s.syntax] = syntaxes.get(s.syntax, 0) + 1
    return {
        "preset": preset,
        "seed": seed,
        "train_studies": count("train", lambda s: True),
        "test_studies": count("test", lambda s: True),
        "train_positives": count("train", lambda s: any(s.labels)),
        "test_positives": count("test", lambda s: any(s.labels)),
        "segmented": count("train", lambda s: s.segmented),
        "box_studies": count("train", lambda s: s.boxes),
        "box_rows": len(boxes),
        "slices": slices,
        "reversed": count("all", lambda s: s.reversed),
        "start_at_2": count("all", lambda s: s.first_number == 2),
        "non_square": count("all", lambda s: s.non_square),
        "syntaxes": syntaxes,
        "signed": count("all", lambda s: s.pixel_representation == 1),
    }


def main(argv: list[str] | None = None) -> dict:
    return cli.generator(__doc__, generate, PRESETS, argv)


if __name__ == "__main__":
    main()
