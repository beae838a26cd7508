"""The built-in schedules: `full` (every document) and `racing` (successive halving within a
generation).

Racing (Li et al. 2017's successive halving on documents): a generation is scored on the first
rung, a seeded share of each task's documents (the same documents for every candidate of the
stage); the top fraction `eta` of the rung (by the fitness of their rung's estimate; ties: the
earlier candidate) goes on to the next rung, whose documents contain the previous rung's, so a
promoted candidate scores only the documents it lacks. The last rung is the whole search set.
A candidate that stops at a rung is told its rung's estimate (the means over its documents), and
its ledger row says it is an estimate. Rungs default to shares first, first/eta, first/eta^2, ...
up to 1 (with `first` = eta^2: three rungs).
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from evomerge.fidelity.base import Member, StageInfo, Strategy, StrategyOptions, permutation, prefix


class Full(Strategy):
    """Every candidate on every search document (today's behaviour: the scheduler's own path)."""

    name = "full"
    FULL = True


class RacingOptions(StrategyOptions):
    eta: float = Field(1 / 3, gt=0, lt=1)  # share of a rung promoted to the next
    first: float | None = Field(None, gt=0, le=1)  # share of the documents in the first rung (default eta^2)
    rungs: list[float] | None = None  # explicit shares, increasing, the last 1.0 (instead of first)

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("is empty; give the rungs' shares of the documents, e.g. [0.1, 0.3, 1.0]")
        if any(not (0 < v <= 1) for v in value) or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"must be increasing shares in (0, 1], got {value}")
        if value[-1] != 1:
            raise ValueError(f"the last rung must be 1.0 (the whole search set), got {value[-1]}")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> RacingOptions:
        if self.rungs is not None and self.first is not None:
            raise ValueError("give rungs or first, not both")
        return self

    def shares(self) -> list[float]:
        if self.rungs is not None:
            return list(self.rungs)
        first = self.first if self.first is not None else self.eta**2
        out = [first]
        while out[-1] < 1 - 1e-9:
            out.append(min(1.0, out[-1] / self.eta))
        return out


class Racing(Strategy):
    name = "racing"
    Options = RacingOptions
    GROUPED = True

    def __init__(self, options: RacingOptions, info: StageInfo) -> None:
        super().__init__(options, info)
        self.shares = options.shares()
        self.order = {t: permutation(info, t) for t in info.n_docs}

    def rung_docs(self, rung: int) -> dict:
        return prefix(self.order, self.info.counts(self.shares[rung]))

    def open(self, member: Member) -> None:
        member.note.setdefault("rung", 0)
        member.want = self.rung_docs(int(member.note["rung"]))

    def decide(self, members: list[Member]) -> None:
        for m in members:
            if m.error is not None or int(m.note["rung"]) >= len(self.shares) - 1:
                m.done = True
        alive = [m for m in members if not m.done]
        if not alive:
            return
        keep = promoted(len(alive), self.options.eta)
        ranked = sorted(range(len(alive)), key=lambda i: (-_fitness(self, alive[i]), i))
        for rank, i in enumerate(ranked):
            m = alive[i]
            if rank < keep:
                m.note["rung"] = int(m.note["rung"]) + 1
                m.want = self.rung_docs(int(m.note["rung"]))
            else:
                m.done = True

    def core(self) -> dict:
        return self.rung_docs(0)


def promoted(n: int, eta: float) -> int:
    """How many of `n` candidates go on to the next rung: ceil(eta * n) (at least one)."""
    return max(1, math.ceil(eta * n - 1e-9))


def _fitness(strategy: Strategy, member: Member) -> float:
    value = strategy.info.fitness(strategy.estimate(member))
    return -math.inf if value is None else value
