"""Baselines: uniform random search and a brute-force grid sweep (the M2N2 paper's SLERP baseline
is a grid over one SLERP weight)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.options import Option


class RandomSearch(Optimizer):
    """Uniform in the bounds. Genes with an infinite bound are drawn from N(x0, sigma^2) instead."""

    name = "random"
    OPTIONS = {"popsize": Option(16, "int", low=2), "sigma": Option(None, "number", low=0, low_open=True)}
    MULTI_OBJECTIVE = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.popsize = self.options["popsize"]
        self._open = ~(np.isfinite(self.lower) & np.isfinite(self.upper))
        if self._open.any() and (self.options["sigma"] is None or self.x0 is None):
            raise ConfigError(
                f"random search over {int(self._open.sum())} unbounded genes needs x0 and the option sigma "
                "(genes are then drawn from N(x0, sigma^2)), or finite bounds",
                field="sigma",
            )

    def natural_batch(self) -> int:
        return self.popsize

    def _propose(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(n):
            cid = self._new_id()
            lo = np.where(self._open, 0.0, self.lower)
            hi = np.where(self._open, 1.0, self.upper)
            x = self.rng.uniform(lo, hi)
            if self._open.any():
                normal = self.x0 + float(self.options["sigma"]) * self.rng.standard_normal(self.dim)
                x = np.where(self._open, self._clip(normal), x)
            out.append(Candidate(id=cid, generation=cid // self.popsize, genome=x))
        return out

    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        return None


class GridSearch(Optimizer):
    """Every point of a regular grid over the bounds, in lexicographic order (last gene fastest).

    points: grid points per gene (an int for all, or one per gene); both bounds are included.
    """

    name = "grid"
    OPTIONS = {"points": Option(10, "ints", low=1), "max_candidates": Option(100_000, "int", low=1), "popsize": Option(16, "int", low=2)}
    MULTI_OBJECTIVE = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if not (np.isfinite(self.lower).all() and np.isfinite(self.upper).all()):
            raise ConfigError("grid search needs finite bounds on every gene", field="bounds")
        points = self.options["points"]
        self.points = [int(points)] * self.dim if np.isscalar(points) else [int(p) for p in points]
        if len(self.points) != self.dim or min(self.points) < 1:
            raise ConfigError(f"points must be a positive int or {self.dim} positive ints", field="points")
        self.total = math.prod(self.points)
        if self.total > int(self.options["max_candidates"]):
            raise ConfigError(
                f"the grid has {self.total:.3g} points (over {self.dim} genes), more than max_candidates="
                f"{self.options['max_candidates']}; use fewer points or another optimizer",
                field="points",
            )
        self.popsize = self.options["popsize"]
        self._axes = [
            np.linspace(lo, hi, p) if p > 1 else np.array([(lo + hi) / 2])
            for lo, hi, p in zip(self.lower, self.upper, self.points, strict=True)
        ]

    def natural_batch(self) -> int:
        return self.popsize

    def point(self, index: int) -> np.ndarray:
        digits = np.unravel_index(index, self.points)
        return np.array([axis[d] for axis, d in zip(self._axes, digits, strict=True)], dtype=np.float64)

    def _propose(self, n: int) -> list[Candidate]:
        out = []
        while len(out) < n and self._next_id < self.total:
            cid = self._new_id()
            out.append(Candidate(id=cid, generation=cid // self.popsize, genome=self.point(cid)))
        return out

    def _finished(self) -> str | None:
        return f"grid swept ({self.total} points)" if self._next_id >= self.total else None

    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        return None
