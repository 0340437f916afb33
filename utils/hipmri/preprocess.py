"""HipMRI conversion: pair every slice by name, check its shape -> ``<output_dir>/hipmri/prep/slices.csv``.

``python -m utils.preprocess_data --pipeline hipmri [--data-dir D] [key=value ...]``

One row per paired slice of the three splits (``slice_id, patient, week, slice, split, image,
mask, height, width``); only headers are read, the pixels stay in the NIfTI files and the
datasets stream them. Unpaired files, odd names and slices that are not 2-D (or whose mask
shape differs from the image's) are logged with their path and skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import pandas as pd

from utils import paths
from utils.hipmri import layout
from utils.hipmri.slices import plane_shape
from utils.io import write_csv

log = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[2] / "config" / "hipmri" / "base.yaml"


def slices_csv(cfg) -> Path:
    """The conversion's one product: the slice table every dataset reads."""
    return paths.prep_dir(cfg) / "slices.csv"


def with_shapes(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` plus ``height``, ``width`` from the headers; unreadable or odd slices dropped (logged)."""
    keep, heights, widths = [], [], []
    for i, row in enumerate(table.itertuples(index=False)):
        try:
            shape = nib.load(row.image).shape
            h, w = plane_shape(shape, row.image)
            if row.mask and nib.load(row.mask).shape != shape:
                raise ValueError(f"{row.mask}: shape {nib.load(row.mask).shape} != image {shape}")
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
            log.warning("skipping %s: %s", row.image, err)
            continue
        keep.append(i)
        heights.append(h)
        widths.append(w)
    return table.iloc[keep].assign(height=heights, width=widths).reset_index(drop=True)


def build_table(data: Path, splits: tuple[str, ...] = layout.SPLITS) -> pd.DataFrame:
    """Paired, shape-checked rows of ``splits`` of the data folder ``data``."""
    parts = []
    for split in splits:
        paired = layout.pair_split(data, split)
        parts.append(with_shapes(paired))
        log.info(
            "%s: %d paired slices of %d patients",
            split,
            len(parts[-1]),
            parts[-1]["patient"].nunique(),
        )
    return pd.concat(parts, ignore_index=True)


def run(cfg, workers: int = 1) -> str:
    """The pipeline's conversion: pair the slices -> ``prep/slices.csv`` (one process suffices)."""
    table = build_table(paths.data_dir(cfg))
    out = write_csv(table, slices_csv(cfg))
    counts = table["split"].value_counts().reindex(layout.SPLITS, fill_value=0)
    return f"wrote {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
