"""DICOM studies -> per-study metadata, stage-1 labels and a windowed uint8 volume cache.

Usage (the pipeline's entry in utils/preprocess_data.py)::

    python -m utils.preprocess_data --pipeline rsna --data-dir data/rsna [--workers 2] [key=value ...]

Products (one explicit file each; see utils/rsna/layout.py), in ``<output_dir>/rsna/prep/``:

- ``studies.csv``: one row per study (train and test): geometry, spacings, transfer syntaxes,
  reversed flag, skipped / duplicate slices, whether a segmentation exists.
- ``stage1_labels.csv``: one row per slice of every segmented train study: the C1..C7 ratio
  (voxel count / the study's maximum count for that vertebra) and the C1-C7 box normalised by
  width and height separately, after the continuity cleaning of stray labels.
- ``volumes/<uid>.npy``: (Z, S, S) uint8 bone-windowed slices, head -> feet, memory-mappable,
  so training never decodes DICOM again.

Resumable: each study's results are written atomically into ``parts/`` and a finished study is
skipped on the next run; the two tables are rebuilt from the parts at the end. ``key=value``
overrides apply to config/rsna/base.yaml (e.g. ``cache.size=256 profile=demo``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from utils import paths
from utils.config import progress_off
from utils.errors import InputError
from utils.io import save_npy, write_csv, write_text
from utils.rsna import layout
from utils.rsna.dicom import StudyReadError, load_study, window
from utils.rsna.metric import VERTEBRAE
from utils.rsna.nifti import load_rsna_seg

log = logging.getLogger(__name__)

BOX_COLS = ["x0", "y0", "x1", "y1"]
LABEL_COLS = ["StudyInstanceUID", "slice", "file_number", *VERTEBRAE, *BOX_COLS, "vertebrae"]


# ---- stage-1 labels -----------------------------------------------------------------------------
def _continuity_pass(present: np.ndarray) -> np.ndarray:
    """Keep, per slice, one run of consecutive vertebra ids that continues the previous slices.

    ``present``: (Z, 7) bool, vertebra Ci present on slice z, in walking order. Walking from the
    first slice, the expected vertebra starts at the first one seen; on each slice only a run
    ``e, e+1, ...`` (or starting at ``e+1``) is kept, everything else is a stray label.
    """
    kept = np.zeros_like(present)
    expected = None
    for z in np.flatnonzero(present.any(axis=1)):
        ids = np.flatnonzero(present[z])
        if expected is None:
            expected = ids[0]
        start = next((i for i in ids if i in (expected, expected + 1)), None)
        if start is None:
            continue
        run = start
        while run + 1 in ids:
            run += 1
        kept[z, start : run + 1] = True
        expected = run
    return kept


def clean_labels(present: np.ndarray) -> np.ndarray:
    """Two-pass (head -> feet, then feet -> head) continuity cleaning of (Z, 7) presence flags."""
    down = _continuity_pass(present)
    # The reverse pass walks feet -> head, where ids decrease: flip both axes so they increase.
    return _continuity_pass(down[::-1, ::-1])[::-1, ::-1]


def stage1_labels(seg: np.ndarray) -> pd.DataFrame:
    """Per-slice stage-1 targets of one segmentation.

    Args:
        seg: (Z, H, W) uint8 labels head -> feet (1..7 = C1..C7; other values ignored).
    Returns:
        Z rows: ``slice`` index, C1..C7 ratio in [0, 1], box ``x0, y0, x1, y1`` normalised by W and
        H (x1/y1 exclusive), ``vertebrae`` = 1 when the slice keeps any C label (else box zeros).
    """
    z, h, w = seg.shape
    counts = np.stack([(seg == v).sum(axis=(1, 2)) for v in range(1, 8)], axis=1)  # (Z, 7)
    kept = clean_labels(counts > 0)
    counts = np.where(kept, counts, 0)
    peak = counts.max(axis=0)
    ratios = counts / np.maximum(peak, 1)
    boxes = np.zeros((z, 4), dtype=np.float64)
    for k in np.flatnonzero(kept.any(axis=1)):
        mask = np.isin(seg[k], np.flatnonzero(kept[k]) + 1)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[k] = (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)
    df = pd.DataFrame(ratios, columns=VERTEBRAE)
    df[BOX_COLS] = boxes
    df.insert(0, "slice", np.arange(z))
    df["vertebrae"] = kept.any(axis=1).astype(np.int8)
    return df


# ---- one study ----------------------------------------------------------------------------------
def cache_volume(hu: np.ndarray, size: int, win: tuple[float, float]) -> np.ndarray:
    """(Z, H, W) float32 HU -> (Z, size, size) uint8 windowed slices (area-resampled)."""
    out = np.empty((hu.shape[0], size, size), dtype=np.uint8)
    interp = cv2.INTER_AREA if min(hu.shape[1:]) >= size else cv2.INTER_LINEAR
    for k, sl in enumerate(window(hu, *win)):
        out[k] = cv2.resize(sl, (size, size), interpolation=interp)
    return out


def process_study(
    study_path: Path,
    split: str,
    prep: Path,
    size: int,
    win: tuple[float, float],
    seg_path: Path | None = None,
) -> dict[str, Any]:
    """Read one study, cache its volume, write its labels; returns its ``studies.csv`` row.

    Writes ``prep/volumes/<uid>.npy`` and, with a segmentation, ``prep/parts/<uid>.labels.csv``;
    the metadata row is written last (``prep/parts/<uid>.json``) and marks the study as done.
    """
    t0 = time.perf_counter()
    study = load_study(study_path)
    uid = study.uid
    save_npy(cache_volume(study.hu, size, win), layout.volume_path(prep, uid))
    row: dict[str, Any] = {
        "StudyInstanceUID": uid,
        "split": split,
        "n_files": study.n_files,
        "n_slices": study.n_slices,
        "rows": study.rows,
        "cols": study.cols,
        "reversed": bool(study.reversed),
        "n_skipped": len(study.skipped),
        "skipped_files": " ".join(map(str, study.skipped)),
        "n_duplicates": study.n_duplicates,
        "z_spacing": round(float(study.z_spacing), 4),
        "pixel_spacing_row": float(study.pixel_spacing[0]),
        "pixel_spacing_col": float(study.pixel_spacing[1]),
        "transfer_syntaxes": " ".join(study.transfer_syntaxes),
        "first_file": int(study.file_numbers.min()),
        "last_file": int(study.file_numbers.max()),
        "has_seg": False,
    }
    if seg_path is not None and seg_path.is_file():
        try:
            seg = load_rsna_seg(seg_path, n_slices=study.n_slices, study=uid)
            labels = stage1_labels(seg)
            labels.insert(0, "StudyInstanceUID", uid)
            labels.insert(2, "file_number", study.file_numbers)
            write_csv(labels[LABEL_COLS], layout.study_labels_csv(prep, uid))
            row["has_seg"] = True
        except ValueError as err:  # a mismatching segmentation must not poison stage-1 labels
            log.warning("skipping segmentation of %s: %s", uid, err)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    write_text(json.dumps(row), layout.study_row_json(prep, uid))
    return row


def _job(args: tuple) -> tuple[str, str | None]:
    """Pool task: (uid, error message or None). An unreadable study is logged, not fatal."""
    study_path = args[0]
    try:
        process_study(*args)
        return study_path.name, None
    except StudyReadError as err:
        return study_path.name, str(err)


# ---- whole data set -----------------------------------------------------------------------------
def check_cache_settings(prep: Path, size: int, win: tuple[float, float]) -> None:
    """A cache built with other settings would be silently mixed in: refuse instead."""
    settings = {"size": int(size), "window": [float(v) for v in win]}
    marker = prep / "cache.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old != settings:
            raise InputError(
                f"{prep} holds a cache built with {old}, not {settings}; "
                "use another output_dir or delete it"
            )
    else:
        write_text(json.dumps(settings), marker)


def is_cached(prep: Path, uid: str, size: int) -> bool:
    """True when study ``uid`` is done in ``prep``: its metadata row exists and its volume loads
    with the shape that row records. A damaged volume (truncated by a killed copy, a full disk)
    is logged and its row removed, so the study is processed again rather than fed to training."""
    part = layout.study_row_json(prep, uid)
    if not part.is_file():
        return False
    path = layout.volume_path(prep, uid)
    expected = (json.loads(part.read_text())["n_slices"], size, size)
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError, EOFError) as err:  # missing, truncated or not a .npy file
        problem = f"{type(err).__name__}: {err}"
    else:
        if shape == expected:
            return True
        problem = f"shape {shape}, expected {expected}"
    log.warning("cached volume %s is damaged (%s): processing the study again", path, problem)
    part.unlink()
    return False


def list_jobs(data: Path, prep: Path, size: int, win: tuple[float, float]) -> list[tuple]:
    """Studies of train_images and test_images not yet done (or whose cache is damaged)."""
    jobs = []
    for split in ("train", "test"):
        root = layout.images_dir(data, split)
        if not root.is_dir():
            continue
        for study_path in sorted(p for p in root.iterdir() if p.is_dir()):
            if is_cached(prep, study_path.name, size):
                continue
            seg = layout.segmentation_path(data, study_path.name) if split == "train" else None
            jobs.append((study_path, split, prep, size, win, seg))
    return jobs


def check_inputs(data: Path) -> None:
    """Refuse a folder that is not a competition folder before anything is written."""
    if not data.is_dir():
        raise InputError(f"data folder not found: {data}")
    has_csv = layout.labels_csv(data).is_file()
    if layout.images_dir(data, "train").is_dir() and not has_csv:
        raise InputError(
            f"{layout.images_dir(data, 'train')} has no {layout.labels_csv(data).name} "
            f"beside it (the study labels): copy it from the competition data"
        )
    if not has_csv and not layout.images_dir(data, "test").is_dir():
        raise InputError(f"{data} is not a competition folder (no train.csv or test_images/)")
    if not any(
        p.is_dir()
        for split in ("train", "test")
        if layout.images_dir(data, split).is_dir()
        for p in layout.images_dir(data, split).iterdir()
    ):
        raise InputError(f"{data}: no study folders in train_images/ or test_images/")


def collect(prep: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild ``studies.csv`` and ``stage1_labels.csv`` from the per-study parts."""
    parts = layout.parts_dir(prep)
    rows = [json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))]
    if not rows:
        raise InputError("no study could be read (each one is named in the log above)")
    studies = pd.DataFrame(rows).sort_values(["split", "StudyInstanceUID"], ignore_index=True)
    label_files = sorted(parts.glob("*.labels.csv"))
    labels = (
        pd.concat([pd.read_csv(p) for p in label_files], ignore_index=True)
        if label_files
        else pd.DataFrame(columns=LABEL_COLS)
    )
    write_csv(studies, layout.studies_csv(prep))
    write_csv(labels, layout.stage1_labels_csv(prep))
    return studies, labels


