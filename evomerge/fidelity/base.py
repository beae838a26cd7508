"""The interface of a fidelity strategy: which search documents a candidate is scored on, and
what fitness it is told.

Documents are named by their *position* in a task's search selection: the documents the
evaluator scores for a candidate of that generation in full (after `limit` and `subsample`),
0 .. n_t - 1 per task (`StageInfo.n_docs`). The runner (`evomerge.fidelity.runner`) scores
positions through `Subset(positions=...)`, so every evaluator kind that can select documents
(`Evaluator.SELECTS_DOCUMENTS`) works with every strategy.

Life of a candidate (a `Member`):

1. `open(member)`: the strategy sets `member.want` (positions per task to have scored before its
   next decision). Everything it decides about the candidate that must survive a resume goes in
   `member.note` (JSON-safe); `open` only sets what `note` lacks, because the runner restores the
   notes of candidates in flight when a run resumes.
2. The runner scores what the member wants and has not scored yet (never a document twice) and
   keeps every per-sample score it gets (`member.scores`).
3. When every member of a race has what it wants (a `GROUPED` strategy races the candidates of
   one generation asked together; otherwise a candidate races alone), `decide(members)` either
   sets a member's `want` again (more documents) or marks it `done`.
4. A done member is told `estimate(member)` (objectives); `is_estimate(member)` says whether that
   is an estimate (default: fewer than all documents scored) and the ledger row records it.
5. After each tell, in ask order, `told(member, fitness)` (fitness: higher is better, None for a
   failure): strategies that learn from the run (a top-k threshold, an IRT refit) do it here.
   `observe(scores)` gets fully scored models the run already has (the baselines' search rows)
   at the start of the stage.
6. At the end of the stage the estimates that would enter the top k are scored in full
   (`evomerge.fidelity.stage.rescore_estimates`); a strategy that `bounds_estimates` ranks them
   on `lower_bound` instead of the estimate.

A strategy's state (`state_dict`, JSON-safe) is saved with every checkpoint and loaded on resume.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.evaluate.result import weighted_objectives

Positions = dict[str, np.ndarray]  # task -> sorted document positions


class StrategyOptions(BaseModel):
    """Base of a strategy's options (the keys of `fidelity:` besides `strategy`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class StageInfo:
    """What a strategy knows about its stage."""

    stage: str
    n_docs: dict[str, int]  # task -> documents of the full search set
    weights: dict[str, dict[str, float]]  # objective -> task -> weight
    directions: dict[str, bool]  # objective -> higher is better (primary first)
    primary: str
    seed: int
    top_k: int  # the stage's holdout top-k (at least 1)
    needs_core: bool = False  # the optimizer learns from per-sample scores on common documents (M2N2)
    per_generation: bool = False  # a position names another document each generation (a per-generation subsample)

    @property
    def total(self) -> int:
        return sum(self.n_docs.values())

    def objectives(self, task_scores: Mapping[str, float]) -> dict[str, float]:
        """Objectives from task scores (weighted means, as the evaluators compute them)."""
        return weighted_objectives(self.weights, dict(task_scores))

    def fitness(self, objectives: Mapping[str, float]) -> float | None:
        """Higher-is-better scalar of the primary objective (None when not finite)."""
        value = float(objectives.get(self.primary, math.nan))
        if not math.isfinite(value):
            return None
        return value if self.directions[self.primary] else -value

    def counts(self, share: float) -> dict[str, int]:
        """How many documents per task a share of the search set is (at least one each)."""
        return {t: max(1, min(n, math.ceil(share * n - 1e-9))) for t, n in self.n_docs.items()}


@dataclass
class Member:
    """One candidate being scored: what it has (per task: position -> score), what it wants, and
    the strategy's notes about it."""

    cid: int
    generation: int
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    want: Positions = field(default_factory=dict)
    note: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    error: str | None = None  # the candidate failed (told as failed, whatever the strategy says)

    def positions(self, task: str) -> np.ndarray:
        return np.asarray(sorted(self.scores.get(task, {})), dtype=np.int64)

    def values(self, task: str) -> np.ndarray:
        """Per-sample scores of `task`, in position order."""
        got = self.scores.get(task, {})
        return np.asarray([got[p] for p in sorted(got)], dtype=np.float64)

    @property
    def n_scored(self) -> int:
        return sum(len(v) for v in self.scores.values())

    def missing(self) -> Positions:
        """What it wants and has not scored yet."""
        out = {}
        for task, pos in self.want.items():
            have = self.scores.get(task, {})
            rest = np.asarray([int(p) for p in np.asarray(pos).ravel() if int(p) not in have], dtype=np.int64)
            if rest.size:
                out[task] = np.sort(rest)
        return out

    def is_full(self, info: StageInfo) -> bool:
        return all(len(self.scores.get(t, {})) >= n for t, n in info.n_docs.items())

    def task_means(self) -> dict[str, float]:
        return {t: float(np.mean(self.values(t))) if self.scores.get(t) else math.nan for t in self.scores}


