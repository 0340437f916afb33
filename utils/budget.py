"""Wall-clock budget of a test-time run: which models the next case can still afford.

A test-time chain predicts case by case with fold models of several stages; one stage may be an
ensemble of experiments, each with its fold models (utils/ensemble.py). After each case the chain
reports how long it took, split into seconds that do not depend on the models (reading, caching,
post-processing), seconds of the stages that are not an ensemble, and seconds of each ensemble
member. Once ``warmup`` cases are timed, :meth:`TimeGuard.plan_for` projects the remaining cases
and shrinks the :class:`Plan` until the projection fits the budget: first it drops ensemble
members, lowest weight first, then fold models (the same number from every stage and member).
When even one member with one fold cannot finish the next case in time it answers None and the
caller stops (the cases left take their fallback, e.g. the train priors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What the next case runs: the ensemble members kept (indices, in the given order) and the
    fold models used per member and per stage."""

    members: tuple[int, ...]
    folds: int


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class TimeGuard:
    """Chooses the models case by case so that the run ends within ``budget_s``."""

    budget_s: float | None  # wall-clock seconds from ``start``; None = no limit
    n_folds: int  # fold models available per stage and member (the full fold ensemble)
    warmup: int  # cases timed with every model before the guard may drop some
    weights: Sequence[float] = (1.0,)  # the ensemble members' weights (one member: no ensemble)
    clock: Callable[[], float] = time.monotonic
    start: float | None = None  # clock value the budget counts from (default: now)
    plan: Plan = field(init=False)  # in use; it never grows again
    fixed_s: list[float] = field(init=False, default_factory=list)  # per case: no model
    shared_s: list[float] = field(
        init=False, default_factory=list
    )  # per case, per fold: other stages
    member_s: dict[int, list[float]] = field(
        init=False, default_factory=dict
    )  # per member, per fold

    def __post_init__(self) -> None:
        if self.n_folds < 1 or not self.weights:
            raise ValueError(f"TimeGuard needs a model, got {self.n_folds} folds, {self.weights}")
        self.start = self.clock() if self.start is None else self.start
        self.plan = self.ladder()[0]

    def ladder(self) -> list[Plan]:
        """Every plan from the full one down: members dropped lowest weight first (ties: the
        later one), then folds with the highest-weight member alone."""
        order = sorted(range(len(self.weights)), key=lambda i: (-self.weights[i], i))
        plans = [Plan(tuple(sorted(order[:k])), self.n_folds) for k in range(len(order), 0, -1)]
        return plans + [Plan(plans[-1].members, f) for f in range(self.n_folds - 1, 0, -1)]

    def elapsed(self) -> float:
        return self.clock() - self.start

    def record(
        self, fixed_s: float, shared_s: float, member_s: Mapping[int, float], plan: Plan
    ) -> None:
        """One finished case run with ``plan``: its seconds without a model, in the stages that
        are not an ensemble, and in each member (index -> seconds)."""
        self.fixed_s.append(fixed_s)
        self.shared_s.append(shared_s / plan.folds)
        for i, seconds in member_s.items():
            self.member_s.setdefault(i, []).append(seconds / plan.folds)

    def estimate(self, plan: Plan) -> float:
        """Expected seconds of one case with ``plan`` (means of the recorded cases)."""
        members = sum(_mean(self.member_s[i]) for i in plan.members)
        return _mean(self.fixed_s) + plan.folds * (_mean(self.shared_s) + members)

    def plan_for(self, remaining: int) -> Plan | None:
        """The plan of the next case, ``remaining`` cases left including it; None = stop."""
        if self.budget_s is None:
            return self.plan
        left = self.budget_s - self.elapsed()
        if left <= 0:
            return None
        if len(self.fixed_s) < max(self.warmup, 1):
            return self.plan
        ladder = self.ladder()
        options = ladder[ladder.index(self.plan) :]
        fits = [p for p in options if remaining * self.estimate(p) <= left]
        plan = fits[0] if fits else options[-1]
        if plan != self.plan:
            log.warning(
                "time guard: %.1f s per case with %d member(s) x %d fold(s), %d cases and %.0f s "
                "left: continuing with %d member(s) x %d fold(s)",
                self.estimate(self.plan),
                len(self.plan.members),
                self.plan.folds,
                remaining,
                left,
                len(plan.members),
                plan.folds,
            )
            self.plan = plan
        return plan if self.estimate(plan) <= left else None
