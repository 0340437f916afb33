"""The one fold file of a pipeline: ``<id_col>,fold``, shared by every stage (and nnU-Net).

Generic over data sets: the pipeline says which column names a case and supplies optional
strata (balance labels across folds) and groups (cases that must share a fold, e.g. a patient's
scans). Assignments are a pure function of the cases, strata, groups, ``n_folds`` and ``seed``:
re-running writes identical bytes. Every reader goes through :func:`load_folds` (ids as strings,
so a numeric-looking id such as ``00123`` is never parsed as a number and lost in a merge).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from utils.errors import InputError
from utils.io import write_csv, write_text

FOLD = "fold"
CASE_ID = "case_id"


# ---- fold assignment ----------------------------------------------------------------------------
def make_folds(
    table: pd.DataFrame,
    id_col: str,
    n_folds: int = 5,
    seed: int = 42,
    strata: Sequence | None = None,
    groups: Sequence | None = None,
) -> pd.DataFrame:
    """Assign each case (row) of ``table`` to one of ``n_folds`` folds.

    Returns ``id_col`` (str) and ``fold`` (int64 in [0, n_folds)), sorted by id. ``strata`` and
    ``groups`` are per-row sequences aligned with ``table``. Without groups every case is its own
    group, which lets the plain (Stratified)KFold balance fold sizes to +-1 (the group variants
    only approximately); with groups, (Stratified)GroupKFold keeps each group in one fold.
    Independent of the input row order.
    """
    if id_col not in table.columns:
        raise InputError(f"missing id column {id_col!r} (has {list(table.columns)})")
    ids = table[id_col].astype(str)
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise InputError(
            f"{len(dup)} duplicated {id_col} values (e.g. {', '.join(map(str, dup[:3]))})"
        )
    if n_folds < 2:
        raise InputError(f"n_folds must be >= 2, got {n_folds}")
    if n_folds > len(table):
        raise InputError(f"n_folds={n_folds} exceeds the number of cases ({len(table)})")
    order = np.argsort(ids.to_numpy(), kind="stable")
    ids = ids.iloc[order].reset_index(drop=True)
    y = np.asarray(strata)[order] if strata is not None else None
    g = np.asarray(groups)[order] if groups is not None else None
    if g is None:
        splitter = (StratifiedKFold if y is not None else KFold)(
            n_splits=n_folds, shuffle=True, random_state=seed
        )
    else:
        splitter = (StratifiedGroupKFold if y is not None else GroupKFold)(
            n_splits=n_folds, shuffle=True, random_state=seed
        )
    fold = np.empty(len(ids), dtype=np.int64)
    x = np.zeros((len(ids), 1))
    for k, (_, val_index) in enumerate(splitter.split(x, y, g)):
        fold[val_index] = k
    return pd.DataFrame({id_col: ids, FOLD: fold})


def given_folds(table: pd.DataFrame, id_col: str, fold: Sequence[int]) -> pd.DataFrame:
    """A fold assignment fixed by the data set (one fold per row of ``table``), sorted by id."""
    folds = pd.DataFrame({id_col: table[id_col].astype(str), FOLD: np.asarray(fold, np.int64)})
    if folds[id_col].duplicated().any():
        raise InputError(f"{int(folds[id_col].duplicated().sum())} duplicated {id_col} values")
    present = np.unique(folds[FOLD])
    if not np.array_equal(present, np.arange(len(present))) or len(present) < 2:
        raise InputError(f"a given split needs folds 0..K-1 (K >= 2), got {present}")
    return folds.sort_values(id_col, ignore_index=True)


# ---- the fold file ------------------------------------------------------------------------------
def load_folds(path: str | os.PathLike, id_col: str) -> pd.DataFrame:
    """Read and check a fold file: unique ids (as strings), folds 0..K-1 all present; sorted by id."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found; run python -m utils.fold_split first")
    folds = pd.read_csv(path, dtype={id_col: str}, keep_default_na=False)
    if list(folds.columns) != [id_col, FOLD]:
        raise InputError(
            f"{path}: expected columns [{id_col!r}, {FOLD!r}], got {list(folds.columns)}"
        )
    if folds[id_col].duplicated().any():
        raise InputError(f"{path}: {int(folds[id_col].duplicated().sum())} duplicated cases")
    if folds.empty:
        raise InputError(f"{path}: no cases")
    if not pd.api.types.is_integer_dtype(folds[FOLD]):
        raise InputError(f"{path}: column {FOLD!r} must hold integers")
    present = np.unique(folds[FOLD])
    if not np.array_equal(present, np.arange(len(present))):
        raise InputError(f"{path}: folds must be 0..K-1 with every fold present, got {present}")
    return folds.sort_values(id_col, ignore_index=True)


