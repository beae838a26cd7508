"""`sequential`: score a candidate in chunks; stop as soon as it cannot enter the top k.

Each candidate is scored on a seeded order of each task's documents (the same order for the
whole stage), `chunk` of the search set at a time. After each chunk an optimistic bound on its
full-set fitness is computed; when that bound is below the k-th best fitness told so far in the
stage (k = `top_k`, default the stage's holdout top-k), it cannot enter the top k and stops: it
is told the means over its documents, marked as an estimate. The k-th best is the one known when
the candidate was asked (kept in its note, so a resumed run decides the same way).

The bound, per task, for the mean over all N documents after n scored, with per-sample scores in
[lo, hi] (`score_range`, widened to what has been seen) and observed mean m:
- `bound: worst_case`: the remaining documents all score their best value (never wrong);
- `bound: serfling` (default): m +/- (hi - lo) sqrt((1 - (n - 1) / N) log(T / delta) / (2 n)),
  Serfling's inequality for sampling without replacement (T tasks share the risk `delta`),
  never looser than the worst case.
"Optimistic" follows each objective's direction (higher or lower is better), and the bound on the
primary objective is the weighted mean of its tasks' bounds, as the evaluator combines them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.fidelity.base import Member, StageInfo, Strategy, StrategyOptions, permutation, prefix


class SequentialOptions(StrategyOptions):
    chunk: float = Field(0.1, gt=0, le=1)  # share of the documents scored per chunk
    delta: float = Field(0.05, gt=0, lt=1)  # risk of the Serfling bound
    bound: Literal["serfling", "worst_case"] = "serfling"
    score_range: tuple[float, float] = (0.0, 1.0)  # per-sample scores lie in [lo, hi]
    top_k: int | None = Field(None, ge=1)  # default: the stage's holdout_top_k

    @model_validator(mode="after")
    def _range(self) -> SequentialOptions:
        lo, hi = self.score_range
        if not hi > lo:
            raise ValueError(f"score_range must be [lo, hi] with hi > lo, got [{lo}, {hi}]")
        return self


class Sequential(Strategy):
    name = "sequential"
    Options = SequentialOptions

    def __init__(self, options: SequentialOptions, info: StageInfo) -> None:
        super().__init__(options, info)
        self.order = {t: permutation(info, t) for t in info.n_docs}
        self.k = options.top_k or max(1, info.top_k)
        self.best: list[float] = []  # the k best fitnesses told so far, best first

    def threshold(self) -> float | None:
        return self.best[self.k - 1] if len(self.best) >= self.k else None

    def open(self, member: Member) -> None:
        member.note.setdefault("threshold", self.threshold())
        member.note.setdefault("chunks", 1)
        member.want = self._chunks(int(member.note["chunks"]))

    def _chunks(self, n: int) -> dict:
        return prefix(self.order, self.info.counts(min(1.0, n * self.options.chunk)))

    def decide(self, members: list[Member]) -> None:
        for m in members:
            threshold = m.note.get("threshold")
            if m.error is not None or m.is_full(self.info):
                m.done = True
            elif threshold is not None and self.optimistic(m) < threshold:
                m.done = True
            else:
                m.note["chunks"] = int(m.note["chunks"]) + 1
                m.want = self._chunks(int(m.note["chunks"]))

    def optimistic(self, member: Member) -> float:
        """An upper confidence bound on the member's full-set fitness (module docstring)."""
        info = self.info
        up = info.directions[info.primary]
        tasks = [t for t in info.weights[info.primary] if t in info.n_docs]
        means = {}
        for t in tasks:
            values = member.values(t)
            means[t] = self._task_bound(values, info.n_docs[t], len(tasks), up)
        value = info.fitness(info.objectives(means))
        return math.inf if value is None else value

    def _task_bound(self, values: np.ndarray, total: int, n_tasks: int, up: bool) -> float:
        lo, hi = self.options.score_range
        n = len(values)
        if n == 0:
            return hi if up else lo
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        mean, rest = float(values.mean()), total - n
        worst = (mean * n + (hi if up else lo) * rest) / total
        if self.options.bound == "worst_case" or rest == 0:
            return worst
        width = (hi - lo) * math.sqrt(max(0.0, 1 - (n - 1) / total) * math.log(n_tasks / self.options.delta) / (2 * n))
        return min(mean + width, worst) if up else max(mean - width, worst)

    def told(self, member: Member, fitness: float | None) -> None:
        if fitness is None or not math.isfinite(fitness):
            return
        self.best = sorted([*self.best, float(fitness)], reverse=True)[: self.k]

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = [float(v) for v in state.get("best", [])]

    def core(self) -> dict:
        return self._chunks(1)
