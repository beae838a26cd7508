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

Composed (`over: irt`, with `over_options` for it): the other strategy's documents are the first
rung (IRT's anchors; in full during its warm-up), later rungs add racing's shares to them, and
candidates are ranked and told by its estimates (IRT's estimate from every document scored). It
learns from the told candidates a generation at a time (its `told` is called for the earlier
generations' candidates when a race first decides, once they are all told), so the estimates a
race compares all come from one state of it, whatever the order of tells within the race, and a
resumed race decides the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
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
    over: str | None = None  # rank by another strategy's estimates, its documents the first rung (irt)
    over_options: dict[str, Any] = Field(default_factory=dict)  # that strategy's options

    @model_validator(mode="after")
    def _inner(self) -> RacingOptions:
        if self.over is None:
            if self.over_options:
                raise ValueError("over_options without over (the strategy they are for)")
            return self
        from evomerge.fidelity import check_fidelity  # the registry imports this module

        cls, _ = check_fidelity({"strategy": self.over, **self.over_options}, where="over_options")
        if cls.GROUPED or cls.FULL:
            raise ValueError(f"racing can run over a strategy that scores candidates one by one (irt), not over '{self.over}'")
        return self

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
        self.inner: Strategy | None = None
        if options.over is not None:
            from evomerge.fidelity import check_fidelity  # the registry imports this module

            cls, inner_options = check_fidelity({"strategy": options.over, **options.over_options})
            self.inner = cls(inner_options, info)
        self.waiting: list[dict[str, Any]] = []  # told, not yet passed on to the inner strategy

    def rung_docs(self, rung: int) -> dict:
        return prefix(self.order, self.info.counts(self.shares[rung]))

    def open(self, member: Member) -> None:
        member.note.setdefault("rung", 0)
        member.want = self._want(member)

    def _want(self, member: Member) -> dict:
        rung = int(member.note["rung"])
        if self.inner is None:
            return self.rung_docs(rung)
        self.inner.open(member)  # decided from its note: the same documents every time
        if rung == 0:
            return member.want
        extra = self.rung_docs(rung)
        return {t: np.union1d(member.want.get(t, extra[t][:0]), extra[t]).astype(np.int64) for t in extra}

    def decide(self, members: list[Member]) -> None:
        if members:
            self._pass_on(members[0].generation)
        for m in members:
            if m.error is not None or int(m.note["rung"]) >= len(self.shares) - 1 or m.is_full(self.info):
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
                m.want = self._want(m)
            else:
                m.done = True

    def estimate(self, member: Member) -> dict[str, float]:
        return super().estimate(member) if self.inner is None else self.inner.estimate(member)

    def is_estimate(self, member: Member) -> bool:
        return super().is_estimate(member) if self.inner is None else self.inner.is_estimate(member)

    def told(self, member: Member, fitness: float | None) -> None:
        if self.inner is not None:
            scores = {t: [[int(p), float(v)] for p, v in sorted(got.items())] for t, got in member.scores.items()}
            self.waiting.append({"cid": member.cid, "generation": member.generation, "scores": scores, "error": member.error, "fitness": fitness})

    def _pass_on(self, generation: int) -> None:
        """The inner strategy learns from the told candidates of earlier generations (when a race
        decides: every earlier candidate is told by then)."""
        if self.inner is None:
            return
        for item in [i for i in self.waiting if i["generation"] < generation]:
            m = Member(cid=item["cid"], generation=item["generation"], error=item["error"])
            m.scores = {t: {int(p): float(v) for p, v in pairs} for t, pairs in item["scores"].items()}
            self.inner.told(m, item["fitness"])
        self.waiting = [i for i in self.waiting if i["generation"] >= generation]

    def observe(self, scores: Mapping[str, Mapping[int, float]]) -> None:
        if self.inner is not None:
            self.inner.observe(scores)

    def core(self) -> dict:
        return self.rung_docs(0) if self.inner is None else self.inner.core()

    def state_dict(self) -> dict[str, Any]:
        if self.inner is None:
            return {}
        return {"inner": self.inner.state_dict(), "waiting": json.loads(json.dumps(self.waiting))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state.get("inner", {}))
            self.waiting = list(state.get("waiting", []))


def promoted(n: int, eta: float) -> int:
    """How many of `n` candidates go on to the next rung: ceil(eta * n) (at least one)."""
    return max(1, math.ceil(eta * n - 1e-9))


def _fitness(strategy: Strategy, member: Member) -> float:
    value = strategy.info.fitness(strategy.estimate(member))
    return -math.inf if value is None else value
