"""Fold file: one fold per case, deterministic, balanced, stale-file guard, ids as strings, nnU-Net splits."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils import folds as generic
from utils.errors import InputError
from utils.fold_split import main
from utils.folds import load_folds as load_folds_by
from utils.folds import nnunet_splits, save_folds, with_folds, write_nnunet_splits
from utils.rsna.folds import fold_summary, label_strata, make_folds
from utils.rsna.metric import UID, VERTEBRAE

REPO = Path(__file__).resolve().parents[1]
RSNA_BASE = REPO / "config" / "rsna" / "base.yaml"


def load_folds(path):
    return load_folds_by(path, UID)


def synthetic_train(n: int = 100, seed: int = 0) -> pd.DataFrame:
    """train.csv-like labels: ~48 % positive studies, 1-4 fractured vertebrae each."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.48
    vert = (rng.random((n, 7)) < 0.25) & positive[:, None]
    lonely = positive & ~vert.any(axis=1)
    vert[lonely, rng.integers(0, 7, lonely.sum())] = True
    table = pd.DataFrame(vert.astype(np.int64), columns=VERTEBRAE)
    table.insert(0, "patient_overall", positive.astype(np.int64))
    table.insert(
        0,
        "StudyInstanceUID",
        [f"1.2.826.0.1.3680043.{rng.integers(1, 10**6)}.{i}" for i in range(n)],
    )
    return table


def test_every_study_in_exactly_one_fold():
    train = synthetic_train()
    folds = make_folds(train, n_folds=5, seed=42)
    assert list(folds.columns) == ["StudyInstanceUID", "fold"]
    assert folds["StudyInstanceUID"].is_unique and folds["StudyInstanceUID"].is_monotonic_increasing
    assert set(folds["StudyInstanceUID"]) == set(train["StudyInstanceUID"])
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]


def test_deterministic_for_a_seed_and_independent_of_row_order():
    train = synthetic_train()
    folds = make_folds(train, seed=42)
    pd.testing.assert_frame_equal(make_folds(train, seed=42), folds)
    pd.testing.assert_frame_equal(make_folds(train.sample(frac=1, random_state=1), seed=42), folds)
    assert (make_folds(train, seed=7)["fold"] != folds["fold"]).any()


@pytest.mark.parametrize("n", [100, 101, 103])
def test_balanced_sizes_and_positive_rates(n):
    train = synthetic_train(n, seed=n)
    folds = make_folds(train, n_folds=5, seed=42)
    summary = fold_summary(folds, train)
    assert summary["n_cases"].max() - summary["n_cases"].min() <= 1
    overall = train["patient_overall"].mean()
    # One study of a 20-study fold moves the rate by 0.05.
    assert (summary["patient_overall"] - overall).abs().max() <= 0.06
    strata = label_strata(train.sort_values("StudyInstanceUID"), 5)
    per_fold = pd.crosstab(strata, folds["fold"].to_numpy())
    assert (per_fold.max(axis=1) - per_fold.min(axis=1)).max() <= 1


def label_table(vert: np.ndarray, overall: np.ndarray | None = None) -> pd.DataFrame:
    """train.csv-like table from a (N, 7) 0/1 vertebra matrix; overall defaults to any()."""
    table = pd.DataFrame(vert.astype(np.int64), columns=VERTEBRAE)
    table.insert(0, "patient_overall", vert.max(axis=1) if overall is None else overall)
    table.insert(0, "StudyInstanceUID", [f"1.2.{i:03d}" for i in range(len(vert))])
    return table


def test_strata_key_on_overall_count_and_rarest_vertebra():
    vert = np.zeros((25, 7), dtype=np.int64)
    vert[5:10, 6] = 1  # C7 alone
    vert[10:15, 0] = 1  # C1 alone
    vert[15:20, [3, 6]] = 1  # C4 + C7: keyed on C4, the rarer one
    vert[20:25, 6] = 1  # C7 alone again
    strata = label_strata(label_table(vert), n_folds=5)
    # Key order: negatives; one fracture (C1, C7); two fractures (C4).
    expected = np.repeat([0, 2, 1, 3, 2], 5)
    np.testing.assert_array_equal(strata, expected)


