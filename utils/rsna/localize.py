"""Stage-1 per-slice predictions -> stage-2 inputs: per (study, vertebra) slice range + study box.

The same function (and the same ``localize.*`` keys) is used for the OOF train table and at test
time, so stage 2 is trained on exactly the kind of input it will see.

Usage::

    python -m utils.rsna.localize --CFG config/rsna/stage2_fracture.yaml [key=value ...]

reads the stage-1 OOF predictions (``output/rsna/<stages.vertebra>/preds_oof.csv``) and writes
``output/rsna/stage2_labels_oof.csv``; the test-time chain calls :func:`localize` itself.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from utils import cli, paths
from utils.errors import InputError
from utils.io import write_csv
from utils.rsna import layout
from utils.rsna.metric import UID, VERTEBRAE
from utils.rsna.preprocess import BOX_COLS

log = logging.getLogger(__name__)
# peak: the vertebra's highest smoothed ratio in its range (a weak one marks an unsure localisation).
COLUMNS = ["StudyInstanceUID", "vertebra", "start", "end", "n_slices", "peak", *BOX_COLS]
SKIP_PROB = (
    0.1  # prior probability per vertebra missing above the first one seen (ordered decoding)
)


def longest_run(mask: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True in a 1-D mask, None when there is none."""
    if not mask.any():
        return None
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[::2], edges[1::2]
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k] - 1)


def ordered_labels(ratios: np.ndarray, smoothed: np.ndarray, thresh: float) -> np.ndarray:
    """Vertebra id per slice (0 = none, 1..7 = C1..C7) decoded in anatomical order.

    A 2.5D slice shows *that* it crosses a vertebra (presence p = sum of its ratios, capped at 1)
    far more reliably than *which* one (q_j = ratio_j / sum; C3..C7 look alike). The Viterbi path
    below assigns each slice a vertebra or "none" so that ids never decrease head -> feet and each
    vertebra is one contiguous run, maximising sum(log p + log(q_j / max q)) over assigned
    slices + log(thresh) per unassigned slice: a slice joins a vertebra when its presence beats
    the threshold, and the ordering decides which one.

    ``ratios``: (Z, 7) in [0, 1], slices head -> feet; presence uses them unsmoothed (discs are
    only a few slices thick), identity uses ``smoothed`` (same shape). Returns (Z,) int8.
    """
    z = len(ratios)
    # States: 0..7 = "gap after vertebra k" (k = 0: above C1), 8..14 = "inside C(j)" for j = 1..7.
    presence = np.clip(ratios.sum(axis=1, keepdims=True), 1e-6, 1.0)
    # Identity relative to the slice's most likely vertebra: the best one costs nothing, so
    # assigned-vs-gap is decided by presence alone and the others pay their log-odds.
    best = np.clip(smoothed.max(axis=1, keepdims=True), 1e-6, None)
    identity = np.clip(smoothed, 1e-6, None) / best
    with np.errstate(divide="ignore"):  # thresh 0: every slice with any presence is a vertebra
        gap = np.log(thresh)
    emit = np.concatenate([np.full((z, 8), gap), np.log(presence) + np.log(identity)], axis=1)
    trans = np.full((15, 15), -np.inf)
    for k in range(8):
        trans[k, k] = 0.0  # stay in the gap
        if k < 7:
            trans[k, 8 + k] = 0.0  # gap after C(k) -> C(k+1)
    for j in range(1, 8):
        trans[7 + j, 7 + j] = 0.0  # stay inside C(j)
        trans[7 + j, j] = 0.0  # C(j) -> gap after C(j)
        if j < 7:
            trans[7 + j, 8 + j] = 0.0  # C(j) -> C(j+1) directly
    # A field of view may start below C1: entering at C(j) from above costs SKIP per vertebra.
    skip = np.log(SKIP_PROB) * np.arange(7)
    trans[0, 8:] = skip
    score = np.concatenate([[emit[0, 0]], np.full(7, -np.inf), emit[0, 8:] + skip])
    back = np.zeros((z, 15), np.int16)
    for t in range(1, z):
        cand = score[:, None] + trans  # (from, to)
        back[t] = cand.argmax(axis=0)
        score = cand.max(axis=0) + emit[t]
    state = int(score.argmax())
    path = np.empty(z, np.int8)
    for t in range(z - 1, -1, -1):
        path[t] = state - 7 if state >= 8 else 0
        state = back[t, state]
    return path


