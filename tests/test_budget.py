"""The time guard of a test-time chain (utils/budget.py): pure functions, no models."""

from __future__ import annotations

from utils.budget import TimeGuard


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
