"""HipMRI conversion: pair every slice by name, check its shape -> ``<output_dir>/hipmri/prep/slices.csv``.

``python -m utils.preprocess_data --pipeline hipmri [--data-dir D] [key=value ...]``

One row per paired slice of the three splits (``slice_id, patient, week, slice, split, image,
mask, height, width``); only headers are read, the pixels stay in the NIfTI files and the
datasets stream them. Unpaired files, odd names and slices that are not 2-D (or whose mask
shape differs from the image's) are logged with their path and skipped.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import nibabel as nib
import pandas as pd

from utils import paths
from utils.config import load_config
from utils.errors import user_errors
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


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="HipMRI slice folder")
    parser.add_argument("overrides", nargs="*", help="config/hipmri/base.yaml overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = [*args.overrides, *([f"data_dir={args.data_dir}"] if args.data_dir else [])]
    with user_errors():
        cfg = load_config(CONFIG, overrides)
    try:
        table = build_table(paths.data_dir(cfg))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    out = write_csv(table, slices_csv(cfg))
    counts = table["split"].value_counts().reindex(layout.SPLITS, fill_value=0)
    print(f"wrote {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return out


if __name__ == "__main__":
    main()