class Strategy:
    """A fidelity strategy (module docstring). Subclasses set `name`, `Options` and the
    capabilities, and implement `open` and `decide`."""

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: scores every document of every candidate (today's behaviour; the runner is not used)
    FULL: ClassVar[bool] = False
    #: races the candidates of a generation together (decide gets them all at once)
    GROUPED: ClassVar[bool] = False

    def __init__(self, options: StrategyOptions, info: StageInfo) -> None:
        self.options = options
        self.info = info

    def open(self, member: Member) -> None:
        """Set `member.want` (and `member.note`) for a newly asked candidate."""
        member.want = self.all_documents()

    def decide(self, members: list[Member]) -> None:
        """Every member has what it wanted: set `want` again or `done` on each."""
        for m in members:
            m.done = True

    def estimate(self, member: Member) -> dict[str, float]:
        """The objectives a done member is told (default: the means over its scored documents)."""
        return self.info.objectives(member.task_means())

    def is_estimate(self, member: Member) -> bool:
        return not member.is_full(self.info)

    def told(self, member: Member, fitness: float | None) -> None:
        """A member was told (in ask order) with this fitness."""

    def observe(self, scores: Mapping[str, Mapping[int, float]]) -> None:
        """Per-sample scores (task -> position -> score) of a model scored on every document."""

    @property
    def bounds_estimates(self) -> bool:
        """Whether `lower_bound` can be below the estimate itself."""
        return False

    def lower_bound(self, scores: Mapping[str, Mapping[int, float]], fitness: float) -> float:
        """A lower confidence bound of the full-set fitness (higher is better) of a candidate told
        `fitness` from these per-sample scores (task -> position -> score); the final re-scoring
        scores in full only the estimates that would enter the top k on it. Default: the estimate."""
        return fitness

    def core(self) -> Positions:
        """Documents every candidate is scored on, fixed for the whole stage: what an optimizer
        that compares per-sample scores (M2N2) is told (default: all)."""
        return self.all_documents()

    def all_documents(self) -> Positions:
        return {t: np.arange(n, dtype=np.int64) for t, n in self.info.n_docs.items()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""


def permutation(info: StageInfo, task: str, salt: str = "order") -> np.ndarray:
    """A seeded order of a task's documents, the same for every candidate of the stage."""
    rng = np.random.default_rng([info.seed & 0xFFFFFFFF, zlib.crc32(f"{info.stage}|{task}|{salt}".encode())])
    return rng.permutation(info.n_docs[task]).astype(np.int64)


def prefix(order: Mapping[str, np.ndarray], counts: Mapping[str, Any]) -> Positions:
    """The first `counts[task]` documents of each task's order, sorted."""
    return {t: np.sort(np.asarray(order[t][: int(counts[t])], dtype=np.int64)) for t in order}


def sample_stderr(info: StageInfo, scores: Mapping[str, Mapping[int, float]]) -> float:
    """Standard error of the primary objective estimated by the plain mean of each task's scored
    documents, when they are a uniform sample of the task without replacement. A task's variance
    is the sample variance, or for scores in [0, 1] its bound p (1 - p) at the Laplace-smoothed mean
    p = (sum + 1) / (n + 2), so that a sample all right (or all wrong) does not claim to be exact.
    A weighted task without scores gives 0 (nothing known: the estimate is its own bound)."""
    weights = info.weights.get(info.primary, {})
    total = sum(weights.values())
    var = 0.0
    for task, w in weights.items():
        values = np.asarray(list(scores.get(task, {}).values()), dtype=np.float64)
        n, size = len(values), info.n_docs.get(task, 0)
        if w <= 0 or n >= size:
            continue
        if n == 0:
            return 0.0
        if values.min() >= 0 and values.max() <= 1:
            p = (values.sum() + 1) / (n + 2)
            spread = p * (1 - p)
        else:
            spread = float(values.var(ddof=1)) if n > 1 else 0.0
        var += (w / total) ** 2 * spread / n * (1 - n / size)
    return math.sqrt(var)