def test_rare_strata_are_merged_so_sklearn_does_not_warn(caplog):
    # 30 negatives, 27 C1 alone, 2 with C1-C3 (rarer than 5 folds) and one inconsistent row
    # (C1 without patient_overall).
    vert = np.zeros((60, 7), dtype=np.int64)
    vert[30:, 0] = 1
    vert[57:59, :3] = 1
    overall = np.r_[np.zeros(30), np.ones(29), 0].astype(np.int64)
    train = label_table(vert, overall)
    strata = label_strata(train, 5)
    # Each rare stratum joins the neighbour sharing the longest key prefix: same patient_overall.
    assert len(set(strata[30:59])) == 1 and strata[59] == strata[0]
    assert "1 studies have patient_overall != any(C1..C7)" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns about classes rarer than n_splits
        folds = make_folds(train, n_folds=5)
    assert (folds["fold"].value_counts() == 12).all()


@pytest.mark.parametrize(
    ("corrupt", "n_folds", "message"),
    [
        (lambda t: pd.concat([t, t.iloc[:2]]), 5, r"2 duplicated StudyInstanceUID"),
        (lambda t: t.drop(columns=["C3", "C6"]), 5, r"missing columns \['C3', 'C6'\]"),
        (lambda t: t.iloc[:4], 5, r"n_folds=5 exceeds the number of studies \(4\)"),
        (lambda t: t, 1, r"n_folds must be >= 2"),
        (lambda t: t.assign(C2=np.where(t.index == 0, np.nan, t["C2"])), 5, r"only 0/1"),
    ],
)
def test_make_folds_rejects_bad_input(corrupt, n_folds, message):
    with pytest.raises(ValueError, match=message):
        make_folds(corrupt(synthetic_train(20)), n_folds=n_folds)


# ---- fold file ----------------------------------------------------------------------------------
def test_stale_fold_file_guard(tmp_path):
    train, path = synthetic_train(), tmp_path / "folds.csv"
    folds = make_folds(train, seed=42)
    save_folds(folds, path)
    first = path.read_bytes()
    save_folds(make_folds(train, seed=42), path)  # same assignment: allowed, same bytes
    assert path.read_bytes() == first
    pd.testing.assert_frame_equal(load_folds(path), folds)

    other = make_folds(train, seed=7)
    moved = int((other["fold"] != folds["fold"]).sum())
    with pytest.raises(
        InputError, match=rf"{moved} cases change fold, 0 added, 0 removed.*--force"
    ):
        save_folds(other, path)
    assert path.read_bytes() == first
    save_folds(other, path, force=True)
    pd.testing.assert_frame_equal(load_folds(path), other)


