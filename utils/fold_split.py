"""The one fold file every stage reads: ``StudyInstanceUID,fold``, stratified on the label pattern.

Usage::

    python utils/fold_split.py --train-csv data/rsna/train.csv --out output/folds.csv \
        [--n-folds 5] [--seed 42] [--force] \
        [--nnunet-splits PATH/splits_final.json [--nnunet-case-map CASES_CSV]]

Folds are made once per study (one row per study, so every study lies in exactly one fold and
no study can leak across folds) and are a pure function of the labels, ``n_folds`` and ``seed``:
re-running writes identical bytes. An existing fold file with a different assignment is only
replaced with ``--force``, because mixing stages trained on different folds leaks validation
studies into training.

``--nnunet-splits`` also writes nnU-Net v2's ``splits_final.json`` from the same folds, so
segmentation OOF predictions line up with the classifier folds. ``--nnunet-case-map`` names the
studies of the nnU-Net dataset (column ``StudyInstanceUID``) and optionally their nnU-Net case
identifiers (column ``case_id``, default: the UID itself); without it every study is listed.
nnU-Net reads the file from ``$nnUNet_preprocessed/DatasetXXX/`` (planning also copies one found
in ``$nnUNet_raw/DatasetXXX/``); UIDs are valid case ids (nnU-Net v2 only strips ``_0000`` and
the file ending, dots are fine).
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from utils.io import write_csv, write_text
from utils.metric import TARGETS, UID, VERTEBRAE

logger = logging.getLogger(__name__)

FOLD = "fold"
CASE_ID = "case_id"
# Fractured-vertebra counts above this share one stratum (3+ fractures are ~5 % of studies).
MAX_COUNT_STRATUM = 3


# ---- fold assignment ----------------------------------------------------------------------------
def _validate_train(train: pd.DataFrame, n_folds: int) -> None:
    missing = [c for c in (UID, *TARGETS) if c not in train.columns]
    if missing:
        raise ValueError(f"train table: missing columns {missing} (has {list(train.columns)})")
    dup = train.loc[train[UID].duplicated(), UID].unique()
    if len(dup):
        raise ValueError(
            f"train table: {len(dup)} duplicated {UID} values (e.g. {', '.join(map(str, dup[:3]))})"
        )
    labels = train[TARGETS].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"train table: label columns {TARGETS} must hold only 0/1")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n_folds > len(train):
        raise ValueError(f"n_folds={n_folds} exceeds the number of studies ({len(train)})")


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

    Returns ``StudyInstanceUID`` (str) and ``fold`` (int64 in [0, n_folds)), sorted by UID.
    Stratified on ``label_strata``: fold sizes differ by at most 1 and each stratum is spread
    evenly, so positive rates match across folds. Grouping by study holds by construction (one
    row per study is enforced), so sklearn's plain ``StratifiedKFold`` is used: on unique groups
    ``StratifiedGroupKFold`` gives the same grouping but only approximately equal fold sizes.
    Independent of the input row order.
    """
    _validate_train(train, n_folds)
    table = train.assign(**{UID: train[UID].astype(str)}).sort_values(UID, ignore_index=True)
    strata = label_strata(table, n_folds)
    fold = np.empty(len(table), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_index) in enumerate(splitter.split(np.zeros((len(table), 1)), strata)):
        fold[val_index] = k
    return pd.DataFrame({UID: table[UID], FOLD: fold})