def with_folds(table: pd.DataFrame, folds: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """``table`` rows that have a fold, with a ``fold`` column (ids compared as strings)."""
    keyed = table.assign(**{id_col: table[id_col].astype(str)})
    return keyed.merge(folds, on=id_col, how="inner", validate="m:1")


def _assignment_changes(old: pd.DataFrame, new: pd.DataFrame, id_col: str) -> str | None:
    """How fold assignment ``new`` differs from ``old`` in one line; None when identical."""
    both = old.merge(new, on=id_col, how="outer", suffixes=("_old", "_new"), indicator=True)
    removed = int((both["_merge"] == "left_only").sum())
    added = int((both["_merge"] == "right_only").sum())
    moved = int(((both["_merge"] == "both") & (both["fold_old"] != both["fold_new"])).sum())
    if not (removed or added or moved):
        return None
    return f"{moved} cases change fold, {added} added, {removed} removed"


def save_folds(folds: pd.DataFrame, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``folds`` atomically; refuse to replace a different assignment unless ``force``."""
    path = Path(path)
    id_col = folds.columns[0]
    if path.exists() and not force:
        try:
            changes = _assignment_changes(load_folds(path, id_col), folds, id_col)
        except ValueError as err:
            changes = f"unreadable: {err}"
        if changes:
            raise InputError(
                f"{path} holds a different fold assignment ({changes}); stages trained on the "
                "old folds would leak validation cases: pass --force (force=True) to overwrite"
            )
    return write_csv(folds, path)


def fold_summary(folds: pd.DataFrame, table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Per fold: ``n_cases`` and the mean of each of ``columns`` (index ``fold``)."""
    id_col = folds.columns[0]
    merged = with_folds(table, folds, id_col)
    rates = merged.groupby(FOLD)[list(columns)].mean()
    return rates.assign(n_cases=merged.groupby(FOLD).size())[["n_cases", *columns]]


# ---- nnU-Net splits_final.json ------------------------------------------------------------------
def _check_case_ids(case_ids: Mapping[str, str], folds: pd.DataFrame, id_col: str) -> None:
    unknown = sorted(set(case_ids) - set(folds[id_col]))
    if unknown:
        raise InputError(f"{len(unknown)} nnU-Net cases have no fold (e.g. {unknown[:3]})")
    ids = pd.Series(list(case_ids.values()), dtype=str)
    if ids.duplicated().any():
        raise InputError(
            f"nnU-Net case ids are not unique (e.g. {ids[ids.duplicated()].iloc[0]!r})"
        )
    # Case ids become file names ({case}_0000.nii.gz) and keys in nnU-Net's JSON files.
    bad = ids[(ids == "") | ids.str.contains(r"[\s/\\]")]
    if len(bad):
        raise InputError(
            f"nnU-Net case ids must be non-empty without spaces or slashes: {bad.iloc[0]!r}"
        )


def nnunet_splits(
    folds: pd.DataFrame, case_ids: Mapping[str, str] | None = None
) -> list[dict[str, list[str]]]:
    """nnU-Net v2 splits: one ``{"train": [...], "val": [...]}`` per fold, case ids sorted.

    ``case_ids`` maps the ids of the cases in the nnU-Net dataset to their nnU-Net case
    identifiers; None lists every case under its id. Fold k's ``val`` holds exactly the cases
    with ``fold == k``.
    """
    id_col = folds.columns[0]
    if case_ids is None:
        case_ids = dict(zip(folds[id_col], folds[id_col], strict=True))
    _check_case_ids(case_ids, folds, id_col)
    cases = folds[folds[id_col].isin(case_ids)].assign(case=lambda d: d[id_col].map(case_ids))
    splits = []
    for k in range(int(folds[FOLD].max()) + 1):
        val = cases[FOLD] == k
        split = {"train": sorted(cases.loc[~val, "case"]), "val": sorted(cases.loc[val, "case"])}
        if not split["train"] or not split["val"]:
            raise InputError(
                f"fold {k}: {len(split['train'])} train / {len(split['val'])} val nnU-Net cases; "
                "nnU-Net needs both (too few cases for this many folds)"
            )
        splits.append(split)
    return splits


def write_nnunet_splits(
    folds: pd.DataFrame, path: str | os.PathLike, case_ids: Mapping[str, str] | None = None
) -> Path:
    """Write ``nnunet_splits(folds, case_ids)`` as ``splits_final.json`` atomically."""
    return write_text(json.dumps(nnunet_splits(folds, case_ids), indent=2) + "\n", path)


def read_case_map(path: str | os.PathLike, id_col: str) -> dict[str, str]:
    """Case-map CSV -> {id: nnU-Net case id}; column ``case_id`` optional (default: the id)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if id_col not in table.columns:
        raise InputError(f"{path}: missing column {id_col!r} (has {list(table.columns)})")
    ids = table[CASE_ID] if CASE_ID in table.columns else table[id_col]
    if table[id_col].duplicated().any() or (table[id_col] == "").any() or (ids == "").any():
        raise InputError(f"{path}: {id_col} must be unique and every row needs a case id")
    return dict(zip(table[id_col], ids, strict=True))
