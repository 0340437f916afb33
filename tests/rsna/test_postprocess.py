"""Calibration, prior matching and the plausibility shrink (utils/rsna/postprocess.py) on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from utils.config import ConfigError
from utils.rsna.metric import TARGETS, VERTEBRAE, per_target_logloss
from utils.rsna.postprocess import (
    MATCH_MIN_STUDIES,
    apply_platt,
    crossfit_platt,
    fit_platt,
    implausible,
    match_prior,
    reference,
    shrink,
)


def _frames(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Overconfident predictions (logit x 3 of a calibrated score) and their labels."""
    rng = np.random.default_rng(seed)
    score = rng.normal(0, 1.5, size=(n, 8))
    y = (rng.random((n, 8)) < 1 / (1 + np.exp(-score))).astype(int)
    uids = [f"1.2.{i}" for i in range(n)]
    pred = pd.DataFrame(1 / (1 + np.exp(-3 * score)), columns=TARGETS).assign(StudyInstanceUID=uids)
    truth = pd.DataFrame(y, columns=TARGETS).assign(StudyInstanceUID=uids)
    return pred, truth


def test_platt_undoes_overconfidence():
    pred, truth = _frames(400, 0)
    params = fit_platt(pred, truth)
    for t in TARGETS:
        assert params[t][0] == pytest.approx(1 / 3, abs=0.12), t  # the slope undoes the x3
    before, after = (
        per_target_logloss(pred, truth),
        per_target_logloss(apply_platt(pred, params), truth),
    )
    assert all(after[t] < before[t] for t in TARGETS)


def test_crossfit_calibrates_each_fold_with_the_other_folds_fit():
    pred, truth = _frames(90, 1)
    fold = np.arange(90) % 3
    out = crossfit_platt(pred, truth, fold)
    rest = fold != 0
    expected = apply_platt(pred[~rest], fit_platt(pred[rest], truth[rest]))
    np.testing.assert_allclose(out.loc[~rest, TARGETS], expected[TARGETS])


def test_anti_correlated_predictions_fall_back_to_the_prevalence():
    pred, truth = _frames(200, 2)
    flipped = pred.assign(**{t: 1 - pred[t] for t in TARGETS})
    params = fit_platt(flipped, truth)
    for t in TARGETS:
        a, b = params[t]
        prevalence = (truth[t].sum() + 1) / (len(truth) + 2)
        assert a == 0 and 1 / (1 + np.exp(-b)) == pytest.approx(prevalence), t


def _loc(uid: str, starts, lengths, peaks) -> pd.DataFrame:
    rows = [
        (uid, v, s, s + n - 1, n, p, 0.1, 0.1, 0.9, 0.9)
        for v, s, n, p in zip(VERTEBRAE, starts, lengths, peaks, strict=True)
        if s is not None
    ]
    cols = [
        "StudyInstanceUID",
        "vertebra",
        "start",
        "end",
        "n_slices",
        "peak",
        "x0",
        "y0",
        "x1",
        "y1",
    ]
    return pd.DataFrame(rows, columns=cols)


GOOD = dict(starts=[0, 10, 20, 30, 40, 50, 60], lengths=[8] * 7, peaks=[0.9] * 7)


@pytest.mark.parametrize(
    ("change", "reason", "targets"),
    [
        ({}, None, []),
        ({"starts": [0, 10, None, 30, 40, 50, 60]}, "missing C3", TARGETS),
        ({"lengths": [8, 8, 8, 30, 8, 8, 8]}, "range length C4", TARGETS),
        ({"lengths": [8, 8, 8, 8, 8, 2, 8]}, "range length C6", TARGETS),
        ({"starts": [0, 10, 20, 40, 30, 50, 60]}, "ranges out of order", TARGETS),
        ({"peaks": [0.9, 0.9, 0.9, 0.9, 0.2, 0.9, 0.9]}, "weak peak C5", ["C5", "patient_overall"]),
    ],
)
def test_implausible_localisations_are_flagged(change, reason, targets):
    loc = _loc("1.2.3", **{**GOOD, **change})
    ref = reference(_loc("1.2.3", **GOOD))  # the training studies: all alike
    flags = implausible(loc, ["1.2.3", "9.9.9"], min_peak=0.5, length_range=(0.4, 2.5), ref=ref)
    assert sorted(flags.target) == sorted(targets)
    if reason:
        assert flags.reason.str.contains(reason, regex=False).all()


def test_shrink_moves_flagged_logits_toward_the_prior():
    wide = pd.DataFrame(
        [["1.2.3", *[0.95] * 8], ["4.5.6", *[0.95] * 8]], columns=["StudyInstanceUID", *TARGETS]
    )
    flags = pd.DataFrame(
        [("1.2.3", "C2", "weak peak C2")], columns=["StudyInstanceUID", "target", "reason"]
    )
    out = shrink(wide, flags, dict.fromkeys(TARGETS, 0.2), factor=0.5)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert logit(out.loc[0, "C2"]) == pytest.approx((logit(0.95) + logit(0.2)) / 2)
    others = out.drop(columns="StudyInstanceUID").to_numpy().ravel()
    assert (np.delete(others, TARGETS.index("C2")) == 0.95).all()