def test_load_folds_rejects_gaps(tmp_path):
    path = tmp_path / "folds.csv"
    pd.DataFrame({"StudyInstanceUID": ["1.1", "1.2"], "fold": [0, 2]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"folds must be 0\.\.K-1"):
        load_folds(path)


# ---- nnU-Net splits -----------------------------------------------------------------------------
def test_nnunet_splits_match_fold_file(tmp_path):
    folds = make_folds(synthetic_train(), seed=42)
    path = write_nnunet_splits(folds, tmp_path / "splits_final.json")
    splits = json.loads(path.read_text())
    assert len(splits) == 5
    all_ids = set(folds["StudyInstanceUID"])
    for k, split in enumerate(splits):
        assert set(split) == {"train", "val"}
        assert set(split["val"]) == set(folds.loc[folds["fold"] == k, "StudyInstanceUID"])
        assert set(split["train"]) == all_ids - set(split["val"])
        assert split["train"] == sorted(split["train"])


def test_nnunet_splits_with_case_map_keep_only_mapped_studies():
    folds = make_folds(synthetic_train(), seed=42)
    uids = folds["StudyInstanceUID"].iloc[::4]  # a 25-study "segmented" subset
    case_ids = {uid: f"RSNA_{i:03d}" for i, uid in enumerate(uids)}
    splits = nnunet_splits(folds, case_ids)
    fold_of = dict(zip(folds["StudyInstanceUID"], folds["fold"], strict=True))
    for k, split in enumerate(splits):
        assert set(split["train"]) | set(split["val"]) == set(case_ids.values())
        assert {u for u, c in case_ids.items() if c in split["val"]} == {
            u for u in uids if fold_of[u] == k
        }


@pytest.mark.parametrize(
    ("make_map", "message"),
    [
        (lambda folds: {"9.9.9": "x"}, r"1 nnU-Net cases have no fold"),
        (lambda folds: dict.fromkeys(folds["StudyInstanceUID"].iloc[:2], "case"), r"not unique"),
        (lambda folds: {folds["StudyInstanceUID"].iloc[0]: "a/b"}, r"without spaces or slashes"),
        (
            lambda folds: {u: u for u in folds.loc[folds["fold"] == 0, "StudyInstanceUID"]},
            r"fold 0: 0 train / 20 val nnU-Net cases",
        ),
    ],
)
def test_nnunet_splits_reject_bad_case_maps(make_map, message):
    folds = make_folds(synthetic_train(), seed=42)
    with pytest.raises(ValueError, match=message):
        nnunet_splits(folds, make_map(folds))


# ---- generic ------------------------------------------------------------------------------------
def test_numeric_looking_ids_survive_the_fold_merge(tmp_path):
    """Ids such as 00123 or 1e5 stay strings: none is parsed as a number and lost in a merge."""
    ids = ["00123", "1e5", "0042", "7", "NaN", "3.10"]
    table = pd.DataFrame({"case": ids, "label": [0, 1, 0, 1, 0, 1]})
    folds = generic.make_folds(table, "case", n_folds=2, seed=0, strata=table["label"])
    path = save_folds(folds, tmp_path / "folds.csv")
    loaded = generic.load_folds(path, "case")
    assert sorted(loaded["case"]) == sorted(ids)
    stage = pd.DataFrame({"case": ids * 2, "slice": range(12)})  # a stage table, 2 rows per case
    merged = with_folds(stage, loaded, "case")
    assert len(merged) == 12 and set(merged["case"]) == set(ids)


def test_groups_keep_a_patient_in_one_fold():
    table = pd.DataFrame({"case": [f"c{i}" for i in range(12)], "patient": np.repeat(range(4), 3)})
    folds = generic.make_folds(table, "case", 2, seed=0, groups=table["patient"])
    per_patient = with_folds(table, folds, "case").groupby("patient")["fold"].nunique()
    assert (per_patient == 1).all() and folds["fold"].nunique() == 2


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_writes_folds_and_splits_and_guards(tmp_path, capsys):
    data, out, splits = tmp_path / "data", tmp_path / "out" / "folds.csv", tmp_path / "splits.json"
    data.mkdir()
    train = synthetic_train()
    train.to_csv(data / "train.csv", index=False)
    case_map = tmp_path / "cases.csv"
    train[["StudyInstanceUID"]].iloc[:30].to_csv(case_map, index=False)
    args = ["--CFG", str(RSNA_BASE), "--data-dir", str(data), "--out", str(out)]

    main([*args, "--nnunet-splits", str(splits), "--nnunet-case-map", str(case_map)])
    assert "wrote" in capsys.readouterr().out
    first = out.read_bytes()
    assert first.startswith(b"StudyInstanceUID,fold\n")
    listed = json.loads(splits.read_text())
    assert sorted(listed[0]["train"] + listed[0]["val"]) == sorted(
        train["StudyInstanceUID"].iloc[:30]
    )
    pd.testing.assert_frame_equal(load_folds(out), make_folds(train, 5, seed=42))

    main(args)
    assert out.read_bytes() == first
    with pytest.raises(SystemExit, match="^error: .*different fold assignment.*--force"):
        main([*args, "seed=1"])
    assert out.read_bytes() == first
    main([*args, "seed=1", "--force"])
    assert out.read_bytes() != first
    with pytest.raises(SystemExit, match="^error: .*train.csv not found"):
        main([*args, "--data-dir", str(tmp_path / "missing")])


def test_cli_runs_as_a_module_into_the_pipeline_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    synthetic_train(30).to_csv(data / "train.csv", index=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "utils.fold_split",
            "--CFG",
            "config/rsna/base.yaml",
            f"data_dir={data}",
            f"output_dir={tmp_path / 'output'}",
            "n_folds=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "output" / "rsna" / "folds.csv"
    assert result.stdout.strip().splitlines()[-1] == f"wrote {out}: 30 cases in 3 folds (seed 42)"
    assert sorted(load_folds(out)["fold"].unique()) == [0, 1, 2]