def localize_study(
    pred: pd.DataFrame, smooth: int, thresh: float, margin: float, ordered: bool = True
) -> pd.DataFrame:
    """One study's per-slice predictions -> up to 7 rows (one per vertebra found).

    ``pred``: columns ``slice``, x0, y0, x1, y1, C1..C7 (normalised box, ratios in [0, 1]).
    Ratios are smoothed along z (centred rolling mean of ``smooth`` slices). A vertebra's range is
    its run in the ordered decoding (``ordered``; see :func:`ordered_labels`; C2's range then
    also covers C1's, which its dens crosses) or else the longest run of slices whose ratio
    exceeds ``thresh``. ``thresh <= 0`` means every slice belongs to
    every vertebra (each gets the whole study; the ordered decoding, which gives a slice one
    vertebra at most, would leave some without slices). The study box spans the 5-95 % quantiles of the
    boxes predicted on slices assigned to any vertebra, widened by ``margin`` of its size on each
    side and clipped to the image. Slices without a box (NaN: skipped by a stage-1 stride, see
    :func:`fill_skipped_slices`) do not vote; when no assigned slice has one, every predicted
    slice does.
    """
    pred = pred.sort_values("slice")
    ratios = pred[VERTEBRAE].rolling(smooth, center=True, min_periods=1).mean().to_numpy()
    slices = pred["slice"].to_numpy()
    if thresh <= 0:
        masks = [np.ones(len(pred), bool)] * 7
    elif ordered:
        labels = ordered_labels(pred[VERTEBRAE].to_numpy(), ratios, thresh)
        masks = [labels == i + 1 for i in range(7)]
    else:
        masks = [ratios[:, i] > thresh for i in range(7)]
    on = np.any(masks, axis=0)
    if not on.any():
        return pd.DataFrame(columns=COLUMNS[1:])
    boxed = pred[BOX_COLS].notna().all(axis=1).to_numpy()
    boxes = pred.loc[on & boxed if (on & boxed).any() else boxed, BOX_COLS].to_numpy()
    x0, y0 = np.quantile(boxes[:, 0], 0.05), np.quantile(boxes[:, 1], 0.05)
    x1, y1 = np.quantile(boxes[:, 2], 0.95), np.quantile(boxes[:, 3], 0.95)
    dx, dy = margin * max(x1 - x0, 1e-3), margin * max(y1 - y0, 1e-3)
    box = np.clip([x0 - dx, y0 - dy, x1 + dx, y1 + dy], 0.0, 1.0)
    runs = [longest_run(mask) for mask in masks]
    if ordered and thresh > 0 and runs[0] and runs[1]:
        # The dens of C2 rises through the ring of C1, so the slices of C1 show C2 too; the
        # ordered decoding gives a slice one vertebra only, so C2's range takes C1's back.
        runs[1] = (min(runs[0][0], runs[1][0]), runs[1][1])
    rows = []
    for i, (v, run) in enumerate(zip(VERTEBRAE, runs, strict=True)):
        if run is not None:
            peak = float(ratios[run[0] : run[1] + 1, i].max())
            rows.append(
                [v, int(slices[run[0]]), int(slices[run[1]]), run[1] - run[0] + 1, peak, *box]
            )
    return pd.DataFrame(rows, columns=COLUMNS[1:])


def strided_slices(n_slices: int, stride: int) -> np.ndarray:
    """Slices stage 1 predicts at ``stride`` k: 0, k, 2k, ... and always the last one."""
    if stride < 1:
        raise ValueError(f"stage-1 stride must be >= 1, got {stride}")
    return np.union1d(np.arange(0, n_slices, stride), [n_slices - 1])


def fill_skipped_slices(pred: pd.DataFrame, n_slices: int) -> pd.DataFrame:
    """One study's stage-1 predictions on some slices -> one row per slice ``0 .. n_slices-1``.

    C1..C7 ratios are interpolated linearly along z between the predicted slices; the box
    columns keep the predicted values and are NaN on the skipped slices (:func:`localize_study`
    builds the study box from predicted slices only).
    """
    pred = pred.sort_values("slice")
    z = np.arange(n_slices)
    known = pred["slice"].to_numpy()
    out = pd.DataFrame({UID: pred[UID].iloc[0], "slice": z})
    out[BOX_COLS] = pred.set_index("slice")[BOX_COLS].reindex(z).to_numpy()
    for v in VERTEBRAE:
        out[v] = np.interp(z, known, pred[v].to_numpy())
    return out


def localize(
    preds: pd.DataFrame, smooth: int, vert_thresh: float, box_margin: float, ordered: bool = True
) -> pd.DataFrame:
    """All studies of a per-slice prediction table -> the stage-2 table (``COLUMNS``).

    Parameters are the ``localize.*`` config keys, so callers pass ``**cfg.localize``.
    """
    parts = [
        localize_study(group, smooth, vert_thresh, box_margin, ordered).assign(StudyInstanceUID=uid)
        for uid, group in preds.groupby("StudyInstanceUID", sort=True)
    ]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return out[COLUMNS]


def make_stage2_labels(cfg) -> pd.DataFrame:
    """Localise the stage-1 OOF predictions and write ``stage2_labels_oof.csv``."""
    source = paths.preds_csv(cfg, cfg["stages"]["vertebra"])
    if not source.is_file():
        raise InputError(f"{source} not found: run the stage-1 OOF pass (inference.py) first")
    preds = pd.read_csv(source, dtype={UID: str})
    table = localize(preds, **cfg["localize"])
    n_studies = preds[UID].nunique()
    found = table.groupby(UID).size()
    log.info(
        "%d studies, %d (study, vertebra) pairs found of %d; %d studies without any vertebra",
        n_studies,
        len(table),
        7 * n_studies,
        n_studies - len(found),
    )
    write_csv(table, layout.stage2_labels_csv(cfg, "oof"))
    return table


def main(argv: list[str] | None = None) -> None:
    args = cli.parser(__doc__, cfg="config/rsna/stage2_fracture.yaml").parse_args(argv)
    with cli.running():
        cfg = cli.load(args)
        make_stage2_labels(cfg)
    print(f"wrote {layout.stage2_labels_csv(cfg, 'oof')}")


if __name__ == "__main__":
    main()
