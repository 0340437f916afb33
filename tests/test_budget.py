"""The time guard of the test-time chain and the stage-1 slice stride (pure functions, no models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from utils.budget import TimeGuard
from utils.rsna.localize import fill_skipped_slices, localize_study, strided_slices
from utils.rsna.metric import VERTEBRAE


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_cases(
    guard: TimeGuard, clock: FakeClock, n: int, fixed: float, per_model: float
) -> list[int]:
    """Models chosen for each of ``n`` cases costing ``fixed + models * per_model`` seconds."""
    chosen = []
    for i in range(n):
        models = guard.models_for(n - i)
        chosen.append(models)
        if models == 0:
            break
        clock.now += fixed + models * per_model
        guard.record(fixed, models * per_model, models)
    return chosen


def test_guard_keeps_the_full_ensemble_when_it_fits():
    clock = FakeClock()
    guard = TimeGuard(1000.0, 5, warmup=2, clock=clock)
    assert run_cases(guard, clock, 10, fixed=10.0, per_model=10.0) == [5] * 10
    assert clock.now == 600.0


def test_guard_drops_folds_after_the_warmup_and_finishes_within_budget():
    clock = FakeClock()
    guard = TimeGuard(500.0, 5, warmup=2, clock=clock)
    chosen = run_cases(guard, clock, 10, fixed=10.0, per_model=10.0)
    # 2 warm-up cases at 60 s leave 380 s for 8 cases: 47.5 s each -> 3 models (40 s).
    assert chosen == [5, 5] + [3] * 8
    assert clock.now <= 500.0


def test_guard_stops_when_even_one_model_does_not_fit_and_never_grows_back():
    clock = FakeClock()
    guard = TimeGuard(100.0, 3, warmup=1, clock=clock)
    chosen = run_cases(guard, clock, 10, fixed=10.0, per_model=10.0)
    # case 1: 40 s with 3 models; then 1 model (20 s) per case while it fits: 40 + 3 * 20 = 100.
    assert chosen == [3, 1, 1, 1, 0]
    assert clock.now <= 100.0
    assert TimeGuard(0.0, 3, warmup=1, clock=clock).models_for(5) == 0
    assert TimeGuard(None, 3, warmup=1, clock=clock).models_for(5) == 3


def test_strided_slices_always_include_both_ends():
    assert strided_slices(10, 1).tolist() == list(range(10))
    assert strided_slices(10, 3).tolist() == [0, 3, 6, 9]
    assert strided_slices(11, 3).tolist() == [0, 3, 6, 9, 10]
    assert strided_slices(1, 2).tolist() == [0]
    with pytest.raises(ValueError, match="stride"):
        strided_slices(10, 0)


def _stage1_rows(slices, n_slices: int) -> pd.DataFrame:
    """Ratios linear in z (C1 rising, C7 falling); boxes that differ per slice."""
    z = np.asarray(slices, float) / (n_slices - 1)
    pred = pd.DataFrame({"StudyInstanceUID": "u", "slice": slices})
    for i, v in enumerate(VERTEBRAE):
        pred[v] = z if i == 0 else (1 - z if i == 6 else 0.0)
    pred[["x0", "y0", "x1", "y1"]] = np.c_[0.2 + 0.1 * z, 0.2 + 0 * z, 0.6 + 0 * z, 0.7 + 0 * z]
    return pred


def test_fill_skipped_slices_interpolates_ratios_and_keeps_boxes_of_predicted_slices_only():
    known = strided_slices(11, 3)
    full = fill_skipped_slices(_stage1_rows(known, 11), 11)
    assert full.slice.tolist() == list(range(11))
    np.testing.assert_allclose(full.C1, np.arange(11) / 10)  # linear ratios: exact
    np.testing.assert_allclose(full.C7, 1 - np.arange(11) / 10)
    assert full.x0.notna().tolist() == [s in set(known) for s in range(11)]


def test_localisation_from_a_strided_prediction_matches_every_slice_on_linear_ratios():
    every = localize_study(_stage1_rows(range(31), 31), 1, 0.3, 0.0, ordered=False)
    strided = localize_study(
        fill_skipped_slices(_stage1_rows(strided_slices(31, 2), 31), 31), 1, 0.3, 0.0, ordered=False
    )
    pd.testing.assert_frame_equal(
        every[["vertebra", "start", "end"]], strided[["vertebra", "start", "end"]]
    )
    assert strided[["x0", "y0", "x1", "y1"]].notna().all().all()
