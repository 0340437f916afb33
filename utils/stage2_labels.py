"""Stage-1 per-slice predictions -> stage-2 inputs: per (study, vertebra) slice range + study box.

The same function (and the same ``localize.*`` keys) is used for the OOF train table and at test
time, so stage 2 is trained on exactly the kind of input it will see.

Usage::

    python utils/stage2_labels.py --CFG config/stage2_fracture.yaml --split oof [key=value ...]

reads ``output/<upstream>/preds_<split>.csv`` and writes ``output/stage2_labels_<split>.csv``.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging

import numpy as np
import pandas as pd

from utils import paths
from utils.config import load_config
from utils.io import write_csv

log = logging.getLogger(__name__)
VERTEBRAE = [f"C{i}" for i in range(1, 8)]
BOX_COLS = ["x0", "y0", "x1", "y1"]
COLUMNS = ["StudyInstanceUID", "vertebra", "start", "end", "n_slices", *BOX_COLS]


def longest_run(mask: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True in a 1-D mask, None when there is none."""
    if not mask.any():
        return None
    padded = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[::2], edges[1::2]
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k] - 1)


def localize_study(pred: pd.DataFrame, smooth: int, thresh: float, margin: float) -> pd.DataFrame:
    """One study's per-slice predictions -> up to 7 rows (one per vertebra found).

    ``pred``: columns ``slice``, x0, y0, x1, y1, C1..C7 (normalised box, ratios in [0, 1]).
    A vertebra's range is the longest run of slices whose smoothed ratio exceeds ``thresh``; the
    study box spans the 5-95 % quantiles of the boxes predicted on slices showing any vertebra,
    widened by ``margin`` of its size on each side and clipped to the image.
    """
    pred = pred.sort_values("slice")
    ratios = pred[VERTEBRAE].rolling(smooth, center=True, min_periods=1).mean().to_numpy()
    slices = pred["slice"].to_numpy()
    on = ratios.max(axis=1) > thresh
    if not on.any():
        return pd.DataFrame(columns=COLUMNS)
    boxes = pred.loc[on, BOX_COLS].to_numpy()
    x0, y0 = np.quantile(boxes[:, 0], 0.05), np.quantile(boxes[:, 1], 0.05)
    x1, y1 = np.quantile(boxes[:, 2], 0.95), np.quantile(boxes[:, 3], 0.95)
    dx, dy = margin * max(x1 - x0, 1e-3), margin * max(y1 - y0, 1e-3)
    box = np.clip([x0 - dx, y0 - dy, x1 + dx, y1 + dy], 0.0, 1.0)
    rows = []
    for i, v in enumerate(VERTEBRAE):
        run = longest_run(ratios[:, i] > thresh)
        if run is not None:
            rows.append([v, int(slices[run[0]]), int(slices[run[1]]), run[1] - run[0] + 1, *box])
    return pd.DataFrame(rows, columns=COLUMNS[1:])


def localize(preds: pd.DataFrame, smooth: int, thresh: float, margin: float) -> pd.DataFrame:
    """All studies of a per-slice prediction table -> the stage-2 table (``COLUMNS``)."""
    parts = [
        localize_study(group, smooth, thresh, margin).assign(StudyInstanceUID=uid)
        for uid, group in preds.groupby("StudyInstanceUID", sort=True)
    ]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return out[COLUMNS]


def make_stage2_labels(cfg, split: str) -> pd.DataFrame:
    """Localise the upstream stage's ``preds_<split>.csv`` and write ``stage2_labels_<split>.csv``."""
    preds = pd.read_csv(paths.preds_csv(cfg, split, exp=cfg["upstream"]))
    loc = cfg["localize"]
    table = localize(preds, int(loc["smooth"]), float(loc["vert_thresh"]), float(loc["box_margin"]))
    n_studies = preds["StudyInstanceUID"].nunique()
    found = table.groupby("StudyInstanceUID").size()
    log.info(
        "%s: %d studies, %d (study, vertebra) pairs found of %d; %d studies without any vertebra",
        split,
        n_studies,
        len(table),
        7 * n_studies,
        n_studies - len(found),
    )
    write_csv(table, paths.stage2_labels_csv(cfg, split))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--CFG", required=True, help="stage-2 config (its `upstream` names stage 1)"
    )
    parser.add_argument("--split", default="oof", choices=["oof", "test"])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.CFG, args.overrides)
    make_stage2_labels(cfg, args.split)
    print(f"wrote {paths.stage2_labels_csv(cfg, args.split)}")


if __name__ == "__main__":
    main()
