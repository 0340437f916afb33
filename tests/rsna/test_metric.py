"""Competition metric: hand-computed cases, an independent loop implementation, reference anchors,
the grader's submission checks and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils.rsna.metric import (
    TARGETS,
    VERTEBRAE,
    WEIGHTS,
    constant_prior_baseline,
    long_to_wide,
    noisy_or,
    per_target_auc,
    per_target_logloss,
    score,
    score_submission,
    truth_to_long,
    validate_submission,
    wide_to_long,
)
from utils.rsna.metric import main as metric_main

REPO = Path(__file__).resolve().parents[2]
LN2 = math.log(2)
# Label counts of the competition's 2,019 train studies (counted from its train.csv).
TRAIN_POSITIVES = dict(patient_overall=961, C1=146, C2=285, C3=73, C4=108, C5=162, C6=277, C7=393)
FRACTURES_PER_STUDY = {0: 1058, 1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}


def synthetic_truth(n: int, seed: int = 0) -> pd.DataFrame:
    """Wide labels for ``n`` studies; patient_overall = any(C1..C7), as in train.csv."""
    rng = np.random.default_rng(seed)
    vert = (rng.random((n, 7)) < 0.15).astype(np.int64)
    table = pd.DataFrame(vert, columns=VERTEBRAE)
    table.insert(0, "patient_overall", vert.max(axis=1))
    table.insert(0, "StudyInstanceUID", [f"1.2.826.0.1.3680043.{1000 + i}" for i in range(n)])
    return table


def constant_pred(truth: pd.DataFrame, value: float | dict[str, float]) -> pd.DataFrame:
    values = value if isinstance(value, dict) else dict.fromkeys(TARGETS, value)
    return pd.DataFrame({"StudyInstanceUID": truth["StudyInstanceUID"], **values})


def loop_score(pred: pd.DataFrame, truth: pd.DataFrame, per_study: bool) -> float:
    """Straightforward reimplementation, one study and one target at a time."""
    pred_by_uid = pred.set_index("StudyInstanceUID")
    study_scores, total, total_w = [], 0.0, 0.0
    for _, row in truth.iterrows():
        num = den = 0.0
        for t in TARGETS:
            y = int(row[t])
            p = min(max(float(pred_by_uid.loc[row["StudyInstanceUID"], t]), 1e-15), 1 - 1e-15)
            w = WEIGHTS[t][0] if y == 1 else WEIGHTS[t][1]
            num += w * -(math.log(p) if y == 1 else math.log(1 - p))
            den += w
        study_scores.append(num / den)
        total, total_w = total + num, total_w + den
    return sum(study_scores) / len(study_scores) if per_study else total / total_w


def exact_count_truth() -> pd.DataFrame:
    """2019 studies with exactly the real per-target positive counts and fractures-per-study.

    Studies with the most fractures first, each takes the vertebrae with the most positives
    left (greedy bipartite degree construction); the asserts prove the counts are exact.
    """
    ks = np.repeat(list(FRACTURES_PER_STUDY), list(FRACTURES_PER_STUDY.values()))[::-1]
    left = np.array([TRAIN_POSITIVES[v] for v in VERTEBRAE])
    vert = np.zeros((len(ks), 7), dtype=np.int64)
    for i, k in enumerate(ks):
        chosen = np.argsort(-left, kind="stable")[:k]
        vert[i, chosen] = 1
        left[chosen] -= 1
    assert (left == 0).all() and (vert.sum(axis=1) == ks).all()
    truth = pd.DataFrame(vert, columns=VERTEBRAE)
    truth.insert(0, "patient_overall", vert.max(axis=1))
    truth.insert(0, "StudyInstanceUID", [f"1.2.826.0.1.3680043.{i}" for i in range(len(ks))])
    assert truth[TARGETS].sum().to_dict() == TRAIN_POSITIVES
    return truth


# ---- the formula --------------------------------------------------------------------------------
def test_all_half_scores_ln2():
    truth = synthetic_truth(40)
    pred = constant_pred(truth, 0.5)
    assert score(pred, truth) == pytest.approx(LN2, abs=1e-12)
    assert score(pred, truth, per_study=False) == pytest.approx(LN2, abs=1e-12)


def test_perfect_submission_scores_about_zero():
    truth = synthetic_truth(40)
    pred = truth.astype({t: float for t in TARGETS})
    assert 0 < score(pred, truth) < 1e-10
    assert 0 < score(pred, truth, per_study=False) < 1e-10


def test_hand_computed_two_studies_per_study_vs_global():
    # A: nothing fractured, all 0.5 -> every loss ln2, weight 7 + 7 x 1 = 14.
    # B: overall and C1 fractured, predicted 0.25 (loss 2 ln2), the rest 0.5 (loss ln2);
    #    weights 14 + 2 + 6 x 1 = 22, weighted loss 28 + 4 + 6 = 38 ln2.
    truth = pd.DataFrame(
        {"StudyInstanceUID": ["1.2.3.A", "1.2.3.B"], "patient_overall": [0, 1], "C1": [0, 1]}
        | {v: [0, 0] for v in VERTEBRAE[1:]}
    )
    pred = constant_pred(truth, 0.5)
    pred.loc[1, ["patient_overall", "C1"]] = 0.25
    assert score(pred, truth) == pytest.approx((1 + 38 / 22) / 2 * LN2, rel=1e-12)  # 15/11 ln2
    assert score(pred, truth, per_study=False) == pytest.approx(52 / 36 * LN2, rel=1e-12)
    losses = per_target_logloss(pred, truth)
    assert losses["patient_overall"] == pytest.approx((7 + 28) / 21 * LN2, rel=1e-12)
    assert losses["C1"] == pytest.approx((1 + 4) / 3 * LN2, rel=1e-12)
    assert losses["C7"] == pytest.approx(LN2, rel=1e-12)


@pytest.mark.parametrize("per_study", [True, False])
def test_matches_loop_implementation_on_random_data(per_study):
    rng = np.random.default_rng(1)
    truth = synthetic_truth(60, seed=1)
    pred = constant_pred(truth, 0.0)
    pred[TARGETS] = rng.random((60, 8)) ** 3  # skewed, with values near 0
    pred.loc[0, "C1"], pred.loc[1, "C2"] = 0.0, 1.0  # exercise the clipping
    shuffled = pred.sample(frac=1, random_state=0)  # score aligns rows by UID
    assert score(shuffled, truth, per_study) == pytest.approx(
        loop_score(pred, truth, per_study), rel=1e-12
    )


def test_global_score_is_weighted_average_of_per_target_losses():
    truth = synthetic_truth(50, seed=2)
    pred = constant_pred(truth, 0.0)
    pred[TARGETS] = np.random.default_rng(2).random((50, 8))
    w = np.where(
        truth[TARGETS] == 1, [WEIGHTS[t][0] for t in TARGETS], [WEIGHTS[t][1] for t in TARGETS]
    )
    losses = np.array(list(per_target_logloss(pred, truth).values()))
    assert (losses * w.sum(axis=0)).sum() / w.sum() == pytest.approx(
        score(pred, truth, per_study=False), rel=1e-12
    )


# ---- reference anchors: the constant-prior and all-0.5 scores of the real train.csv --------------
def test_global_anchor_with_exact_train_counts():
    # The global score of a constant prediction depends only on per-target positive counts, which
    # are known exactly; the per-study score also needs the joint label pattern (next test).
    truth = exact_count_truth()
    assert round(constant_prior_baseline(truth, truth, per_study=False), 4) == 0.6127
    rounded = dict(
        zip(TARGETS, [0.476, 0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195], strict=True)
    )
    assert round(score(constant_pred(truth, rounded), truth, per_study=False), 4) == 0.6127
    assert round(score(constant_pred(truth, 0.5), truth), 4) == 0.6931


REAL_TRAIN = REPO / "data" / "rsna" / "train.csv"


@pytest.mark.skipif(
    not REAL_TRAIN.exists() or sum(1 for _ in REAL_TRAIN.open()) != 2020,
    reason="needs the real 2019-study train.csv at data/rsna/train.csv",
)
def test_anchors_on_real_train_labels():
    truth = pd.read_csv(REAL_TRAIN, dtype={"StudyInstanceUID": str})
    assert round(constant_prior_baseline(truth, truth), 4) == 0.5638
    assert round(constant_prior_baseline(truth, truth, per_study=False), 4) == 0.6127


def test_constant_prior_baseline_uses_train_prevalence():
    train, evaluation = synthetic_truth(30, seed=3), synthetic_truth(20, seed=4)
    prior = train[TARGETS].mean().to_dict()
    assert constant_prior_baseline(train, evaluation) == pytest.approx(
        loop_score(constant_pred(evaluation, prior), evaluation, per_study=True), rel=1e-12
    )


# ---- wide-frame input errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda p, t: (p.iloc[1:], t),
            r"1 studies missing from pred \(e\.g\. 1\.2\.826\.0\.1\.3680043\.1000\)",
        ),
        (lambda p, t: (p, t.iloc[1:]), r"1 studies in pred not in truth"),
        (lambda p, t: (pd.concat([p, p.iloc[:1]]), t), r"pred: 1 duplicated StudyInstanceUID"),
        (lambda p, t: (p.assign(C3=np.nan), t), r"pred: 10 NaN predictions \(e\.g\. .*\[C3\]"),
        (lambda p, t: (p.assign(C3=1.5), t), r"pred: 10 predictions outside \[0, 1\]"),
        (lambda p, t: (p.drop(columns="C7"), t), r"pred: missing columns \['C7'\]"),
        (lambda p, t: (p, t.assign(C2=2)), r"truth: 10 labels are not 0/1"),
        (lambda p, t: (p.assign(C4="high"), t), r"pred: column 'C4' is not numeric"),
    ],
)
def test_score_rejects_bad_frames(corrupt, message):
    truth = synthetic_truth(10)
    pred, truth = corrupt(constant_pred(truth, 0.3), truth)
    with pytest.raises(ValueError, match=message):
        score(pred, truth)


def test_per_target_auc_none_for_single_class_target():
    truth = synthetic_truth(30, seed=5).assign(C3=0)
    pred = truth.astype({t: float for t in TARGETS})
    auc = per_target_auc(pred, truth)
    assert auc["C3"] is None
    assert auc["patient_overall"] == 1.0 and auc["C1"] == 1.0
    inverted = pred.assign(C1=1 - pred["C1"])
    assert per_target_auc(inverted, truth)["C1"] == 0.0


def test_noisy_or():
    probs = np.array([[0.0] * 7, [0.5, 0.5, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(noisy_or(probs), [0.0, 0.75, 1.0], atol=1e-15)
    random = np.random.default_rng(6).random((5, 7))
    np.testing.assert_allclose(noisy_or(random), 1 - np.prod(1 - random, axis=1), rtol=1e-12)
    assert noisy_or(np.full(7, 1e-12)) == pytest.approx(7e-12, rel=1e-9)  # no cancellation
    with pytest.raises(ValueError, match=r"\(\.\.\., 7\)"):
        noisy_or(np.zeros((3, 8)))


# ---- long format and submissions ----------------------------------------------------------------
def test_long_wide_round_trip():
    truth = synthetic_truth(12)
    long = wide_to_long(truth)
    assert len(long) == 8 * 12 and list(long.columns) == ["row_id", "fractured"]
    assert long["row_id"].iloc[0] == "1.2.826.0.1.3680043.1000_patient_overall"
    assert long["row_id"].iloc[8] == "1.2.826.0.1.3680043.1001_patient_overall"
    back = long_to_wide(long.sample(frac=1, random_state=0))
    pd.testing.assert_frame_equal(back, truth.sort_values("StudyInstanceUID", ignore_index=True))
    pd.testing.assert_frame_equal(truth_to_long(truth), long)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (lambda long: long.iloc[1:], r"1 studies lack rows for some targets"),
        (lambda long: long.assign(row_id=long["row_id"].str.replace("_C3", "_C9")), r"_<target>"),
        (lambda long: long.assign(row_id=long["row_id"].str.replace("_", "-")), r"_<target>"),
    ],
)
def test_long_to_wide_rejects_malformed_rows(rows, message):
    with pytest.raises(ValueError, match=message):
        long_to_wide(rows(wide_to_long(synthetic_truth(3))))


def test_score_submission_equals_wide_score():
    truth = synthetic_truth(25, seed=7)
    pred = constant_pred(truth, 0.0)
    pred[TARGETS] = np.random.default_rng(7).random((25, 8))
    sub, answers = wide_to_long(pred).iloc[::-1], truth_to_long(truth)
    for per_study in (True, False):
        assert score_submission(sub, answers, per_study) == score(pred, truth, per_study)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda s: s.iloc[:-8],
            r"differ from the answers \(32 vs 40 rows\): 8 row_ids missing from submission",
        ),
        (
            lambda s: s.assign(row_id=s["row_id"].str.replace(".1000_", ".9999_")),
            r"8 row_ids missing from submission .*; "
            r"8 row_ids in submission not in answers \(e\.g\. 1\.2\.826\.0\.1\.3680043\.9999_C1",
        ),
        (lambda s: pd.concat([s, s.iloc[:1]]), r"submission: 1 duplicated row_id"),
        (
            lambda s: s.assign(fractured=np.where(s.index == 3, np.nan, 0.5)),
            r"submission: 1 NaN predictions \(e\.g\. .*1000_C3\)",
        ),
        (lambda s: s.assign(fractured=-0.1), r"submission: 40 predictions outside \[0, 1\]"),
        (
            lambda s: s.assign(fractured="0.5"),
            r"column 'fractured' is not numeric \(dtype .*; "
            r"e\.g\. 1\.2\.826\.0\.1\.3680043\.1000_C1='0\.5'",
        ),
        (
            lambda s: s.rename(columns={"fractured": "target"}),
            r"submission: missing columns \['fractured'\]",
        ),
    ],
)
def test_validate_submission_errors(corrupt, message):
    answers = truth_to_long(synthetic_truth(5))
    sub = answers.assign(fractured=0.5)
    validate_submission(sub, answers)
    with pytest.raises(ValueError, match=message):
        validate_submission(corrupt(sub), answers)


# ---- CLI ----------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utils.rsna.metric", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_scores_last_line_primary(tmp_path):
    truth = synthetic_truth(8)
    train_csv, answers_csv, sub_csv = (
        tmp_path / "train.csv",
        tmp_path / "answers.csv",
        tmp_path / "sub.csv",
    )
    truth.to_csv(train_csv, index=False)
    truth_to_long(truth).to_csv(answers_csv, index=False)
    pred = constant_pred(truth, 0.2)
    wide_to_long(pred).to_csv(sub_csv, index=False)
    expected = {per_study: score(pred, truth, per_study) for per_study in (True, False)}

    result = run_cli(sub_csv, answers_csv)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"{expected[True]:.6f}"
    assert f"global {expected[False]:.6f}" in lines
    assert sum(line.startswith("logloss ") for line in lines) == 8

    result = run_cli(sub_csv, train_csv, "--global")  # train.csv-schema answers accepted
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{expected[False]:.6f}"


def test_cli_bad_submission_is_one_error_line_without_traceback(tmp_path):
    truth = synthetic_truth(4)
    answers_csv, sub_csv = tmp_path / "answers.csv", tmp_path / "sub.csv"
    truth_to_long(truth).to_csv(answers_csv, index=False)
    wide_to_long(constant_pred(truth, 0.5)).iloc[:-1].to_csv(sub_csv, index=False)
    result = run_cli(sub_csv, answers_csv)
    assert result.returncode == 1
    assert result.stderr.startswith("error: submission row_ids differ from the answers")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_cli_errors_found_while_scoring_are_one_line(tmp_path):
    truth = synthetic_truth(4)
    sub_csv = tmp_path / "sub.csv"
    wide_to_long(constant_pred(truth, 0.5)).to_csv(sub_csv, index=False)
    # The submission itself as answers: valid ids, but 0.5 is not a 0/1 label.
    with pytest.raises(SystemExit, match="^error: truth: 32 labels are not 0/1"):
        metric_main([str(sub_csv), str(sub_csv)])
    with pytest.raises(SystemExit, match="^error: .*missing.csv"):
        metric_main([str(sub_csv), str(tmp_path / "missing.csv")])
