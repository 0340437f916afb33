"""Wall-clock budget of a test-time run: how many fold models the next case can still afford.

A test-time chain predicts case by case. After each case it reports how long the case took,
split into seconds that do not depend on the ensemble (reading, caching, post-processing) and
seconds spent in the fold models. Once ``warmup`` cases are timed, :meth:`TimeGuard.models_for`
projects the remaining cases at the current ensemble size and drops fold models until the
projection fits the budget; when even one model per stage cannot finish the next case in time
it answers 0 and the caller stops (the cases left take their fallback, e.g. the train priors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class TimeGuard:
    """Chooses the ensemble size case by case so that the run ends within ``budget_s``."""

    budget_s: float | None  # wall-clock seconds from ``start``; None = no limit
    n_models: int  # fold models available per stage (the full ensemble)
    warmup: int  # cases timed before the guard may drop models
    clock: Callable[[], float] = time.monotonic
    start: float | None = None  # clock value the budget counts from (default: now)
    models: int = field(init=False)  # ensemble size in use (never grows again)
    fixed_s: list[float] = field(init=False, default_factory=list)  # per case: non-model seconds
    model_s: list[float] = field(init=False, default_factory=list)  # per case: seconds per model

    def __post_init__(self) -> None:
        if self.n_models < 1:
            raise ValueError(f"TimeGuard needs at least one model, got {self.n_models}")
        self.start = self.clock() if self.start is None else self.start
        self.models = self.n_models

    def elapsed(self) -> float:
        return self.clock() - self.start

    def record(self, fixed_s: float, model_s: float, models: int) -> None:
        """One finished case: its non-model seconds and its model seconds with ``models`` models."""
        self.fixed_s.append(fixed_s)
        self.model_s.append(model_s / models)

    def estimate(self, models: int) -> float:
        """Expected seconds of one case with ``models`` models (means of the recorded cases)."""
        n = len(self.fixed_s)
        return sum(self.fixed_s) / n + models * sum(self.model_s) / n

    def models_for(self, remaining: int) -> int:
        """Models per stage for the next case, ``remaining`` cases left including it; 0 = stop."""
        if self.budget_s is None:
            return self.models
        left = self.budget_s - self.elapsed()
        if left <= 0:
            return 0
        if len(self.fixed_s) < self.warmup:
            return self.models
        fits = [m for m in range(self.models, 0, -1) if remaining * self.estimate(m) <= left]
        models = fits[0] if fits else 1
        if models < self.models:
            log.warning(
                "time guard: %.1f s per case with %d model(s), %d cases and %.0f s left: "
                "continuing with %d model(s) per stage",
                self.estimate(self.models),
                self.models,
                remaining,
                left,
                models,
            )
            self.models = models
        return models if self.estimate(models) <= left else 0
