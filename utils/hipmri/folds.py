"""HipMRI fold spec for ``python -m utils.fold_split --CFG config/hipmri/base.yaml``.

``split: given`` (default): the course's own split, the validate patients as fold 0 and the
train patients as fold 1, so ``train.py --fold 0`` trains on train and selects on validate
(fold 1 only completes the file; it is not meant to be trained). ``split: folds``: ``n_folds``
folds drawn over the train + validate slices, every patient's slices in one fold. The test
split is never in the fold file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from utils.config import ConfigError
from utils.errors import InputError
from utils.hipmri.layout import ID
from utils.hipmri.preprocess import slices_csv
from utils.registry import FoldInputs


def training_slices(cfg) -> pd.DataFrame:
    """Rows of ``prep/slices.csv`` in the train and validate splits (ids and patients as str)."""
    path = slices_csv(cfg)
    if not path.is_file():
        raise InputError(
            f"{path} not found; run python -m utils.preprocess_data --pipeline hipmri first"
        )
    table = pd.read_csv(path, dtype={ID: str, "patient": str, "mask": str}, keep_default_na=False)
    table = table[table["split"].isin(["train", "validate"])].reset_index(drop=True)
    if table.empty:
        raise InputError(f"{path} has no train or validate slices")
    return table


def fold_inputs(cfg) -> FoldInputs:
    """The pipeline's fold spec: one case per slice, the patients as groups (or the given split)."""
    table = training_slices(cfg)
    if cfg["split"] == "folds":
        return FoldInputs(table, groups=table["patient"].to_numpy())
    if cfg["split"] != "given":
        raise ConfigError(f"split must be 'given' or 'folds', got {cfg['split']!r}")
    if not {"train", "validate"} <= set(table["split"]):
        raise InputError("split: given needs slices in both keras_slices_train and _validate")
    return FoldInputs(table, given=np.where(table["split"] == "validate", 0, 1))


def train_folds(cfg, available: list[int]) -> list[int]:
    """``train.py --fold all``: fold 0 of the given split (fold 1 only completes the file), every
    fold of ``split: folds``."""
    return [0] if cfg["split"] == "given" else available