def test_plausibility_is_judged_against_the_training_studies():
    """A one-slice C1 and low ratio peaks are normal when the training studies show them."""
    usual = dict(
        starts=[0, 1, 20, 30, 40, 50, 60], lengths=[1, 17, 8, 8, 8, 8, 8], peaks=[0.05] + [0.3] * 6
    )
    ref = reference(_loc("1.2.3", **usual))
    assert ref["C1"] == {"length": 1.0, "peak": 0.05, "presence": 1.0}
    same = implausible(_loc("4.5.6", **usual), ["4.5.6"], 0.5, (0.4, 2.5), ref)
    assert same.empty
    rare_c1 = {**ref, "C1": {**ref["C1"], "presence": 0.5}}
    no_c1 = _loc("4.5.6", **{**usual, "starts": [None, 1, 20, 30, 40, 50, 60]})
    assert implausible(no_c1, ["4.5.6"], 0.5, (0.4, 2.5), rare_c1).empty
    assert len(implausible(no_c1, ["4.5.6"], 0.5, (0.4, 2.5), ref)) == 8


def test_each_target_is_calibrated_with_its_own_fit():
    """Per-target parameters stay with their target (by name): each target is overconfident by
    its own factor, so a fit or an application shifted to the neighbouring target shows."""
    rng = np.random.default_rng(5)
    n = 600
    factors = dict(zip(TARGETS, [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0], strict=True))
    score = rng.normal(0, 1.5, size=(n, 8))
    y = (rng.random((n, 8)) < 1 / (1 + np.exp(-score))).astype(int)
    uids = [f"1.3.{i}" for i in range(n)]
    logits = score * np.array([factors[t] for t in TARGETS])
    # Columns in a scrambled order: nothing may rely on the position of a target.
    order = TARGETS[::-1]
    pred = pd.DataFrame(1 / (1 + np.exp(-logits)), columns=TARGETS)[order]
    pred.insert(0, "StudyInstanceUID", uids)
    truth = pd.DataFrame(y, columns=TARGETS)[order[3:] + order[:3]].assign(StudyInstanceUID=uids)
    params = fit_platt(pred, truth)
    for t in TARGETS:
        assert params[t][0] == pytest.approx(1 / factors[t], rel=0.25), t
    out = apply_platt(pred, params)
    for t in TARGETS:
        a, b = params[t]
        q = pred[t].clip(1e-6, 1 - 1e-6)  # the clip of every logit taken of a probability
        x = np.log(q / (1 - q))
        np.testing.assert_allclose(out[t], 1 / (1 + np.exp(-(a * x + b))), rtol=1e-9, err_msg=t)


def test_temperature_scales_the_logits_and_keeps_one_half_fixed():
    pred, truth = _frames(400, 0)  # each target overconfident by x3
    params = fit_platt(pred, truth, "temperature")
    for t in TARGETS:
        a, b = params[t]
        assert b == 0.0 and a == pytest.approx(1 / 3, abs=0.12), t


def test_platt_identity_stays_near_the_identity_on_few_studies_and_follows_many():
    few_pred, few_truth = _frames(12, 3)
    many_pred, many_truth = _frames(2000, 4)
    few = fit_platt(few_pred, few_truth, "platt_identity")
    many = fit_platt(many_pred, many_truth, "platt_identity")
    platt = fit_platt(few_pred, few_truth, "platt")

    def from_identity(ab):
        return np.hypot(ab[0] - 1, ab[1])

    for t in TARGETS:
        if few_truth[t].nunique() == 2:  # the prior pulls (a, b) toward (1, 0); platt's L2 toward 0
            assert from_identity(few[t]) < from_identity(platt[t]), t
        assert many[t][0] == pytest.approx(1 / 3, abs=0.08), t  # the data win


def test_unknown_calibration_is_a_config_error():
    pred, truth = _frames(20, 0)
    with pytest.raises(ConfigError, match="post.calibration must be one of"):
        fit_platt(pred, truth, "isotonic")


def test_prior_matching_shifts_each_target_to_its_train_prior_and_keeps_the_ranking():
    """A shift that moved every logit (+2) is undone to the train prior's mean, one constant per
    target, so each target's ranking (and AUC) is unchanged; too few studies are left alone."""
    rng = np.random.default_rng(3)
    logit = rng.normal(-1.0, 1.5, size=(60, 8)) + 2.0
    shifted = pd.DataFrame(1 / (1 + np.exp(-logit)), columns=TARGETS)
    priors = {t: 0.1 + 0.05 * i for i, t in enumerate(TARGETS)}
    matched = match_prior(shifted, priors)
    for t in TARGETS:
        assert matched[t].mean() == pytest.approx(priors[t], abs=1e-6), t
        assert (matched[t].rank() == shifted[t].rank()).all(), t
        x0 = np.log(shifted[t] / (1 - shifted[t]))
        x1 = np.log(matched[t] / (1 - matched[t]))
        assert np.ptp(x1 - x0) < 1e-6, t  # one constant per target
    few = shifted.iloc[: MATCH_MIN_STUDIES - 1]
    pd.testing.assert_frame_equal(match_prior(few, priors), few)
