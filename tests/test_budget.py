"""The time guard of a test-time chain (utils/budget.py): pure functions, no models."""

from __future__ import annotations

from utils.budget import Plan, TimeGuard


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_cases(
    guard: TimeGuard, clock: FakeClock, n: int, fixed: float, per_fold: dict[int, float]
) -> list[Plan | None]:
    """Plans chosen for each of ``n`` cases costing ``fixed`` + per fold model the seconds of
    each member kept (``per_fold``: member -> seconds; member 0 alone: no ensemble)."""
    chosen = []
    for i in range(n):
        plan = guard.plan_for(n - i)
        chosen.append(plan)
        if plan is None:
            break
        spent = {m: plan.folds * per_fold[m] for m in plan.members}
        clock.now += fixed + sum(spent.values())
        guard.record(fixed, 0.0, spent, plan)
    return chosen


def folds(plans: list[Plan | None]) -> list[int]:
    return [0 if p is None else p.folds for p in plans]


def test_guard_keeps_the_full_ensemble_when_it_fits():
    clock = FakeClock()
    guard = TimeGuard(1000.0, 5, warmup=2, clock=clock)
    assert folds(run_cases(guard, clock, 10, fixed=10.0, per_fold={0: 10.0})) == [5] * 10
    assert clock.now == 600.0


def test_guard_drops_folds_after_the_warmup_and_finishes_within_budget():
    clock = FakeClock()
    guard = TimeGuard(500.0, 5, warmup=2, clock=clock)
    chosen = run_cases(guard, clock, 10, fixed=10.0, per_fold={0: 10.0})
    # 2 warm-up cases at 60 s leave 380 s for 8 cases: 47.5 s each -> 3 folds (40 s).
    assert folds(chosen) == [5, 5] + [3] * 8
    assert clock.now <= 500.0


def test_guard_stops_when_even_one_model_does_not_fit_and_never_grows_back():
    clock = FakeClock()
    guard = TimeGuard(100.0, 3, warmup=1, clock=clock)
    chosen = run_cases(guard, clock, 10, fixed=10.0, per_fold={0: 10.0})
    # case 1: 40 s with 3 folds; then 1 fold (20 s) per case while it fits: 40 + 3 * 20 = 100.
    assert folds(chosen) == [3, 1, 1, 1, 0]
    assert clock.now <= 100.0
    assert TimeGuard(0.0, 3, warmup=1, clock=clock).plan_for(5) is None
    assert TimeGuard(None, 3, warmup=1, clock=clock).plan_for(5) == Plan((0,), 3)


def test_guard_drops_ensemble_members_lowest_weight_first_before_folds():
    weights = (0.3, 0.5, 0.2)  # member 2 goes first, then member 0; member 1 stays
    guard = TimeGuard(1.0, 3, warmup=1, weights=weights, clock=FakeClock())
    assert guard.ladder() == [
        Plan((0, 1, 2), 3),
        Plan((0, 1), 3),
        Plan((1,), 3),
        Plan((1,), 2),
        Plan((1,), 1),
    ]
    clock = FakeClock()
    guard = TimeGuard(240.0, 3, warmup=1, weights=weights, clock=clock)
    per_fold = {0: 10.0, 1: 10.0, 2: 10.0}
    chosen = run_cases(guard, clock, 6, fixed=0.0, per_fold=per_fold)
    # case 1: 3 members x 3 folds = 90 s; 150 s left for 5 cases: 30 s each = 1 member x 3 folds.
    assert chosen == [Plan((0, 1, 2), 3)] + [Plan((1,), 3)] * 5
    assert clock.now == 240.0
