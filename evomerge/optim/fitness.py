"""The one place where evaluation results become numbers an optimizer compares.

Every optimizer reads objectives through `Objectives`: the scalar fitness of single-objective
optimizers (`score`, always "higher is better" whatever the objective's direction), the objective
vector of multi-objective ones (`vector`), Pareto dominance, and the value a failed candidate gets
(`fill_failures`: the worst value of its batch, never an exception and never an infinity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult


@dataclass(frozen=True)
class Objectives:
    """Which objectives an optimizer optimizes, and in which direction.

    directions: every objective of the experiment, name -> higher_is_better, in declared order.
    primary: the objective of single-objective optimizers (and of `best()`).
    multi: optimize every objective at once (Pareto) instead of `primary` alone.
    """

    directions: dict[str, bool]
    primary: str
    multi: bool = False

    @classmethod
    def build(
        cls, directions: Mapping[str, bool], objective: str | None = None, multi: bool = False
    ) -> Objectives:
        if not directions:
            raise ConfigError("the optimizer needs at least one objective (name -> higher_is_better)", field="objectives")
        directions = {str(k): bool(v) for k, v in directions.items()}
        primary = objective if objective is not None else next(iter(directions))
        if primary not in directions:
            raise ConfigError(
                f"objective '{primary}' is not one of the experiment's objectives; valid: {', '.join(directions)}",
                field="objective",
            )
        return cls(directions, primary, bool(multi))

    @property
    def optimized(self) -> list[str]:
        """The objectives the search compares on (all of them when multi, else the primary)."""
        return list(self.directions) if self.multi else [self.primary]

    def _value(self, result: EvalResult, name: str) -> float | None:
        if result.failed:
            return None
        if name not in result.objectives:
            raise ConfigError(
                f"the evaluator returned objectives [{', '.join(result.objectives)}] but the optimizer needs '{name}'",
                field="objective",
            )
        value = float(result.objectives[name])
        return value if math.isfinite(value) else None

    def raw(self, result: EvalResult) -> list[float] | None:
        """Values of the optimized objectives as the evaluator reported them; None when failed."""
        values = [self._value(result, name) for name in self.optimized]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    def score(self, result: EvalResult) -> float | None:
        """Scalar fitness, higher is better (the primary objective, negated when lower is better)."""
        value = self._value(result, self.primary)
        if value is None:
            return None
        return value if self.directions[self.primary] else -value

    def vector(self, result: EvalResult) -> tuple[float, ...] | None:
        """Optimized objectives, each turned to higher-is-better; None when failed."""
        raw = self.raw(result)
        if raw is None:
            return None
        return tuple(v if self.directions[n] else -v for n, v in zip(self.optimized, raw, strict=True))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a Pareto-dominates b (both higher-is-better vectors)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def fill_failures(values: Sequence[float | None], fallback: float | None = None) -> list[float]:
    """Replace the failures (None) of one batch by the batch's worst value (higher is better).

    When the whole batch failed, `fallback` (the worst value seen earlier in the run) is used, and
    when there is none either, 0.0: every member then ties and the optimizer learns nothing from
    the batch, which is the truth.
    """
    finite = [v for v in values if v is not None]
    worst = min(finite) if finite else (fallback if fallback is not None else 0.0)
    return [worst if v is None else float(v) for v in values]