def fold_summary(folds: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Per fold: ``n_studies`` and the positive rate of each target (index ``fold``)."""
    merged = folds.merge(train.assign(**{UID: train[UID].astype(str)}), on=UID, validate="1:1")
    rates = merged.groupby(FOLD)[TARGETS].mean()
    return rates.assign(n_studies=merged.groupby(FOLD).size())[["n_studies", *TARGETS]]


# ---- the fold file ------------------------------------------------------------------------------
def load_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a fold file: unique UIDs, folds 0..K-1 all present; sorted by UID."""
    folds = pd.read_csv(path, dtype={UID: str})
    if list(folds.columns) != [UID, FOLD]:
        raise ValueError(f"{path}: expected columns [{UID!r}, {FOLD!r}], got {list(folds.columns)}")
    if folds[UID].duplicated().any():
        raise ValueError(f"{path}: {int(folds[UID].duplicated().sum())} duplicated studies")
    if folds.empty:
        raise ValueError(f"{path}: no studies")
    if not pd.api.types.is_integer_dtype(folds[FOLD]):
        raise ValueError(f"{path}: column {FOLD!r} must hold integers")
    present = np.unique(folds[FOLD])
    if not np.array_equal(present, np.arange(len(present))):
        raise ValueError(f"{path}: folds must be 0..K-1 with every fold present, got {present}")
    return folds.sort_values(UID, ignore_index=True)


def _assignment_changes(old: pd.DataFrame, new: pd.DataFrame) -> str | None:
    """How fold assignment ``new`` differs from ``old`` in one line; None when identical."""
    both = old.merge(new, on=UID, how="outer", suffixes=("_old", "_new"), indicator=True)
    removed = int((both["_merge"] == "left_only").sum())
    added = int((both["_merge"] == "right_only").sum())
    moved = int(((both["_merge"] == "both") & (both["fold_old"] != both["fold_new"])).sum())
    if not (removed or added or moved):
        return None
    return f"{moved} studies change fold, {added} added, {removed} removed"


def save_folds(folds: pd.DataFrame, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``folds`` atomically; refuse to replace a different assignment unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        try:
            changes = _assignment_changes(load_folds(path), folds)
        except ValueError as err:
            changes = f"unreadable: {err}"
        if changes:
            raise FileExistsError(
                f"{path} holds a different fold assignment ({changes}); stages trained on the "
                "old folds would leak validation studies: pass --force (force=True) to overwrite"
            )
    return write_csv(folds, path)


# ---- nnU-Net splits_final.json ------------------------------------------------------------------
def _check_case_ids(case_ids: Mapping[str, str], folds: pd.DataFrame) -> None:
    unknown = sorted(set(case_ids) - set(folds[UID]))
    if unknown:
        raise ValueError(f"{len(unknown)} nnU-Net studies have no fold (e.g. {unknown[:3]})")
    ids = pd.Series(list(case_ids.values()), dtype=str)
    if ids.duplicated().any():
        raise ValueError(
            f"nnU-Net case ids are not unique (e.g. {ids[ids.duplicated()].iloc[0]!r})"
        )
    # Case ids become file names ({case}_0000.nii.gz) and keys in nnU-Net's JSON files.
    bad = ids[(ids == "") | ids.str.contains(r"[\s/\\]")]
    if len(bad):
        raise ValueError(
            f"nnU-Net case ids must be non-empty without spaces or slashes: {bad.iloc[0]!r}"
        )


def nnunet_splits(
    folds: pd.DataFrame, case_ids: Mapping[str, str] | None = None
) -> list[dict[str, list[str]]]:
    """nnU-Net v2 splits: one ``{"train": [...], "val": [...]}`` per fold, case ids sorted.

    ``case_ids`` maps the UIDs of the studies in the nnU-Net dataset to their case identifiers;
    None lists every study under its UID. Fold k's ``val`` holds exactly the studies with
    ``fold == k``.
    """
    if case_ids is None:
        case_ids = dict(zip(folds[UID], folds[UID], strict=True))
    _check_case_ids(case_ids, folds)
    cases = folds[folds[UID].isin(case_ids)].assign(case=lambda d: d[UID].map(case_ids))
    splits = []
    for k in range(int(folds[FOLD].max()) + 1):
        val = cases[FOLD] == k
        split = {"train": sorted(cases.loc[~val, "case"]), "val": sorted(cases.loc[val, "case"])}
        if not split["train"] or not split["val"]:
            raise ValueError(
                f"fold {k}: {len(split['train'])} train / {len(split['val'])} val nnU-Net cases; "
                "nnU-Net needs both (too few cases for this many folds)"
            )
        splits.append(split)
    return splits


def write_nnunet_splits(
    folds_df: pd.DataFrame, path: str | os.PathLike, case_ids: Mapping[str, str] | None = None
) -> Path:
    """Write ``nnunet_splits(folds_df, case_ids)`` as ``splits_final.json`` atomically."""
    splits = nnunet_splits(folds_df, case_ids)
    return write_text(json.dumps(splits, indent=2) + "\n", path)


def read_case_map(path: str | os.PathLike) -> dict[str, str]:
    """Case-map CSV -> {UID: nnU-Net case id}; column ``case_id`` optional (default: the UID)."""
    table = pd.read_csv(path, dtype=str)
    if UID not in table.columns:
        raise ValueError(f"{path}: missing column {UID!r} (has {list(table.columns)})")
    ids = table[CASE_ID] if CASE_ID in table.columns else table[UID]
    if table[UID].duplicated().any() or table[UID].isna().any() or ids.isna().any():
        raise ValueError(f"{path}: {UID} must be unique and every row needs a case id")
    return dict(zip(table[UID], ids, strict=True))


# ---- CLI ----------------------------------------------------------------------------------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-csv", required=True, help="train.csv: StudyInstanceUID + targets")
    parser.add_argument("--out", required=True, help="fold file to write (e.g. output/folds.csv)")
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--force", action="store_true", help="replace a different fold file")
    parser.add_argument("--nnunet-splits", help="also write nnU-Net's splits_final.json here")
    parser.add_argument(
        "--nnunet-case-map", help="CSV: StudyInstanceUID[,case_id] of the nnU-Net dataset's studies"
    )
    args = parser.parse_args(argv)
    if args.nnunet_case_map and not args.nnunet_splits:
        parser.error("--nnunet-case-map needs --nnunet-splits")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train = pd.read_csv(args.train_csv, dtype={UID: str})
        folds = make_folds(train, n_folds=args.n_folds, seed=args.seed)
        save_folds(folds, args.out, force=args.force)
        if args.nnunet_splits:
            case_ids = read_case_map(args.nnunet_case_map) if args.nnunet_case_map else None
            write_nnunet_splits(folds, args.nnunet_splits, case_ids)
            logger.info("wrote %s", args.nnunet_splits)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(fold_summary(folds, train).to_string(float_format="{:.3f}".format))
    print(f"wrote {args.out}: {len(folds)} studies in {args.n_folds} folds (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
