"""RSNA 2022 folds: one fold per study, stratified on the label pattern (utils/folds.py does the split).

Strata: (patient_overall, fractured-vertebra count capped at 3, rarest fractured vertebra), with
strata too small for every fold merged into a neighbour, so each vertebra's positives spread
evenly. One row per study is enforced, so grouping by study holds by construction.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from utils import folds
from utils.errors import InputError
from utils.paths import data_dir
from utils.registry import FoldInputs
from utils.rsna import layout
from utils.rsna.metric import TARGETS, UID, VERTEBRAE

logger = logging.getLogger(__name__)

# Fractured-vertebra counts above this share one stratum (3+ fractures are ~5 % of studies).
MAX_COUNT_STRATUM = 3


def _validate_train(train: pd.DataFrame, n_folds: int) -> None:
    missing = [c for c in (UID, *TARGETS) if c not in train.columns]
    if missing:
        raise InputError(f"train table: missing columns {missing} (has {list(train.columns)})")
    dup = train.loc[train[UID].duplicated(), UID].unique()
    if len(dup):
        raise InputError(
            f"train table: {len(dup)} duplicated {UID} values (e.g. {', '.join(map(str, dup[:3]))})"
        )
    labels = train[TARGETS].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"train table: label columns {TARGETS} must hold only 0/1")
    if n_folds < 2:
        raise InputError(f"n_folds must be >= 2, got {n_folds}")
    if n_folds > len(train):
        raise InputError(f"n_folds={n_folds} exceeds the number of studies ({len(train)})")


def _stratum_keys(train: pd.DataFrame) -> np.ndarray:
    """Per study (patient_overall, fractured-vertebra count capped at 3, rarest fractured vertebra).

    int64 (N, 3); the vertebra is its index 0..6 (C1..C7), -1 for none. Keying on the rarest
    fractured vertebra (by prevalence in ``train``) spreads each vertebra's positives evenly.
    """
    overall = train["patient_overall"].to_numpy(np.int64)
    vert = train[VERTEBRAE].to_numpy(np.int64)
    inconsistent = int((vert.any(axis=1) != (overall == 1)).sum())
    if inconsistent:
        logger.warning("%d studies have patient_overall != any(C1..C7)", inconsistent)
    count = np.minimum(vert.sum(axis=1), MAX_COUNT_STRATUM)
    prevalence = vert.mean(axis=0)
    rarest = np.where(
        vert.any(axis=1), np.argmin(np.where(vert == 1, prevalence, np.inf), axis=1), -1
    )
    return np.stack([overall, count, rarest], axis=1)


def label_strata(train: pd.DataFrame, n_folds: int) -> np.ndarray:
    """Stratum index per study, int64 (N,), numbered in lexicographic order of ``_stratum_keys``.

    A stratum with fewer than ``n_folds`` studies is merged into the adjacent stratum (in key
    order) that shares the longest key prefix, the lower one on ties, until every stratum can
    appear in every fold. Strata of one ``patient_overall`` value stay contiguous, which lets
    ``StratifiedKFold``'s round-robin allocation balance the positive count to +-1 per fold.
    """
    keys = _stratum_keys(train)
    while True:
        uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        rare = np.flatnonzero(counts < n_folds)
        if len(uniq) == 1 or not len(rare):
            return inverse.astype(np.int64)
        i = rare[-1]
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(uniq)]
        # Length of the common key prefix: index of the first differing component.
        shared = [int(np.argmin(np.append(uniq[j] == uniq[i], False))) for j in neighbours]
        keys[inverse == i] = uniq[neighbours[int(np.argmax(shared))]]


def make_folds(train: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign each study of a train.csv-schema table to one of ``n_folds`` folds.

    Returns ``StudyInstanceUID`` (str) and ``fold``, sorted by UID. Stratified on
    ``label_strata`` (which depends only on the labels, not the row order): fold sizes differ by
    at most 1 and positive rates match across folds.
    """
    _validate_train(train, n_folds)
    return folds.make_folds(train, UID, n_folds, seed, strata=label_strata(train, n_folds))


def fold_summary(fold_table: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Per fold: ``n_cases`` and the positive rate of each target."""
    return folds.fold_summary(fold_table, train, TARGETS)


def fold_inputs(cfg) -> FoldInputs:
    """train.csv of ``cfg.data_dir``, checked, with its label strata (the pipeline's fold spec)."""
    path = layout.labels_csv(data_dir(cfg))
    if not path.is_file():
        raise InputError(f"{path} not found: data_dir must be the competition folder")
    train = pd.read_csv(path, dtype={UID: str})
    _validate_train(train, int(cfg["n_folds"]))
    return FoldInputs(
        train, strata=label_strata(train, int(cfg["n_folds"])), summary=tuple(TARGETS)
    )
