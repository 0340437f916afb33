"""Phantom neck CTs in the RSNA 2022 competition layout: an evaluation set from a second generator.

Usage::

    python -m utils.rsna.synthetic.phantom --out DIR --studies N --seed S [--size 512] [--train-studies M]
        [--workers 2] [--overwrite]

    python -m utils.rsna.cross_style --CFG config/rsna/patient_head.yaml --data-dir DIR ...

The training and demo data come from utils/rsna/synthetic/generator.py; a chain trained on them and scored
on the same generator's output learns that generator. This module draws "a data set in the
competition's format by a generator the project did not write": its own anatomy, acquisition,
fracture shapes and DICOM writer (pydicom + imagecodecs here, nothing from the repo's writer),
and imports no geometry from generator.py. It is for evaluation only.

Anatomy (world frame DICOM LPS, mm: x to the patient's left, y posterior, z to the head). A spine
centre line with a per-study lordosis (or a straight, collar-like neck), head rotation fading
down to C7 and a slight lateral curve carries C1..C7 and T1..T4; each vertebra is a union of
superquadric blocks and capsules in its own tilted frame, drawn as a cortical shell around
cancellous bone with a trabecular texture:

- C1: a ring without a body (anterior arch and tubercle, lateral masses, posterior arch, wide
  transverse processes); C2: a body with the dens rising into the C1 ring, pars, a large bifid
  spinous process; C3..C7: body with uncinate processes, pedicles, articular pillars, laminae,
  transverse processes around a vertebral-artery foramen, spinous process (bifid C3..C6, long
  C7); T1..T4: rounder bodies, posterolateral transverse processes, steep spinous processes.
- Discs between the bodies (none between C1 and C2), spinal canal with cord, pharynx / larynx
  air above C6 and trachea, oesophagus and thyroid below, carotids and jugulars, neck fat and
  muscle widening into the head above and the shoulders below, lung apices, skull base (vault
  shell with the foramen magnum, occipital condyles, mastoids), mandible with teeth, hyoid,
  calcified thyroid cartilage, manubrium, clavicles, first three ribs, the table.

Acquisition: pixel spacing 0.24..0.46 mm at 512 (the field of view is kept at other ``--size``),
slice spacing 0.6..1.25 mm with a thickness at or above it (the thickness is a tag only: each
slice samples its plane), up to 360 slices (median ~240); the scan starts in the skull base and
ends in T1..T3, except that a study may start inside C1 or below it, or end inside C7 or above
it (a vertebra cut by, or outside, the field of view); one study in seven has a 6-15 degree
gantry tilt; in-plane blur, Gaussian noise, the reconstruction circle.

Fractures (only on vertebrae the field of view holds whole; the labels follow the competition's
prevalences, C7 and C2 most often): oblique and transverse cortical breaks of a body, complete
or reaching part of it, some with a step-off; compression wedge (anterior height loss); a
displaced antero-inferior ("teardrop") fragment; lamina, pedicle (both sides at C2: hangman) and
spinous-process (clay-shoveler) fractures; dens fractures; C1 ring breaks (Jefferson). A break is
a plane: bone within its gap turns into haematoma, the fragment on one side may move.

Storage: Explicit VR Little Endian, RLE Lossless, JPEG-LS Lossless and JPEG Lossless SV1 studies;
12-bit unsigned, 16-bit signed (with or without padding outside the reconstruction circle) and
16-bit unsigned pixels; files ``1..N.dcm`` numbered head -> feet, feet -> head (numbering
reversed, or a feet-first patient position with a mirrored row direction) or in shuffled order.

Layout written under ``--out`` (built in a hidden sibling folder, moved into place when done)::

    test.csv  sample_submission.csv  test_images/<uid>/<n>.dcm
    test_labels.csv      answers for the test studies (train.csv schema): what
                         utils/rsna/cross_style.py scores against
    phantom_studies.csv  not in the Kaggle layout: one row per study with its acquisition,
                         storage, C1..C7 visibility (whole / cut / absent) and fractures
    train.csv  train_bounding_boxes.csv  train_images/<uid>/<n>.dcm    with --train-studies > 0

No train.csv by default: the test-time chain takes its train priors from ``<data>/train.csv``
when that file exists (else from the trained runs), so a train.csv beside evaluation studies
would change the predictions being evaluated. Deterministic for a seed, whatever ``--workers``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import cv2
import imagecodecs
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from utils import cli
from utils.errors import InputError
from utils.io import write_csv

log = logging.getLogger(__name__)

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
LEVELS = (*VERTEBRAE, "T1", "T2", "T3", "T4")
LABEL_COLUMNS = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
PREDICTION_TYPES = (*VERTEBRAE, "patient_overall")
UID_ROOT = "1.2.826.0.1.3680043"

# Competition train labels (2019 studies): fractured share, vertebrae per fractured patient, and
# how often each of C1..C7 is among the fractured ones.
POSITIVE_SHARE = 961 / 2019
VERTEBRAE_PER_POSITIVE = {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}
VERTEBRA_WEIGHTS = np.array([146, 285, 73, 108, 162, 277, 393], dtype=np.float64)
# Share of studies whose field of view holds each of C1..C7 whole (measured on 240 planned
# studies; a cut at C1 also cuts the dens of C2, one above C7 the spinous process of C6). Only
# whole vertebrae are fractured, so their weights are divided by it to keep the prevalences.
WHOLE_SHARE = np.array([0.83, 0.83, 1.0, 1.0, 1.0, 0.9, 0.8])

SIDES = ((1.0, "l"), (-1.0, "r"))  # +x is the patient's left in LPS
REFERENCE_SIZE = 512  # pixel spacings are drawn for 512 columns; other sizes keep the field of view
MAX_SLICES = 360

# Storage: transfer syntax -> pixel encodings it is written with. JPEG Lossless and JPEG-LS get
# unsigned samples (what their codecs take); imagecodecs' JPEG-LS writes 16-bit precision.
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_ls": JPEGLSLossless,
    "jpeg_lossless": JPEGLosslessSV1,
}
ENCODINGS = {  # name -> (PixelRepresentation, BitsStored, RescaleIntercept, stored value of padding)
    "u12": (0, 12, -1024.0, 0),
    "s16_padded": (1, 16, -1024.0, -2000),
    "s16_hu": (1, 16, 0.0, -1024),
    "u16": (0, 16, -1024.0, 0),
}
SYNTAX_ENCODINGS = {
    "explicit": ("u12", "s16_padded", "s16_hu"),
    "rle": ("s16_padded", "s16_hu"),
    "jpeg_ls": ("u16",),
    "jpeg_lossless": ("u12",),
}

# Per-dataset decks: each study takes the next card of a shuffled deck cycled from these lists,
# so every kind appears once a data set has as many studies as the list is long.
SYNTAX_DECK = ("explicit", "rle", "jpeg_ls", "explicit", "jpeg_lossless", "explicit")
ORDER_DECK = (
    "head_first",
    "feet_first",
    "reversed_numbers",
    "head_first",
    "shuffled_numbers",
    "head_first",
    "feet_first",
    "head_first",
)
TOP_DECK = ("cut_c1", "skull", "skull", "no_c1", *("skull",) * 8)
BOTTOM_DECK = ("cut_c7", "thorax", "thorax", "no_c7", *("thorax",) * 6)
TILT_DECK = (True, *(False,) * 6)
PROTOCOLS = (  # (slice thickness, slice spacing) mm; thin protocols are the common ones
    (0.625, 0.625),
    (0.625, 0.625),
    (0.6, 0.6),
    (0.75, 0.7),
    (1.0, 0.8),
    (0.9, 0.9),
    (1.0, 1.0),
    (1.25, 1.0),
    (1.25, 1.25),
)


# ---- primitives ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capsule:
    """Points within ``radius`` mm of the segment ``start``-``end`` ((3,) mm, the solid's frame)."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float
    part: str

    def bounds(self) -> np.ndarray:
        """(2, 3) local box (low, high corner) in mm."""
        ends = np.array([self.start, self.end])
        return np.stack([ends.min(0) - self.radius, ends.max(0) + self.radius])

    def evaluate(
        self, u: np.ndarray, v: np.ndarray, w: np.ndarray, shell: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inside, deep) bool masks: within the radius; farther than ``shell`` from the surface."""
        su, sv, sw = self.start
        du, dv, dw = (e - s for e, s in zip(self.end, self.start, strict=True))
        pu, pv, pw = u - su, v - sv, w - sw
        length2 = du * du + dv * dv + dw * dw
        t = np.clip((pu * du + pv * dv + pw * dw) / length2, 0.0, 1.0) if length2 else 0.0
        d2 = (pu - t * du) ** 2 + (pv - t * dv) ** 2 + (pw - t * dw) ** 2
        core = self.radius - shell
        deep = d2 <= core * core if core > 0 else np.zeros(d2.shape, bool)
        return d2 <= self.radius**2, deep


@dataclass(frozen=True)
class Block:
    """Superquadric ``(|x/hx|^p + |y/hy|^p)^(q/p) + |z/hz|^q <= 1`` around ``centre`` (mm).

    ``half``: (3,) half sizes in mm; ``p`` shapes the horizontal section (2: ellipse, larger:
    squarer), ``q`` the vertical profile (larger: flatter end plates, sharper rims).
    """

    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    p: float
    q: float
    part: str

    def bounds(self) -> np.ndarray:
        c, h = np.array(self.centre), np.array(self.half)
        return np.stack([c - h, c + h])

    def evaluate(
        self, u: np.ndarray, v: np.ndarray, w: np.ndarray, shell: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inside, deep) bool masks; deep is the block shrunk by ``shell`` mm on every side."""
        x = np.abs(u - self.centre[0])
        y = np.abs(v - self.centre[1])
        z = np.abs(w - self.centre[2])
        inside = self._level(x, y, z, self.half) <= 1.0
        core = tuple(h - shell for h in self.half)
        if min(core) <= 0:
            return inside, np.zeros(inside.shape, bool)
        return inside, self._level(x, y, z, core) <= 1.0

    def _level(self, x, y, z, half) -> np.ndarray:
        flat = (x / half[0]) ** self.p + (y / half[1]) ** self.p
        return flat ** (self.q / self.p) + (z / half[2]) ** self.q


Primitive = Capsule | Block


@dataclass(frozen=True)
class Break:
    """A fracture plane through some parts of a solid (solid frame, mm).

    Bone of ``parts`` within ``gap``/2 of the plane through ``point`` with unit ``normal``, and
    within ``reach`` of ``point`` along the plane, turns into haematoma; the fragment of those
    parts on the normal's positive side is moved by ``shift`` (3,) mm.
    """

    kind: str
    parts: tuple[str, ...]
    point: tuple[float, float, float]
    normal: tuple[float, float, float]
    gap: float
    reach: float
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Wedge:
    """Compression of the ``body`` part: the anterior height shrinks by ``loss`` (0..1), linearly
    down to none at the posterior wall; the inferior end plate stays. Sizes in mm."""

    loss: float
    half_depth: float
    half_height: float


@dataclass(frozen=True, eq=False)
class Solid:
    """A bone (or disc) in its own frame: the union of ``prims`` minus ``cuts``.

    ``origin``: (3,) world mm; ``axes``: (3, 3), columns = the frame's u, v, w in world
    coordinates (u lateral, v posterior, w cranial for a vertebra). Voxels deeper than ``shell``
    mm take ``interior`` HU (+ the trabecular ``texture``: (3, 4) rows of wave vector rad/mm and
    phase, times ``texture_hu``), the rest ``cortical`` HU; break gaps take ``crack_hu``.
    ``boxes``: (P, 2, 3) world bounding boxes of the primitives and ``bounds`` (2, 3) their
    union, for culling.
    """

    name: str
    origin: np.ndarray
    axes: np.ndarray
    prims: tuple[Primitive, ...]
    shell: float
    cortical: float
    interior: float
    texture: np.ndarray | None = None
    texture_hu: float = 0.0
    cuts: tuple[Capsule, ...] = ()
    breaks: tuple[Break, ...] = ()
    wedge: Wedge | None = None
    crack_hu: float = 50.0
    boxes: np.ndarray | None = None
    bounds: np.ndarray | None = None


def with_boxes(solid: Solid) -> Solid:
    """``solid`` with the world boxes of its primitives (grown by any fragment shift, + 0.5 mm)."""
    margin = 0.5 + max((float(np.linalg.norm(b.shift)) for b in solid.breaks), default=0.0)
    boxes = []
    for prim in solid.prims:
        lo, hi = prim.bounds()
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        world = solid.origin + corners @ solid.axes.T
        boxes.append([world.min(0) - margin, world.max(0) + margin])
    boxes = np.array(boxes)
    bounds = np.stack([boxes[:, 0].min(0), boxes[:, 1].max(0)])
    return Solid(**{**solid.__dict__, "boxes": boxes, "bounds": bounds})


def z_extent(solid: Solid) -> tuple[float, float]:
    """(lowest, highest) world z (mm) of the solid."""
    return float(solid.boxes[:, 0, 2].min()), float(solid.boxes[:, 1, 2].max())


# ---- spine centre line --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Spine:
    """The spine's centre line, sampled every 0.5 mm of arc length.

    ``s``: (n,) mm, arc length from the top of C1 downwards (negative above it); ``points``:
    (n, 3) world mm; ``twist``: (n,) rad, axial rotation of the vertebral frames.
    """

    s: np.ndarray
    points: np.ndarray
    twist: np.ndarray

    def frame(self, s: float) -> tuple[np.ndarray, np.ndarray]:
        """(origin (3,), axes (3, 3)) at arc length ``s``: w along the line towards the head,
        v posterior, u to the patient's left, turned by the twist about w."""
        origin = np.array([np.interp(s, self.s, self.points[:, i]) for i in range(3)])
        ahead = np.array([np.interp(s - 1.0, self.s, self.points[:, i]) for i in range(3)])
        w = ahead - origin
        w /= np.linalg.norm(w)
        u = np.array([1.0, 0.0, 0.0]) - w[0] * w
        u /= np.linalg.norm(u)
        v = np.cross(w, u)
        twist = float(np.interp(s, self.s, self.twist))
        u, v = math.cos(twist) * u + math.sin(twist) * v, -math.sin(twist) * u + math.cos(twist) * v
        return origin, np.stack([u, v, w], axis=1)


def draw_spine(rng: np.random.Generator, top: np.ndarray) -> Spine:
    """A centre line starting at ``top`` ((3,) world mm, the top of C1).

    The sagittal angle runs linearly from the top angle to the bottom angle over 150 mm
    (lordosis: the neck bows forwards), or stays near 0 for a fifth of the patients (a
    straightened neck, as in a collar); head rotation fades out over 130 mm.
    """
    s = np.arange(-120.0, 280.0, 0.5)
    if rng.random() < 0.2:
        top_angle, bottom_angle = np.radians(rng.uniform(-6, 4, 2))
    else:
        top_angle, bottom_angle = np.radians([rng.uniform(-26, -6), rng.uniform(6, 30)])
    angle = top_angle + (bottom_angle - top_angle) * np.clip(s / 150.0, 0.0, 1.0)
    lateral = rng.uniform(-4, 4) * np.sin(np.pi * np.clip(s, 0, 200) / 200.0)
    step = np.diff(s, prepend=s[0])
    y = np.cumsum(np.sin(angle) * step)
    z = -np.cumsum(np.cos(angle) * step)
    zero = np.searchsorted(s, 0.0)
    points = np.stack([lateral, y - y[zero], z - z[zero]], axis=1) + top
    twist = np.radians(rng.uniform(-12, 12)) * np.clip(1.0 - s / 130.0, 0.0, 1.0)
    return Spine(s=s, points=points, twist=twist)


# ---- vertebrae ----------------------------------------------------------------------------------
# Adult sizes in mm: body half width, half depth, half height; disc height below; canal half
# width and depth behind the body; spinous-process length.
LEVEL_SIZES = {
    "C2": (8.5, 7.5, 8.5, 5.0, 11.5, 15.0, 14.0),
    "C3": (8.0, 7.3, 6.8, 5.2, 12.5, 13.5, 8.0),
    "C4": (8.4, 7.5, 6.8, 5.4, 12.5, 13.5, 9.0),
    "C5": (9.0, 7.7, 6.8, 5.4, 12.5, 13.5, 11.0),
    "C6": (9.8, 7.9, 6.9, 5.0, 12.5, 13.5, 15.0),
    "C7": (10.8, 8.2, 7.2, 4.6, 12.0, 13.5, 24.0),
    "T1": (12.0, 8.8, 8.0, 4.2, 9.5, 14.0, 26.0),
    "T2": (12.5, 10.0, 8.6, 4.2, 9.0, 14.0, 26.0),
    "T3": (12.8, 11.0, 9.0, 4.4, 9.0, 14.0, 27.0),
    "T4": (13.0, 12.0, 9.4, 4.4, 9.0, 14.0, 27.0),
}
C1_HALF_HEIGHT = 6.5  # the lateral masses; the arches are thinner
ATLANTO_AXIAL_GAP = 2.5  # mm from the bottom of C1 to the top of the C2 body's sides


@dataclass(frozen=True)
class Dims:
    """One level's sizes in mm (see ``LEVEL_SIZES``), after the patient's scale and jitter."""

    a: float
    b: float
    hh: float
    disc: float
    cw: float
    cd: float
    spinous: float


def draw_dims(rng: np.random.Generator, scale: float) -> dict[str, Dims]:
    """Per-level sizes: the table times the patient's ``scale`` times a 5 % jitter per level."""
    return {
        name: Dims(*(v * scale * rng.uniform(0.95, 1.05) for v in sizes))
        for name, sizes in LEVEL_SIZES.items()
    }


def plate(
    start: tuple[float, float, float],
    end: tuple[float, float, float],
    radius: float,
    part: str,
    height: float,
) -> list[Capsule]:
    """A rod grown into a vertical plate: capsules stacked along w over ``height`` mm (between
    the outer axes), at most one radius apart so the plate has no waist."""
    count = math.ceil(height / radius) + 1 if height > 0 else 1
    offsets = np.linspace(-height / 2, height / 2, count)
    return [
        Capsule((start[0], start[1], start[2] + dz), (end[0], end[1], end[2] + dz), radius, part)
        for dz in offsets.tolist()
    ]


Point = tuple[float, float, float]
Plate = tuple[Point, Point, float, float]  # start, end, radius, height: see plate()


def arch_side(tag: str, pedicle: Plate, pillar: tuple, lamina: Plate) -> list[Primitive]:
    """One side (``tag``) of a C3..T4 posterior arch, in the vertebra's frame (mm): the pedicle
    and lamina plates and the articular pillar between them (centre, half sizes, p, q: Block)."""
    (p0, p1, p_radius, p_height), (m0, m1, m_radius, m_height) = pedicle, lamina
    return [
        *plate(p0, p1, p_radius, f"pedicle_{tag}", p_height),
        Block(*pillar, f"lateral_{tag}"),
        *plate(m0, m1, m_radius, f"lamina_{tag}", m_height),
    ]


def atlas(c2: Dims) -> list[Primitive]:
    """C1 around the dens of C2: no body; frame origin on the spine line at mid-height."""
    front = -(c2.b + 4.5)
    prims: list[Primitive] = [
        *plate((-5.5, front, 0.0), (5.5, front, 0.0), 3.4, "arch_ant", 3.0),
        Capsule((0.0, front - 1.0, -1.5), (0.0, front - 2.5, 1.5), 2.6, "arch_ant"),
        *plate((0.0, 22.5, 1.5), (0.0, 26.5, 0.5), 3.2, "tubercle", 2.0),
        *plate((-3.5, 22.0, 1.5), (3.5, 22.0, 1.5), 2.6, "tubercle", 2.0),
    ]
    for sg, tag in SIDES:
        post = f"arch_post_{tag}"
        prims += [
            *plate((sg * 5.5, front, 0.0), (sg * 11.0, front + 5.0, 0.0), 3.2, "arch_ant", 3.0),
            Block((sg * 14.0, -1.5, 0.0), (6.5, 8.5, C1_HALF_HEIGHT), 2.4, 3.0, f"lateral_{tag}"),
            *plate((sg * 14.0, 6.0, 0.5), (sg * 10.5, 17.0, 1.0), 2.8, post, 2.5),
            *plate((sg * 10.5, 17.0, 1.0), (sg * 3.5, 22.0, 1.5), 2.6, post, 2.5),
            Capsule((sg * 19.0, -2.0, 0.0), (sg * 34.0, 0.0, -1.0), 4.0, f"transverse_{tag}"),
            Capsule((sg * 19.0, 4.5, 0.5), (sg * 31.0, 3.5, -1.0), 2.6, f"transverse_{tag}"),
        ]
    return prims


def dens_centre(d: Dims) -> float:
    """AP position (v, mm) of the dens axis in the C2 frame: behind the anterior body wall."""
    return -d.b + 5.5


def axis(d: Dims) -> list[Primitive]:
    """C2: body, dens rising 10 mm above it into the C1 ring, pars, bifid spinous process."""
    dv = dens_centre(d)
    prims: list[Primitive] = [
        Block((0.0, 0.0, 0.0), (d.a, d.b, d.hh), 2.6, 4.5, "body"),
        Capsule((0.0, dv, d.hh - 2.0), (0.0, dv + 0.8, d.hh + 10.0), 4.8, "dens"),
        *plate((0.0, d.b + d.cd, -2.5), (0.0, d.b + d.cd + d.spinous, -7.0), 3.8, "spinous", 3.0),
    ]
    tip = (0.0, d.b + d.cd + d.spinous, -7.0)
    for sg, tag in SIDES:
        prims += [
            Block((sg * (d.a + 1.5), 0.5, d.hh - 1.5), (5.5, 7.0, 3.5), 2.4, 3.0, f"lateral_{tag}"),
            *plate(
                (sg * (d.a - 2.0), d.b - 1.5, 0.5),
                (sg * (d.cw + 2.5), d.b + 8.0, -1.0),
                3.0,
                f"pedicle_{tag}",
                3.0,
            ),
            Block(
                (sg * (d.cw + 3.5), d.b + 8.5, -0.45 * d.hh),
                (4.5, 5.0, 0.6 * d.hh),
                2.4,
                3.5,
                f"lateral_{tag}",
            ),
            *plate(
                (sg * (d.cw + 3.0), d.b + 10.0, -1.5),
                (sg * 2.0, d.b + d.cd, -2.5),
                2.6,
                f"lamina_{tag}",
                5.0,
            ),
            Capsule(
                (sg * (d.a - 0.5), -0.5, -1.0),
                (sg * (d.a + 9.0), 1.5, -3.0),
                2.0,
                f"transverse_{tag}",
            ),
            Capsule(tip, (sg * 4.0, tip[1] + 3.5, tip[2] - 1.5), 2.6, "spinous"),
        ]
    return prims


def subaxial(d: Dims, bifid: bool) -> list[Primitive]:
    """C3..C7: body with uncinate processes, pedicles, pillars, laminae, transverse processes
    (an anterior and a posterior bar around the vertebral-artery foramen), spinous process."""
    tip = (0.0, d.b + d.cd + d.spinous, -1.5 - 0.45 * d.spinous)
    prims: list[Primitive] = [
        Block((0.0, 0.0, 0.0), (d.a, d.b, d.hh), 2.8, 5.0, "body"),
        *plate((0.0, d.b + d.cd, -1.5), tip, 2.4, "spinous", 3.0),
    ]
    for sg, tag in SIDES:
        bar_tip = (sg * (d.cw + 9.0), 1.5, -1.0)
        ped = ((sg * (d.a - 2.0), d.b - 1.5, 0.0), (sg * (d.cw + 1.5), d.b + 4.5, 0.0), 2.6, 3.0)
        pillar = ((sg * (d.cw + 4.0), d.b + 7.0, 0.0), (4.6, 5.2, d.hh + 1.0), 2.4, 3.5)
        lamina = ((sg * (d.cw + 2.5), d.b + 9.5, -0.5), (sg * 1.5, d.b + d.cd, -1.5), 1.9, 6.0)
        uncinate = ((sg * (d.a - 1.5), 0.5, d.hh - 0.5), (sg * (d.a - 1.0), 1.0, d.hh + 2.2))
        prims += [
            Capsule(*uncinate, 1.6, "body"),
            *arch_side(tag, ped, pillar, lamina),
            *plate((sg * (d.a - 0.5), -1.0, 0.0), bar_tip, 1.8, f"transverse_{tag}", 2.5),
            *plate((sg * (d.cw + 4.5), d.b + 3.5, 0.0), bar_tip, 1.8, f"transverse_{tag}", 2.5),
        ]
        if bifid:
            prims.append(Capsule(tip, (sg * 3.5, tip[1] + 3.0, tip[2] - 1.0), 1.7, "spinous"))
    return prims


def thoracic(d: Dims) -> list[Primitive]:
    """T1..T4: rounder body, thick pedicles, posterolateral transverse processes, steep spine."""
    end = (0.0, d.b + d.cd + 0.75 * d.spinous, -3.0 - 0.65 * d.spinous)
    prims: list[Primitive] = [
        Block((0.0, 0.0, 0.0), (d.a, d.b, d.hh), 2.3, 5.0, "body"),
        *plate((0.0, d.b + d.cd, -3.0), end, 3.0, "spinous", 3.0),
    ]
    for sg, tag in SIDES:
        ped = ((sg * (d.a - 3.0), d.b - 2.0, 1.0), (sg * (d.cw + 1.5), d.b + 6.0, 1.0), 3.4, 3.0)
        pillar = ((sg * (d.cw + 3.5), d.b + 8.5, 0.0), (4.2, 5.0, d.hh + 0.5), 2.4, 3.5)
        lamina = ((sg * (d.cw + 2.5), d.b + 10.5, -0.5), (sg * 1.5, d.b + d.cd, -3.0), 2.7, 6.0)
        prims += [
            *arch_side(tag, ped, pillar, lamina),
            Capsule(
                (sg * (d.cw + 3.5), d.b + 8.5, 1.0),
                transverse_tip(d, sg),
                4.2,
                f"transverse_{tag}",
            ),
        ]
    return prims


def transverse_tip(d: Dims, sign: float) -> tuple[float, float, float]:
    """Tip of a thoracic transverse process (vertebra frame, mm): where its rib starts."""
    return (sign * (d.cw + 21.0), d.b + 15.0, 0.0)


def disc(upper: Dims, lower: Dims, height: float) -> list[Primitive]:
    """An intervertebral disc of ``height`` mm, as wide as the mean of its two bodies."""
    a, b = 0.97 * (upper.a + lower.a) / 2, 0.97 * (upper.b + lower.b) / 2
    return [Block((0.0, 0.0, 0.0), (a, b, height / 2 + 0.6), 2.6, 3.0, "disc")]


# ---- materials ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bone:
    """A patient's bone HU: ``density`` (0.6 osteoporotic .. 1.15 dense) scales the values."""

    cortical: float
    cancellous: float
    shell: float
    texture_hu: float


def draw_bone(rng: np.random.Generator) -> Bone:
    density = rng.uniform(0.6, 1.15)
    return Bone(
        cortical=float(700 + 650 * density + rng.uniform(-60, 60)),
        cancellous=float(90 + 240 * density),
        shell=float(rng.uniform(0.9, 1.5)),
        texture_hu=float(rng.uniform(50, 120) * density),
    )


def texture(rng: np.random.Generator) -> np.ndarray:
    """(3, 4) trabecular pattern: three plane waves (wave vector rad/mm, phase) of 1.6-3.5 mm."""
    directions = rng.normal(size=(3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(1.6, 3.5, size=(3, 1))
    return np.concatenate([directions * k, rng.uniform(0, 2 * np.pi, (3, 1))], axis=1)


# ---- fractures ----------------------------------------------------------------------------------
KINDS = {
    "C1": ("jefferson", "posterior_arch", "anterior_arch"),
    "C2": ("dens", "dens", "hangman", "body_oblique", "teardrop"),
    "subaxial": (
        "wedge",
        "body_oblique",
        "body_transverse",
        "teardrop",
        "lamina",
        "pedicle",
        "spinous",
    ),
    "C7": ("wedge", "body_oblique", "body_transverse", "teardrop", "lamina", "spinous", "spinous"),
}


def unit(vector) -> tuple[float, float, float]:
    v = np.asarray(vector, dtype=np.float64)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def in_plane(rng: np.random.Generator, normal: tuple, size: float) -> tuple[float, float, float]:
    """A random shift of ``size`` mm perpendicular to ``normal`` (a step-off along the break)."""
    n = np.array(normal)
    r = rng.normal(size=3)
    r -= (r @ n) * n
    return tuple(float(x) for x in size * r / np.linalg.norm(r))


def capsule_of(prims: list[Primitive], part: str) -> Capsule:
    """The middle one of the longest capsules of ``part`` (a plate's middle layer): where a
    break through that part is placed."""
    caps = [p for p in prims if isinstance(p, Capsule) and p.part == part]
    lengths = [float(np.linalg.norm(np.subtract(c.end, c.start))) for c in caps]
    longest = sorted(
        (c for c, n in zip(caps, lengths, strict=True) if n > max(lengths) - 1e-6),
        key=lambda c: c.start[2],
    )
    return longest[len(longest) // 2]


def element_break(
    rng: np.random.Generator,
    prims: list[Primitive],
    part: str,
    kind: str,
    shift: float,
    down: bool = False,
) -> Break:
    """A break across the capsule of ``part`` at 30-75 % of its length, roughly perpendicular.

    ``down``: the outer fragment moves caudally and posteriorly (clay-shoveler avulsion).
    """
    cap = capsule_of(prims, part)
    start, end = np.array(cap.start), np.array(cap.end)
    point = start + rng.uniform(0.3, 0.75) * (end - start)
    normal = unit((end - start) / np.linalg.norm(end - start) + rng.normal(0, 0.3, 3))
    move = (0.0, shift * 0.4, -shift) if down else in_plane(rng, normal, shift)
    return Break(
        kind, (part,), tuple(point), normal, rng.uniform(0.6, 1.4), max(2.5 * cap.radius, 8.0), move
    )


def body_break(rng: np.random.Generator, d: Dims, kind: str) -> Break:
    """Oblique (plane 25-65 degrees from axial) or transverse (0-15) break of the body: through
    it, or a cortical break reaching 5-9 mm from a point on the anterior or lateral wall."""
    tilt = np.radians(rng.uniform(25, 65) if kind == "body_oblique" else rng.uniform(0, 15))
    azimuth = rng.uniform(0, 2 * np.pi)
    normal = unit(
        (math.sin(tilt) * math.cos(azimuth), math.sin(tilt) * math.sin(azimuth), math.cos(tilt))
    )
    height = rng.uniform(-0.6, 0.6) * d.hh
    if rng.random() < 0.5:
        point, reach = (rng.uniform(-0.4, 0.4) * d.a, rng.uniform(-0.4, 0.4) * d.b, height), 60.0
    else:
        around = rng.uniform(np.pi, 2 * np.pi)  # anterior half (v < 0)
        point = (0.92 * d.a * math.cos(around), 0.92 * d.b * math.sin(around), height)
        reach = rng.uniform(5, 9)
    shift = in_plane(rng, normal, rng.uniform(0.5, 2.0)) if rng.random() < 0.35 else (0, 0, 0)
    return Break(kind, ("body",), point, normal, rng.uniform(0.6, 1.6), reach, shift)


def teardrop(rng: np.random.Generator, d: Dims) -> Break:
    """The antero-inferior corner of the body cut off and moved forwards and down."""
    angle = np.radians(rng.uniform(35, 55))
    normal = unit((0.0, -math.cos(angle), -math.sin(angle)))
    point = (0.0, -0.45 * d.b, -0.35 * d.hh)
    shift = (0.0, -rng.uniform(1.5, 3.5), -rng.uniform(0.5, 2.0))
    return Break("teardrop", ("body",), point, normal, rng.uniform(0.6, 1.2), 60.0, shift)


def dens_break(rng: np.random.Generator, d: Dims) -> Break:
    """A transverse break through the base of the dens, the dens tilted or slid."""
    tilt = np.radians(rng.uniform(-20, 20))
    point = (0.0, dens_centre(d), d.hh + rng.uniform(0.0, 3.0))
    normal = unit((0.0, math.sin(tilt), math.cos(tilt)))
    shift = (rng.uniform(-1, 1), rng.uniform(-3, 3), 0.0)
    return Break("dens", ("dens",), point, normal, rng.uniform(0.8, 1.5), 30.0, shift)


def draw_fracture(
    rng: np.random.Generator, level: str, d: Dims, prims: list[Primitive]
) -> tuple[tuple[Break, ...], Wedge | None, str]:
    """One fracture of ``level``: its breaks, an optional wedge, and its kind."""
    table = KINDS.get(level, KINDS["subaxial"])
    kind = str(table[rng.integers(len(table))])
    side = SIDES[rng.integers(2)][1]
    if kind == "jefferson":
        arch = element_break(rng, prims, "arch_ant", kind, rng.uniform(1, 3))
        return (
            (arch, element_break(rng, prims, f"arch_post_{side}", kind, rng.uniform(1, 3))),
            None,
            kind,
        )
    if kind == "posterior_arch":
        return (
            (element_break(rng, prims, f"arch_post_{side}", kind, rng.uniform(0, 1.5)),),
            None,
            kind,
        )
    if kind == "anterior_arch":
        return (element_break(rng, prims, "arch_ant", kind, rng.uniform(0, 1.5)),), None, kind
    if kind == "dens":
        return (dens_break(rng, d),), None, kind
    if kind == "hangman":
        return (
            tuple(
                element_break(rng, prims, f"pedicle_{t}", kind, rng.uniform(0.5, 2.5))
                for _, t in SIDES
            ),
            None,
            kind,
        )
    if kind in ("body_oblique", "body_transverse"):
        return (body_break(rng, d, kind),), None, kind
    if kind == "teardrop":
        return (teardrop(rng, d),), None, kind
    if kind == "wedge":  # with a buckled anterior cortex just under the lowered front corner
        loss = rng.uniform(0.2, 0.45)
        corner = d.hh * (1 - 2 * loss) - 1.0
        buckle = Break(
            "wedge",
            ("body",),
            (0.0, -d.b, corner),
            unit((0.0, -0.3, 1.0)),
            rng.uniform(0.6, 1.0),
            rng.uniform(5, 8),
        )
        return (buckle,), Wedge(loss, d.b, d.hh), kind
    if kind == "spinous":
        return (
            (element_break(rng, prims, "spinous", kind, rng.uniform(1, 3), down=True),),
            None,
            kind,
        )
    return (element_break(rng, prims, f"{kind}_{side}", kind, rng.uniform(0, 1.5)),), None, kind


# ---- the neck around the spine ------------------------------------------------------------------
@dataclass(frozen=True)
class Landmarks:
    """What the skin has to enclose, from the bones (mm): heights are world z, depths are
    distances in front of the spine line.

    ``skull_z``: bottom of the vault; ``head``: (half width, front, back) of the skull;
    ``jaw_z``: bottom of the mandible; ``jaw``: (half width, front) of the mandible;
    ``chest``: front of the manubrium and clavicles.
    """

    skull_z: float
    head: tuple[float, float, float]
    jaw_z: float
    jaw: tuple[float, float]
    chest: float


@dataclass(frozen=True, eq=False)
class Neck:
    """Soft tissue drawn around the spine on each slice.

    Profiles are (n,) arrays over the world heights ``z`` (mm, ascending): ``spine_x``,
    ``spine_y`` (the spine line), ``front_y`` (anterior wall of the vertebrae), ``canal_y``,
    ``half_width``, ``skin_front``, ``skin_back`` (skin outline, world mm). ``airway_top`` and
    ``airway_bottom`` (the bottom of C6; the trachea runs below it) are world z;
    ``lung_centres``: (2, 3) x offset from the spine line, world y, world z (mm) of the two lung
    apices, ``lung_radii``: (3,) mm; ``table_y``: world y of the table
    top under the spine, None without a table. Sizes in mm, values in HU.
    """

    z: np.ndarray
    spine_x: np.ndarray
    spine_y: np.ndarray
    front_y: np.ndarray
    canal_y: np.ndarray
    half_width: np.ndarray
    skin_front: np.ndarray
    skin_back: np.ndarray
    fat: float
    muscle_hu: float
    fat_hu: float
    airway_bottom: float
    airway_top: float
    pharynx: tuple[float, float]
    trachea_radius: float
    lung_centres: np.ndarray
    lung_radii: np.ndarray
    table_y: float | None


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


class Skeleton(NamedTuple):
    """A patient's spine line with each level's centre (z along the line, mm) and sizes."""

    spine: Spine
    centres: dict[str, float]
    dims: dict[str, Dims]


def draw_neck(rng: np.random.Generator, skeleton: Skeleton, marks: Landmarks) -> Neck:
    """Skin, airway, canal and lung profiles along z from the spine line and the bones."""
    spine, centres, dims = skeleton
    z = spine.points[::-1, 2]
    spine_x, spine_y = spine.points[::-1, 0], spine.points[::-1, 1]

    def height(s: float) -> float:
        return float(np.interp(s, spine.s, spine.points[:, 2]))

    level_z = np.array([height(centres[n]) for n in LEVELS])[::-1]
    c2 = dims["C2"]
    depth = np.array([c2.b + 8.0, *(dims[n].b for n in LEVELS[1:])])[::-1]  # C1: anterior arch
    canal = np.array([12.0, *(dims[n].b + dims[n].cd / 2 for n in LEVELS[1:])])[::-1]
    head = sigmoid((z - marks.skull_z) / 8.0)
    jaw = sigmoid((z - marks.jaw_z) / 5.0)
    shoulders = sigmoid((height(centres["T1"]) + 12.0 - z) / 10.0)
    margin = rng.uniform(8, 14)
    base_half, base_front, base_back = rng.uniform(48, 66), rng.uniform(50, 68), rng.uniform(52, 75)
    half_width = np.maximum.reduce(
        [
            base_half + rng.uniform(120, 170) * shoulders,
            (marks.jaw[0] + margin) * jaw,
            (marks.head[0] + margin) * head,
        ]
    )
    front = np.maximum.reduce(
        [
            base_front + 20 * shoulders,
            (marks.jaw[1] + margin) * jaw,
            (marks.head[1] + margin) * head,
            (marks.chest + margin) * shoulders,
        ]
    )
    back = np.maximum(base_back + 15 * shoulders, (marks.head[2] + margin) * head)
    t2, t2_y = height(centres["T2"]), float(np.interp(centres["T2"], spine.s, spine.points[:, 1]))
    radii = np.array([rng.uniform(22, 28), rng.uniform(28, 36), rng.uniform(40, 50)])
    apex = radii[0] + rng.uniform(16, 22)
    return Neck(
        z=z,
        spine_x=spine_x,
        spine_y=spine_y,
        front_y=spine_y - np.interp(z, level_z, depth),
        canal_y=spine_y + np.interp(z, level_z, canal),
        half_width=half_width,
        skin_front=spine_y - front,
        skin_back=spine_y + back,
        fat=rng.uniform(3, 12),
        muscle_hu=rng.uniform(40, 60),
        fat_hu=rng.uniform(-115, -80),
        airway_bottom=height(centres["C6"] + dims["C6"].hh),
        airway_top=marks.skull_z + 10.0,
        pharynx=(rng.uniform(10, 17), rng.uniform(5, 9)),
        trachea_radius=rng.uniform(7, 10),
        lung_centres=np.array([[sg * apex, t2_y - 12.0, t2 - 8.0] for sg, _ in SIDES]),
        lung_radii=radii,
        table_y=float((spine_y + back).max() + rng.uniform(1, 12)) if rng.random() < 0.85 else None,
    )


def profile(neck: Neck, table: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``table`` (one of the Neck's per-z arrays) at heights ``z`` (any shape, world mm)."""
    return np.interp(z, neck.z, table)


def paint_ellipse(
    image: np.ndarray, xs: np.ndarray, ys: np.ndarray, centre: tuple, radii: tuple, hu: float
) -> None:
    """Set ``hu`` inside an axis-aligned ellipse. ``xs``: (1, W), ``ys``: (H, 1) world mm;
    ``centre`` and ``radii`` (x, y) are scalars or (H, 1) per-row arrays (a tilted slice)."""
    cx, cy = (np.broadcast_to(np.asarray(c, np.float32), ys.shape) for c in centre)
    rx, ry = (np.broadcast_to(np.asarray(r, np.float32), ys.shape) for r in radii)
    rows = np.nonzero(((np.abs(ys - cy) <= ry) & (rx > 0) & (ry > 0))[:, 0])[0]
    if not rows.size:
        return
    r0, r1 = rows[0], rows[-1] + 1
    reach = float(rx[r0:r1].max())
    cols = np.nonzero(
        np.abs(xs[0] - float(cx[r0:r1].mean())) <= reach + abs(float(np.ptp(cx[r0:r1])))
    )[0]
    if not cols.size:
        return
    c0, c1 = cols[0], cols[-1] + 1
    dx = (xs[:, c0:c1] - cx[r0:r1]) / np.maximum(rx[r0:r1], 1e-3)
    dy = (ys[r0:r1] - cy[r0:r1]) / np.maximum(ry[r0:r1], 1e-3)
    inside = (dx * dx + dy * dy <= 1.0) & (rx[r0:r1] > 0) & (ry[r0:r1] > 0)
    image[r0:r1, c0:c1][inside] = hu


def soft_tissue(neck: Neck, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """(H, W) float32 HU of everything but the bones on one slice.

    ``xs``: (1, W), ``ys``: (H, 1), ``zs``: (H, 1) world mm of the pixel centres.
    """
    image = np.full((ys.shape[0], xs.shape[1]), -1000.0, np.float32)
    x0 = profile(neck, neck.spine_x, zs)
    half = profile(neck, neck.half_width, zs)
    front, back = profile(neck, neck.skin_front, zs), profile(neck, neck.skin_back, zs)
    if neck.table_y is not None:
        curve = neck.table_y - xs * xs / 1600.0
        image[(ys >= curve) & (ys <= curve + 7.0)] = 180.0
    centre_y, half_y = (front + back) / 2, (back - front) / 2
    paint_ellipse(image, xs, ys, (x0, centre_y), (half, half_y), neck.fat_hu)
    paint_ellipse(
        image, xs, ys, (x0, centre_y), (half - neck.fat, half_y - neck.fat), neck.muscle_hu
    )
    for lx, ly, lz in neck.lung_centres:
        scale = np.sqrt(np.clip(1 - ((zs - lz) / neck.lung_radii[2]) ** 2, 0, None))
        paint_ellipse(
            image,
            xs,
            ys,
            (x0 + lx, ly),
            (neck.lung_radii[0] * scale, neck.lung_radii[1] * scale),
            -850.0,
        )
    spine_front = profile(neck, neck.front_y, zs)
    canal = profile(neck, neck.canal_y, zs)
    paint_ellipse(image, xs, ys, (x0, canal), (8.5, 7.5), 12.0)
    paint_ellipse(image, xs, ys, (x0, canal), (5.0, 4.0), 35.0)
    for sg in (1, -1):
        paint_ellipse(image, xs, ys, (x0 + sg * 24, spine_front - 6), (3.5, 3.5), 42.0)
        paint_ellipse(image, xs, ys, (x0 + sg * 33, spine_front - 2), (5.5, 4.5), 38.0)
    above = (zs > neck.airway_bottom) & (zs < neck.airway_top)
    rx, ry = neck.pharynx
    paint_ellipse(image, xs, ys, (x0, spine_front - 4 - ry), (rx * above, ry * above), -1000.0)
    below = zs <= neck.airway_bottom
    tr = neck.trachea_radius
    trachea_y = spine_front - 11 - tr
    paint_ellipse(image, xs, ys, (x0, spine_front - 5), (8.0 * below, 4.0 * below), 30.0)
    paint_ellipse(image, xs, ys, (x0, trachea_y), ((tr + 1.5) * below, (tr + 1.5) * below), 120.0)
    paint_ellipse(image, xs, ys, (x0, trachea_y), (tr * below, tr * below), -1000.0)
    lobe = (zs <= neck.airway_bottom - 5) & (zs > neck.airway_bottom - 50)
    for sg in (1, -1):
        paint_ellipse(
            image, xs, ys, (x0 + sg * (tr + 9), trachea_y), (7.0 * lobe, 11.0 * lobe), 95.0
        )
    return image


# ---- other bones --------------------------------------------------------------------------------
def chain(points: list[tuple[float, float, float]], radius: float, part: str) -> list[Capsule]:
    """Capsules joining consecutive ``points`` (mm): a curved rod."""
    return [Capsule(a, b, radius, part) for a, b in pairwise(points)]


def mirrored(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The mirror image of ``points`` across x = 0 walked back, then ``points`` (which start on
    x = 0): a U-shaped path through the midline."""
    return [(-x, y, z) for x, y, z in reversed(points)] + points[1:]


def head_bones(
    rng: np.random.Generator, spine: Spine, bone: Bone, c2: Dims
) -> tuple[list[Solid], dict]:
    """Skull base (vault shell with the foramen magnum, condyles), mastoids, mandible, teeth, in
    the head frame (the spine frame at the top of C1: they turn with the head).

    Returns the solids and the Landmarks fields they set (skull_z, head, jaw_z, jaw).
    """
    origin, axes = spine.frame(0.0)
    hx, hy, hz = rng.uniform(64, 76), rng.uniform(76, 90), rng.uniform(52, 62)
    skull = Solid(
        "skull",
        origin,
        axes,
        prims=(
            Block((0.0, 5.0, 5.0 + hz), (hx, hy, hz), 2.2, 2.2, "vault"),
            *(
                Block((sg * 12.0, -1.0, 7.0), (6.0, 9.0, 5.0), 2.0, 2.0, "condyle")
                for sg, _ in SIDES
            ),
        ),
        shell=rng.uniform(5, 8),
        cortical=bone.cortical + 200,
        interior=35.0,
        cuts=(Capsule((0.0, 10.0, 0.0), (0.0, 10.0, 18.0), 13.0, "foramen"),),
    )
    mastoids = Solid(
        "mastoids",
        origin,
        axes,
        prims=tuple(
            Block((sg * 47.0, 14.0, 12.0), (8.0, 10.0, 13.0), 2.0, 2.0, "mastoid")
            for sg, _ in SIDES
        ),
        shell=2.0,
        cortical=bone.cortical,
        interior=-400.0,
    )
    low = -(ATLANTO_AXIAL_GAP + 2 * C1_HALF_HEIGHT + 2 * c2.hh + rng.uniform(2, 12))
    chin = -(c2.b + rng.uniform(68, 82))
    arc = [
        (0.0, chin, 0.0),
        (22.0, chin + 6, 0.0),
        (38.0, chin + 22, 0.0),
        (46.0, chin + 45, 0.0),
        (48.0, chin + 65, 0.0),
    ]
    body = [
        c
        for tier in (0.0, 9.0, 18.0)
        for c in chain([(x, y, low + tier) for x, y, _ in mirrored(arc)], 5.5, "mandible")
    ]
    ramus = [
        c
        for sg, _ in SIDES
        for dx in (0.0, 3.0)
        for c in chain(
            [(sg * (48.0 + dx), chin + 65, low), (sg * (51.0 + dx), chin + 70, 5.0)],
            5.0,
            "mandible",
        )
    ]
    mandible = Solid(
        "mandible",
        origin,
        axes,
        prims=tuple(body + ramus),
        shell=2.0,
        cortical=bone.cortical + 150,
        interior=bone.cancellous,
    )
    teeth = Solid(
        "teeth",
        origin,
        axes,
        prims=tuple(chain([(x, y, low + 27.0) for x, y, _ in mirrored(arc[:4])], 4.5, "teeth")),
        shell=1.5,
        cortical=2600.0,
        interior=1700.0,
    )
    marks = {
        "skull_z": float(origin[2]) + 5.0,
        "head": (hx, hy - 5.0, hy + 5.0),
        "jaw_z": float(origin[2]) + low - 5.5,
        "jaw": (59.0, -chin + 5.5),
    }
    return [skull, mastoids, mandible, teeth], marks


def neck_bones(
    rng: np.random.Generator, skeleton: Skeleton, bone: Bone
) -> tuple[list[Solid], float]:
    """Hyoid (C3), thyroid cartilage (C5), manubrium and clavicles (T2), ribs of T1..T3, and the
    depth of the chest wall they need (mm in front of the spine line)."""
    spine, centres, dims = skeleton
    solids = []
    o3, a3 = spine.frame(centres["C3"] + 4.0)
    b3 = dims["C3"].b
    hyoid = [(0.0, -(b3 + 38), 0.0), (12.0, -(b3 + 35), 0.0), (20.0, -(b3 + 25), 0.0)]
    solids.append(
        Solid(
            "hyoid",
            o3,
            a3,
            prims=tuple(chain(mirrored(hyoid), 2.2, "hyoid")),
            shell=1.0,
            cortical=700.0,
            interior=200.0,
        )
    )
    o5, a5 = spine.frame(centres["C5"])
    b5 = dims["C5"].b
    cartilage = [
        c
        for w in (-6.0, 0.0, 6.0)
        for c in chain(mirrored([(0.0, -(b5 + 24), w), (15.0, -(b5 + 10), w)]), 1.3, "cartilage")
    ]
    solids.append(
        Solid(
            "thyroid_cartilage",
            o5,
            a5,
            prims=tuple(cartilage),
            shell=1.3,
            cortical=float(rng.uniform(120, 450)),
            interior=60.0,
        )
    )
    o2, a2 = spine.frame(centres["T2"])
    b2 = dims["T2"].b
    front = -(b2 + rng.uniform(55, 70))
    clavicle = [
        (22.0, front, 15.0),
        (60.0, front + 12, 25.0),
        (110.0, front + 40, 32.0),
        (150.0, 5.0, 35.0),
    ]
    solids.append(
        Solid(
            "manubrium",
            o2,
            a2,
            prims=(Block((0.0, front, -5.0), (18.0, 6.0, 22.0), 2.2, 4.0, "manubrium"),),
            shell=1.5,
            cortical=bone.cortical - 150,
            interior=bone.cancellous,
        )
    )
    for sg, _ in SIDES:
        solids.append(
            Solid(
                "clavicle",
                o2,
                a2,
                prims=tuple(chain([(sg * x, y, z) for x, y, z in clavicle], 7.0, "clavicle")),
                shell=2.0,
                cortical=bone.cortical,
                interior=bone.cancellous,
            )
        )
    for level, grow in (("T1", 0.0), ("T2", 12.0), ("T3", 22.0)):
        o, a = spine.frame(centres[level])
        d = dims[level]
        for sg, _ in SIDES:
            tip = transverse_tip(d, sg)
            path = [
                tip,
                (sg * (52 + grow), d.b + 5, -6.0 - grow / 3),
                (sg * (58 + grow), -15.0, -14.0 - grow / 2),
                (sg * (45 + grow / 2), -(d.b + 40 + grow), -22.0 - grow),
                (sg * 25.0, -(d.b + 55 + grow), -28.0 - grow),
            ]
            solids.append(
                Solid(
                    f"rib_{level}",
                    o,
                    a,
                    prims=tuple(chain(path, 4.5, "rib")),
                    shell=1.5,
                    cortical=bone.cortical - 100,
                    interior=bone.cancellous,
                )
            )
    return solids, -front + 7.0


# ---- a study ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Acquisition:
    """Where the slices lie. Slice k, pixel (r, c) is at world
    ``(x0 + c * x_step, y0 + r * ps * cos(tilt), z_top - k * spacing + r * ps * sin(tilt))`` mm;
    ``x_step`` is -ps for a feet-first patient (row direction towards the patient's right)."""

    size: int
    pixel_spacing: float
    x0: float
    y0: float
    x_step: float
    tilt: float
    z_top: float
    spacing: float
    thickness: float
    n_slices: int

    def coordinates(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World mm of slice ``k``'s pixel centres: xs (1, W), ys (H, 1), zs (H, 1) float32."""
        steps = np.arange(self.size, dtype=np.float64)
        xs = self.x0 + steps * self.x_step
        ys = self.y0 + steps * self.pixel_spacing * math.cos(self.tilt)
        zs = self.z_top - k * self.spacing + steps * self.pixel_spacing * math.sin(self.tilt)
        return (
            xs[None, :].astype(np.float32),
            ys[:, None].astype(np.float32),
            zs[:, None].astype(np.float32),
        )

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k`` (mm)."""
        return (round(self.x0, 4), round(self.y0, 4), round(self.z_top - k * self.spacing, 4))

    def orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient: row then column direction cosines."""
        return (
            math.copysign(1.0, self.x_step),
            0.0,
            0.0,
            0.0,
            round(math.cos(self.tilt), 6),
            round(math.sin(self.tilt), 6),
        )


@dataclass(frozen=True, eq=False)
class StudyPlan:
    """Everything needed to write one study; ``render`` and ``write_study`` only read it.

    ``numbers``: (n_slices,) file number of each slice, head -> feet; ``visibility``: C1..C7 ->
    "whole" / "cut" / "absent" in the field of view; ``labels``: C1..C7 -> 0/1.
    """

    index: int
    seed: int
    uid: str
    split: str
    acquisition: Acquisition
    neck: Neck
    solids: tuple[Solid, ...]
    noise: float
    blur: float
    syntax: str
    encoding: str
    orientation: str
    numbering: str
    numbers: np.ndarray
    visibility: dict[str, str]
    labels: dict[str, int]
    fractures: tuple[str, ...]


@dataclass(frozen=True)
class Card:
    """One study's draw from the dataset decks."""

    syntax: str
    order: str
    top: str
    bottom: str
    tilted: bool
    fractured: int  # number of fractured vertebrae wanted (0 = negative)


def deck(rng: np.random.Generator, cards: tuple, n: int) -> list:
    """``n`` cards cycled from ``cards`` and shuffled."""
    drawn = [cards[i % len(cards)] for i in range(n)]
    return [drawn[i] for i in rng.permutation(n)]


def draw_cards(rng: np.random.Generator, n: int) -> list[Card]:
    """Per-study storage, field-of-view and fracture-count draws for a data set of ``n``."""
    positives = int(round(n * POSITIVE_SHARE))
    counts = np.array(list(VERTEBRAE_PER_POSITIVE.values()), np.float64)
    per_positive = rng.choice(list(VERTEBRAE_PER_POSITIVE), size=positives, p=counts / counts.sum())
    fractured = deck(rng, (*per_positive.tolist(), *(0,) * (n - positives)), n) if n else []
    return [
        Card(*cards)
        for cards in zip(
            deck(rng, SYNTAX_DECK, n),
            deck(rng, ORDER_DECK, n),
            deck(rng, TOP_DECK, n),
            deck(rng, BOTTOM_DECK, n),
            deck(rng, TILT_DECK, n),
            fractured,
            strict=True,
        )
    ]


def level_centres(dims: dict[str, Dims]) -> dict[str, float]:
    """Arc length (mm below the top of C1) of each level's centre: C1, the C1/C2 joint, C2, then
    a disc and a body for each next level."""
    centres = {"C1": C1_HALF_HEIGHT}
    s = 2 * C1_HALF_HEIGHT + ATLANTO_AXIAL_GAP
    previous = None
    for name in LEVELS[1:]:
        if previous is not None:
            s += dims[previous].disc
        centres[name] = s + dims[name].hh
        s += 2 * dims[name].hh
        previous = name
    return centres


def vertebra_solid(
    name: str,
    spine: Spine,
    s: float,
    prims: list[Primitive],
    bone: Bone,
    rng: np.random.Generator,
    breaks: tuple[Break, ...] = (),
    wedge: Wedge | None = None,
    crack_hu: float = 50.0,
) -> Solid:
    origin, axes = spine.frame(s)
    return with_boxes(
        Solid(
            name,
            origin,
            axes,
            tuple(prims),
            shell=bone.shell,
            cortical=bone.cortical,
            interior=bone.cancellous,
            texture=texture(rng),
            texture_hu=bone.texture_hu,
            breaks=breaks,
            wedge=wedge,
            crack_hu=crack_hu,
        )
    )


def vertebra_prims(name: str, dims: dict[str, Dims]) -> list[Primitive]:
    if name == "C1":
        return atlas(dims["C2"])
    if name == "C2":
        return axis(dims["C2"])
    if name.startswith("T"):
        return thoracic(dims[name])
    return subaxial(dims[name], bifid=name != "C7")


def draw_field(
    rng: np.random.Generator,
    card: Card,
    extents: dict[str, tuple[float, float]],
    skull_z: float,
) -> tuple[float, float, float, float]:
    """(z_top, z_bottom, thickness, spacing) in mm: the scanned range and the slice protocol.

    ``extents``: level -> (lowest, highest) world z. ``card.top``: ``skull`` starts 10-40 mm
    above C1 (in the skull base), ``cut_c1`` inside C1, ``no_c1`` inside C2 below C1;
    ``card.bottom``: ``thorax`` ends 20-80 mm below C7, ``cut_c7`` inside C7, ``no_c7`` inside
    C6 above C7.
    """
    c1_low, c1_high = extents["C1"]
    if card.top == "skull":
        top = max(c1_high, skull_z) + rng.uniform(10, 40)
    elif card.top == "cut_c1":
        top = c1_low + rng.uniform(0.35, 0.7) * (c1_high - c1_low)
    else:
        top = c1_low - rng.uniform(1.0, 6.0)
    c7_low, c7_high = extents["C7"]
    if card.bottom == "thorax":
        bottom = c7_low - rng.uniform(20, 80)
    elif card.bottom == "cut_c7":
        bottom = c7_low + rng.uniform(0.3, 0.65) * (c7_high - c7_low)
    else:
        bottom = c7_high + rng.uniform(1.0, 6.0)
    thickness, spacing = PROTOCOLS[rng.integers(len(PROTOCOLS))]
    if (top - bottom) / spacing + 1 > MAX_SLICES:  # keep the scan short enough: trim the bottom
        bottom = max(bottom, top - (MAX_SLICES - 1) * spacing)
    return top, bottom, thickness, spacing


def visibility(vertebrae: dict[str, Solid], acq: Acquisition) -> dict[str, str]:
    """C1..C7 -> "whole", "cut" or "absent" in the field of view.

    A point is scanned when it lies between the first and the last slice plane (tilt included)
    and inside the reconstruction circle. Judged on the corners of the primitives' boxes, so
    "whole" is strict: every bit of the vertebra is scanned; "absent": the boxes miss the slab.
    """
    first = acq.z_top
    last = first - (acq.n_slices - 1) * acq.spacing
    cos, tan = math.cos(acq.tilt), math.tan(acq.tilt)
    centre_x = acq.x0 + acq.x_step * (acq.size - 1) / 2
    centre_y = acq.y0 + (acq.size - 1) / 2 * acq.pixel_spacing * cos
    radius = acq.size / 2 * acq.pixel_spacing
    seen = {}
    for name in VERTEBRAE:
        lo, hi = vertebrae[name].boxes[:, 0], vertebrae[name].boxes[:, 1]
        corners = np.stack(
            [
                np.stack([(lo, hi)[i][:, 0], (lo, hi)[j][:, 1], (lo, hi)[k][:, 2]], 1)
                for i in (0, 1)
                for j in (0, 1)
                for k in (0, 1)
            ]
        ).reshape(-1, 3)
        x, y, z = corners.T
        along = z - (y - acq.y0) * tan
        in_slab = (along >= last) & (along <= first)
        in_circle = (x - centre_x) ** 2 + ((y - centre_y) / cos) ** 2 <= radius**2
        if (in_slab & in_circle).all():
            seen[name] = "whole"
        elif along.max() < last or along.min() > first:
            seen[name] = "absent"
        else:
            seen[name] = "cut"
    return seen


def choose_fractured(rng: np.random.Generator, wanted: int, seen: dict[str, str]) -> list[str]:
    """``wanted`` vertebrae among those seen whole, drawn by the competition's per-vertebra rates."""
    candidates = [i for i, name in enumerate(VERTEBRAE) if seen[name] == "whole"]
    if not wanted or not candidates:
        return []
    weights = (VERTEBRA_WEIGHTS / WHOLE_SHARE)[candidates]
    weights /= weights.sum()
    picked = rng.choice(candidates, size=min(wanted, len(candidates)), replace=False, p=weights)
    return [VERTEBRAE[i] for i in sorted(picked)]


def plan_study(index: int, seed: int, uid: str, split: str, card: Card, size: int) -> StudyPlan:
    """Draw one study's anatomy, field of view, fractures and storage (deterministic for the
    seed and the study's index)."""
    rng = np.random.default_rng([seed, index, 0])
    dims = draw_dims(rng, rng.uniform(0.88, 1.12))
    bone = draw_bone(rng)
    top = np.array([rng.uniform(-15, 15), rng.uniform(-10, 10), rng.uniform(-300, 200)])
    spine = draw_spine(rng, top)
    centres = level_centres(dims)
    prims = {name: vertebra_prims(name, dims) for name in LEVELS}
    vertebrae = {
        name: vertebra_solid(name, spine, centres[name], prims[name], bone, rng) for name in LEVELS
    }
    head, marks = head_bones(rng, spine, bone, dims["C2"])
    neck_solids, chest = neck_bones(rng, Skeleton(spine, centres, dims), bone)
    extents = {name: z_extent(solid) for name, solid in vertebrae.items()}
    z_top, z_bottom, thickness, spacing = draw_field(rng, card, extents, marks["skull_z"])
    acquisition = draw_acquisition(rng, card, size, spine, z_top, z_bottom, thickness, spacing)
    seen = visibility(vertebrae, acquisition)
    fractured = choose_fractured(rng, card.fractured, seen)
    crack_hu = float(rng.uniform(30, 75))
    fractures = []
    for name in fractured:
        d = dims["C2" if name == "C1" else name]
        drawn = [
            draw_fracture(rng, name, d, prims[name]) for _ in range(2 if rng.random() < 0.2 else 1)
        ]
        breaks = tuple(b for bs, _, _ in drawn for b in bs)
        wedge = next((w for _, w, _ in drawn if w is not None), None)
        fractures += [f"{name}:{kind}" for _, _, kind in drawn]
        vertebrae[name] = vertebra_solid(
            name, spine, centres[name], prims[name], bone, rng, breaks, wedge, crack_hu
        )
    discs = []
    for upper, lower in pairwise(LEVELS[1:]):
        origin, axes = spine.frame(centres[upper] + dims[upper].hh + dims[upper].disc / 2)
        hu = float(rng.uniform(70, 105))
        discs.append(
            with_boxes(
                Solid(
                    f"disc_{upper}",
                    origin,
                    axes,
                    tuple(disc(dims[upper], dims[lower], dims[upper].disc)),
                    shell=2.0,
                    cortical=hu + 15,
                    interior=hu - 10,
                )
            )
        )
    neck = draw_neck(rng, Skeleton(spine, centres, dims), Landmarks(**marks, chest=chest))
    encodings = SYNTAX_ENCODINGS[card.syntax]
    return StudyPlan(
        index=index,
        seed=seed,
        uid=uid,
        split=split,
        acquisition=acquisition,
        neck=neck,
        solids=(*discs, *vertebrae.values(), *(with_boxes(s) for s in head + neck_solids)),
        noise=float(rng.uniform(12, 45)),
        blur=float(rng.uniform(0.3, 0.8)),
        syntax=card.syntax,
        encoding=encodings[rng.integers(len(encodings))],
        orientation="FFS" if card.order == "feet_first" else "HFS",
        numbering=card.order,
        numbers=file_numbers(rng, card.order, acquisition.n_slices),
        visibility=seen,
        labels={v: int(v in fractured) for v in VERTEBRAE},
        fractures=tuple(fractures),
    )


def draw_acquisition(
    rng: np.random.Generator,
    card: Card,
    size: int,
    spine: Spine,
    z_top: float,
    z_bottom: float,
    thickness: float,
    spacing: float,
) -> Acquisition:
    """Pixel grid around the neck: 0.24-0.46 mm pixels at 512 columns (the same field of view
    at other sizes), centred within 10 mm of the spine line sideways and 0-20 mm behind it
    (between the bodies and the spinous processes). With a gantry tilt, the first slice crosses
    the spine line at ``z_top``."""
    ps = rng.uniform(0.24, 0.46) * REFERENCE_SIZE / size
    heights = spine.points[::-1, 2]
    mid = int(np.searchsorted(heights, (z_top + z_bottom) / 2))
    spine_x, spine_y = spine.points[::-1][mid, :2]
    tilt = math.radians(rng.uniform(6, 15) * rng.choice([-1, 1])) if card.tilted else 0.0
    x_step = -ps if card.order == "feet_first" else ps
    x0 = spine_x + rng.uniform(-10, 10) - x_step * (size - 1) / 2
    y0 = spine_y + rng.uniform(0, 20) - (size - 1) / 2 * ps * math.cos(tilt)
    z0 = z_top - (spine_y - y0) * math.tan(tilt)
    n = int(math.floor((z_top - z_bottom) / spacing)) + 1
    return Acquisition(
        size, ps, float(x0), float(y0), x_step, tilt, float(z0), spacing, thickness, n
    )


def file_numbers(rng: np.random.Generator, order: str, n: int) -> np.ndarray:
    """(n,) file number of each slice, head -> feet: 1..n down, n..1 (feet first or reversed
    numbering), or a random permutation."""
    if order == "head_first":
        return np.arange(1, n + 1)
    if order in ("feet_first", "reversed_numbers"):
        return np.arange(n, 0, -1)
    return rng.permutation(n) + 1


# ---- rendering ----------------------------------------------------------------------------------
def window(acq: Acquisition, k: int, box: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel rows/cols (r0, r1, c0, c1) of slice ``k`` that a world box (2, 3) can touch."""
    size = acq.size

    def span(low: float, high: float, start: float, step: float) -> tuple[float, float]:
        a, b = (low - start) / step, (high - start) / step
        return min(a, b), max(a, b)

    c_lo, c_hi = span(box[0, 0], box[1, 0], acq.x0, acq.x_step)
    r_lo, r_hi = span(box[0, 1], box[1, 1], acq.y0, acq.pixel_spacing * math.cos(acq.tilt))
    z = acq.z_top - k * acq.spacing
    if acq.tilt:
        z_lo, z_hi = span(box[0, 2], box[1, 2], z, acq.pixel_spacing * math.sin(acq.tilt))
        r_lo, r_hi = max(r_lo, z_lo), min(r_hi, z_hi)
    elif not box[0, 2] <= z <= box[1, 2]:
        return None
    r0, r1 = max(math.ceil(r_lo), 0), min(math.floor(r_hi) + 1, size)
    c0, c1 = max(math.ceil(c_lo), 0), min(math.floor(c_hi) + 1, size)
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def local(solid: Solid, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> tuple[np.ndarray, ...]:
    """(u, v, w) float32 (h, w) in the solid's frame for world xs (1, w), ys (h, 1), zs (h, 1)."""
    dx, dy, dz = xs - solid.origin[0], ys - solid.origin[1], zs - solid.origin[2]
    ax = solid.axes.astype(np.float32)
    return tuple(ax[0, i] * dx + ax[1, i] * dy + ax[2, i] * dz for i in range(3))


def deform(solid: Solid, part: str, u, v, w) -> tuple[np.ndarray, ...]:
    """Where in the unbroken bone a point of ``part`` comes from: fragments moved back, a
    wedged body stretched back to its height."""
    for b in solid.breaks:
        if part in b.parts and any(b.shift):
            side = (u - b.point[0]) * b.normal[0] + (v - b.point[1]) * b.normal[1] + (
                w - b.point[2]
            ) * b.normal[2] > 0
            u, v, w = u - side * b.shift[0], v - side * b.shift[1], w - side * b.shift[2]
    if solid.wedge is not None and part == "body":
        wd = solid.wedge
        front = np.clip((wd.half_depth - v) / (2 * wd.half_depth), 0.0, 1.0)
        w = -wd.half_height + (w + wd.half_height) / (1.0 - wd.loss * front)
    return u, v, w


def gaps(solid: Solid, u, v, w, parts: dict[str, np.ndarray]) -> np.ndarray:
    """(h, w) bool: bone of the broken parts inside a break's gap."""
    out = np.zeros(u.shape, bool)
    for b in solid.breaks:
        du, dv, dw = u - b.point[0], v - b.point[1], w - b.point[2]
        along = du * b.normal[0] + dv * b.normal[1] + dw * b.normal[2]
        across2 = du * du + dv * dv + dw * dw - along * along
        bone = np.zeros(u.shape, bool)
        for part in b.parts:
            if part in parts:
                bone |= parts[part]
        out |= bone & (np.abs(along) <= b.gap / 2) & (across2 <= b.reach**2)
    return out


def paint_solid(
    image: np.ndarray, acq: Acquisition, k: int, coords: tuple, solid: Solid
) -> tuple[int, int, int, int] | None:
    """Draw ``solid`` into slice ``k``'s ``image`` (H, W) HU; returns the pixel box
    (r0, r1, c0, c1) of its break gaps on this slice, or None."""
    if window(acq, k, solid.bounds) is None:
        return None
    windows = [window(acq, k, box) for box in solid.boxes]
    live = [(p, win) for p, win in zip(solid.prims, windows, strict=True) if win is not None]
    if not live:
        return None
    r0 = min(win[0] for _, win in live)
    r1 = max(win[1] for _, win in live)
    c0 = min(win[2] for _, win in live)
    c1 = max(win[3] for _, win in live)
    xs, ys, zs = coords
    u, v, w = local(solid, xs[:, c0:c1], ys[r0:r1], zs[r0:r1])
    inside = np.zeros(u.shape, bool)
    deep = np.zeros(u.shape, bool)
    broken = {p for b in solid.breaks for p in b.parts}
    parts: dict[str, np.ndarray] = {}
    moved: dict[str, tuple] = {}
    for prim, (a0, a1, b0, b1) in live:
        if prim.part not in moved:
            moved[prim.part] = deform(solid, prim.part, u, v, w)
        cut = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
        pu, pv, pw = (x[cut] for x in moved[prim.part])
        isin, isdeep = prim.evaluate(pu, pv, pw, solid.shell)
        inside[cut] |= isin
        deep[cut] |= isdeep
        if prim.part in broken:
            parts.setdefault(prim.part, np.zeros(u.shape, bool))[cut] |= isin
    for c in solid.cuts:
        removed, _ = c.evaluate(u, v, w, 0.0)
        inside &= ~removed
        deep &= ~removed
    if not inside.any():
        return None
    hu = np.where(deep, np.float32(solid.interior), np.float32(solid.cortical))
    if solid.texture is not None:
        t = solid.texture
        wave = sum(np.cos(t[i, 0] * u + t[i, 1] * v + t[i, 2] * w + t[i, 3]) for i in range(3))
        hu = hu + deep * np.float32(solid.texture_hu / 3) * wave
    target = image[r0:r1, c0:c1]
    target[inside] = hu[inside]
    if not solid.breaks:
        return None
    crack = gaps(solid, u, v, w, parts)
    if not crack.any():
        return None
    target[crack] = solid.crack_hu
    rows, cols = np.nonzero(crack)
    return (r0 + rows.min(), r0 + rows.max() + 1, c0 + cols.min(), c0 + cols.max() + 1)


def render(plan: StudyPlan, k: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Slice ``k`` (0 = head end): (H, W) float32 HU and the pixel boxes of fracture gaps.

    Blur and noise are drawn from (seed, study, slice), so any slice can be rendered alone.
    """
    acq = plan.acquisition
    coords = acq.coordinates(k)
    image = soft_tissue(plan.neck, *coords)
    boxes = []
    for solid in plan.solids:
        box = paint_solid(image, acq, k, coords, solid)
        if box is not None:
            boxes.append(box)
    image = cv2.GaussianBlur(image, (0, 0), plan.blur)
    noise = np.random.default_rng([plan.seed, plan.index, 1, k]).standard_normal(
        image.shape, dtype=np.float32
    )
    return image + np.float32(plan.noise) * noise, boxes


def stored_values(plan: StudyPlan, hu: np.ndarray) -> np.ndarray:
    """(H, W) stored pixels of ``hu`` in the study's encoding, outside the reconstruction circle
    set to the padding value."""
    signed, bits, intercept, pad = ENCODINGS[plan.encoding]
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    stored = np.clip(np.rint(hu - intercept), low, high)
    size = plan.acquisition.size
    r = np.arange(size) - (size - 1) / 2
    stored[(r[:, None] ** 2 + r[None, :] ** 2) > (size / 2) ** 2] = pad
    return stored.astype(np.int16 if signed else np.uint16)


# ---- DICOM --------------------------------------------------------------------------------------
def encode(plan: StudyPlan, stored: np.ndarray) -> bytes:
    """Pixel Data bytes of one slice in the study's transfer syntax (encapsulated if compressed)."""
    signed, bits, _, _ = ENCODINGS[plan.encoding]
    if plan.syntax == "explicit":
        return stored.tobytes()
    if plan.syntax == "rle":
        frame = RLELosslessEncoder.encode(
            stored,
            encoding_plugin="pylibjpeg",
            rows=stored.shape[0],
            columns=stored.shape[1],
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=bits,
            pixel_representation=signed,
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
    elif plan.syntax == "jpeg_ls":
        frame = imagecodecs.jpegls_encode(stored)
    else:  # JPEG Lossless, first-order prediction (Process 14, Selection Value 1)
        frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=bits)
    return encapsulate([bytes(frame)])


def dicom_slice(plan: StudyPlan, k: int, stored: np.ndarray) -> Dataset:
    """One CT Image Storage dataset (file meta included) for slice ``k``."""
    acq = plan.acquisition
    signed, bits, intercept, _ = ENCODINGS[plan.encoding]
    number = int(plan.numbers[k])
    series = generate_uid(entropy_srcs=[plan.uid, "phantom series"])
    sop = generate_uid(entropy_srcs=[plan.uid, "phantom slice", str(number)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = SYNTAXES[plan.syntax]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = plan.uid
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[plan.uid, "phantom frame"])
    ds.Modality = "CT"
    ds.Manufacturer = "phantom"
    ds.PatientID = plan.uid.rsplit(".", 1)[-1]
    ds.PatientPosition = plan.orientation
    ds.BodyPartExamined = "CSPINE"
    ds.ConvolutionKernel = "BONE"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = list(acq.position(k))
    ds.ImageOrientationPatient = list(acq.orientation())
    ds.PixelSpacing = [round(acq.pixel_spacing, 6)] * 2
    ds.SliceThickness = acq.thickness
    ds.GantryDetectorTilt = round(math.degrees(acq.tilt), 3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = signed
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 400, 1800
    ds.PixelData = encode(plan, stored)
    ds["PixelData"].VR = "OB" if plan.syntax != "explicit" else "OW"
    return ds


def write_study(plan: StudyPlan, root: Path) -> list[tuple]:
    """Write the study's ``<n>.dcm`` files under ``root``; returns its fracture-box rows
    (uid, x, y, width, height, file number) for train studies."""
    folder = root / f"{plan.split}_images" / plan.uid
    folder.mkdir(parents=True)
    boxes = []
    for k in range(plan.acquisition.n_slices):
        hu, gap_boxes = render(plan, k)
        ds = dicom_slice(plan, k, stored_values(plan, hu))
        ds.save_as(folder / f"{int(plan.numbers[k])}.dcm", enforce_file_format=True)
        if plan.split == "train":
            boxes += [
                (
                    plan.uid,
                    float(c0),
                    float(r0),
                    float(c1 - c0),
                    float(r1 - r0),
                    int(plan.numbers[k]),
                )
                for r0, r1, c0, c1 in gap_boxes
            ]
    log.debug("%s %s: %d slices", plan.split, plan.uid, plan.acquisition.n_slices)
    return boxes


def _write_job(job: tuple[StudyPlan, Path]) -> list[tuple]:
    return write_study(*job)


# ---- data set -----------------------------------------------------------------------------------
def plan_dataset(n_test: int, n_train: int, seed: int, size: int) -> list[StudyPlan]:
    """Plans of ``n_train`` train then ``n_test`` test studies, each split stratified on its own."""
    rng = np.random.default_rng([seed, 2022])
    total = n_train + n_test
    numbers = rng.choice(np.arange(40000, 100000), size=total, replace=False)
    plans = []
    for split, count, offset in (("train", n_train, 0), ("test", n_test, n_train)):
        for j, card in enumerate(draw_cards(rng, count)):
            i = offset + j
            plans.append(plan_study(i, seed, f"{UID_ROOT}.{numbers[i]}", split, card, size))
    return plans


def study_rows(plans: list[StudyPlan]) -> pd.DataFrame:
    """phantom_studies.csv: one row per study (acquisition, storage, visibility, fractures)."""
    rows = []
    for p in plans:
        a = p.acquisition
        rows.append(
            {
                "StudyInstanceUID": p.uid,
                "split": p.split,
                "n_slices": a.n_slices,
                "size": a.size,
                "pixel_spacing": round(a.pixel_spacing, 4),
                "slice_spacing": a.spacing,
                "slice_thickness": a.thickness,
                "tilt_deg": round(math.degrees(a.tilt), 2),
                "patient_position": p.orientation,
                "numbering": p.numbering,
                "transfer_syntax": p.syntax,
                "encoding": p.encoding,
                **{f"{v}_fov": p.visibility[v] for v in VERTEBRAE},
                "fractures": " ".join(p.fractures),
            }
        )
    return pd.DataFrame(rows)


def label_frame(plans: list[StudyPlan]) -> pd.DataFrame:
    """train.csv schema: StudyInstanceUID, patient_overall, C1..C7 (0/1)."""
    rows = [(p.uid, max(p.labels.values()), *(p.labels[v] for v in VERTEBRAE)) for p in plans]
    return pd.DataFrame(rows, columns=LABEL_COLUMNS)


def write_tables(plans: list[StudyPlan], boxes: list[tuple], root: Path) -> None:
    """The competition CSVs, test_labels.csv and phantom_studies.csv."""
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    if train:
        write_csv(label_frame(train), root / "train.csv")
        write_csv(
            pd.DataFrame(
                boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
            ),
            root / "train_bounding_boxes.csv",
        )
    write_csv(label_frame(test), root / "test_labels.csv")
    rows = [(f"{p.uid}_{t}", p.uid, t) for p in test for t in PREDICTION_TYPES]
    frame = pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    write_csv(frame, root / "test.csv")
    write_csv(frame[["row_id"]].assign(fractured=0.5), root / "sample_submission.csv")
    write_csv(study_rows(plans), root / "phantom_studies.csv")


def generate(
    out: str | Path,
    studies: int,
    seed: int,
    size: int = REFERENCE_SIZE,
    train_studies: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``studies`` test (+ ``train_studies`` train) phantom studies into ``out``.

    Returns the phantom_studies.csv table. Raises ``InputError`` for a non-empty ``out``
    without ``overwrite``. The data set is built beside ``out`` and moved in when complete.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    if studies < 1 or train_studies < 0 or size < 32:
        raise InputError("need studies >= 1, train_studies >= 0 and size >= 32")
    start = time.perf_counter()
    plans = plan_dataset(studies, train_studies, seed, size)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        (partial / "test_images").mkdir()
        jobs = [(plan, partial) for plan in plans]
        if workers > 1:
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                results = pool.map(_write_job, jobs, chunksize=1)
        else:
            results = [_write_job(job) for job in jobs]
        write_tables(plans, [row for rows in results for row in rows], partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    table = study_rows(plans)
    log.info(
        "wrote %d phantom studies (%d slices) to %s in %.0f s",
        len(plans),
        int(table.n_slices.sum()),
        out,
        time.perf_counter() - start,
    )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--out", required=True, type=Path, help="data set folder to write")
    parser.add_argument("--studies", required=True, type=int, help="test studies (with answers)")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help="rows = columns")
    parser.add_argument(
        "--train-studies",
        type=int,
        default=0,
        help="also write a train half (train.csv, train_images/)",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    with cli.running():
        table = generate(
            args.out,
            args.studies,
            args.seed,
            args.size,
            args.train_studies,
            args.workers,
            args.overwrite,
        )
    print(table.drop(columns=["size"]).to_string(index=False))


if __name__ == "__main__":
    main()
