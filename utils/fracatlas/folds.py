"""FracAtlas fold spec for ``python -m utils.fold_split --CFG config/fracatlas/base.yaml``.

One fold file for both tasks: every readable training-pool image (the official test split and
the held-out negatives excluded), stratified by the fractured label. nnU-Net's
``splits_final.json`` is the same folds restricted to its training cases
(utils/fracatlas/segment.py), so a fold's segmentation and classification models never saw
the fold's images.
"""

from __future__ import annotations

import pandas as pd

from utils import paths
from utils.errors import InputError
from utils.fracatlas.images import UNREADABLE
from utils.fracatlas.preprocess import cases_csv
from utils.registry import FoldInputs


def read_cases(cfg) -> pd.DataFrame:
    """``cases.csv`` of the conversion (ids as str, empty paths as ""), unreadable images dropped."""
    path = cases_csv(paths.nnunet_raw_dataset(cfg))
    if not path.is_file():
        raise InputError(
            f"{path} not found; run python -m utils.preprocess_data --pipeline fracatlas first"
        )
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("fractured", "n_instances", "nnunet_train", "width", "height"):
        table[col] = table[col].astype(int)
    return table[table["status"] != UNREADABLE].reset_index(drop=True)


def training_pool(cfg) -> pd.DataFrame:
    """The readable images of the training pool (``split == train``)."""
    table = read_cases(cfg)
    table = table[table["split"] == "train"].reset_index(drop=True)
    if table.empty:
        raise InputError("cases.csv has no readable training-pool image")
    return table


def fold_inputs(cfg) -> FoldInputs:
    table = training_pool(cfg)
    return FoldInputs(table, strata=table["fractured"].to_numpy(), summary=("fractured",))
