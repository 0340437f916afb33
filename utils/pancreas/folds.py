"""Pancreas fold spec for ``python -m utils.fold_split --CFG config/pancreas/base.yaml``.

Always the data set's own split: validation cases are fold 0 and train cases fold 1, so nnU-Net's
fold 0 (``splits_final.json`` written with ``--nnunet-splits``) trains on train/ and validates on
validation/. Fold 1 only completes the file; it is not meant to be trained. Test cases are never
in the fold file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from utils.pancreas.layout import ID, TEST_SPLIT
from utils.pancreas.preprocess import cases_csv
from utils.registry import FoldInputs


def fold_inputs(cfg) -> FoldInputs:
    """One row per labelled case, the given split as folds, the subtype mix printed per fold."""
    path = cases_csv(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; run python -m utils.preprocess_data --pipeline pancreas first"
        )
    table = pd.read_csv(path, dtype={ID: str}, keep_default_na=False)
    table = table[table["split"] != TEST_SPLIT].reset_index(drop=True)
    if not {"train", "validation"} <= set(table["split"]):
        raise ValueError(f"{path}: the given split needs cases in both train/ and validation/")
    table = table.assign(
        **{
            f"subtype{k}": (table["subtype"] == k).astype(float)
            for k in sorted(table["subtype"].unique())
        }
    )
    summary = tuple(c for c in table.columns if c.startswith("subtype") and c != "subtype")
    return FoldInputs(table, given=np.where(table["split"] == "validation", 0, 1), summary=summary)