def preprocess(data: Path, prep: Path, cfg: Mapping[str, Any], workers: int = 1) -> pd.DataFrame:
    """Process every study under ``data`` into ``prep``; returns the studies table."""
    size, win = int(cfg["cache"]["size"]), tuple(cfg["cache"]["window"])
    check_inputs(data)
    check_cache_settings(prep, size, win)
    jobs = list_jobs(data, prep, size, win)
    log.info(
        "%d studies to process (%d workers), cache %dpx window %s", len(jobs), workers, size, win
    )
    failed = []
    with mp.get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
        results = pool.imap_unordered(_job, jobs)
        for uid, err in tqdm(results, total=len(jobs), desc="studies", disable=progress_off(cfg)):
            if err:
                failed.append(uid)
                log.error("skipped study %s: %s", uid, err)
    studies, labels = collect(prep)
    log.info(
        "%d studies (%d segmented, %d reversed, %d with skipped slices), %d label rows; %d failed",
        len(studies),
        studies["has_seg"].sum(),
        studies["reversed"].sum(),
        (studies["n_skipped"] > 0).sum(),
        len(labels),
        len(failed),
    )
    return studies


class _Serial:
    """Pool stand-in for ``--workers 1`` (keeps tracebacks and profiling simple)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def run(cfg: Mapping[str, Any], workers: int = 1) -> str:
    """The pipeline's conversion (``python -m utils.preprocess_data --pipeline rsna``)."""
    prep = paths.prep_dir(cfg)
    preprocess(paths.data_dir(cfg), prep, cfg, workers=workers)
    return (
        f"wrote {layout.studies_csv(prep)}, {layout.stage1_labels_csv(prep)} and {prep / 'volumes'}"
    )
