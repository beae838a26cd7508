"""The ask/tell contract every optimizer follows, and the bookkeeping they share.

Contract (what the scheduler may rely on):

- `ask(n)` returns at most `n` new candidates (`n=None`: the optimizer's natural batch, its
  popsize). It may return fewer, even none: a generational optimizer (cmaes) hands out the rest
  of its pending generation and then waits for that generation's results before it can propose
  more; a finished optimizer (budget spent, grid swept) returns `[]` and sets `stopped`.
  Steady-state optimizers (random, grid, optuna, m2n2) always return `n` while not stopped.
- `tell(candidates, results)` accepts any subset of the candidates in flight, in any grouping
  (partial generations are buffered). For a reproducible run tell in ask order; m2n2 updates its
  archive in exactly the order told.
- A failed result (`EvalResult.failed`) never raises: it is scored with the worst value of its
  batch (see `evomerge.optim.fitness`).
- `state_dict()` is JSON-able data (see `evomerge.optim.state`); loading it into a freshly built
  optimizer with the same arguments gives exactly the same next asks as the uninterrupted run.
  Candidates in flight at save time are part of the state: after a restore `in_flight()` lists
  them so the scheduler can evaluate them again, and they are told as usual.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim.fitness import Objectives, dominates, fill_failures
from evomerge.optim.options import Option, check_all
from evomerge.optim.state import FORMAT, decode_array, encode_array
from evomerge.recipe import Recipe


@dataclass
class Candidate:
    """One proposal. `genome` lies within the space's bounds; M2N2 model mode sets `recipe` instead."""

    id: int
    generation: int
    genome: np.ndarray | None
    recipe: Recipe | None = None
    parents: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "generation": self.generation,
            "genome": encode_array(self.genome),
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "parents": list(self.parents),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        recipe = Recipe.model_validate(data["recipe"]) if data.get("recipe") is not None else None
        return cls(
            id=int(data["id"]),
            generation=int(data["generation"]),
            genome=decode_array(data["genome"]),
            recipe=recipe,
            parents=tuple(int(p) for p in data.get("parents", ())),
            meta=dict(data.get("meta", {})),
        )


def normalize_bounds(bounds: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bound arrays from `(lower, upper)` (a tuple of scalars or length-dim
    sequences), a `[dim, 2]` array of `[lo, hi]` pairs, or None (unbounded)."""
    if bounds is None:
        lower, upper = np.full(dim, -np.inf), np.full(dim, np.inf)
    else:
        arr = None if isinstance(bounds, tuple) else np.asarray(bounds, dtype=np.float64)
        if arr is not None and arr.shape == (dim, 2):
            lower, upper = arr[:, 0].copy(), arr[:, 1].copy()
        elif len(bounds) == 2:
            try:
                lower = np.broadcast_to(np.asarray(bounds[0], dtype=np.float64), (dim,)).copy()
                upper = np.broadcast_to(np.asarray(bounds[1], dtype=np.float64), (dim,)).copy()
            except ValueError:
                raise ConfigError(f"bounds must be (lower, upper) or {dim} pairs [lo, hi]", field="bounds") from None
        else:
            raise ConfigError(f"bounds must be (lower, upper) or {dim} pairs [lo, hi]", field="bounds")
    if np.any(np.isnan(lower)) or np.any(np.isnan(upper)) or np.any(lower > upper):
        bad = int(np.argmax(~(lower <= upper)))
        raise ConfigError(f"bounds of gene {bad} are not an interval: [{lower[bad]}, {upper[bad]}]", field="bounds")
    return lower, upper


class Optimizer(ABC):
    """Base of every optimizer: ids, candidates in flight, budget, best and Pareto front.

    Subclasses implement `_propose`, `_observe`, `_state` and `_load_state`; everything a
    subclass draws at random comes from `self.rng` (a numpy Generator seeded from `seed`) or from
    a library object seeded from it.
    """

    name: ClassVar[str] = ""
    #: option name -> declaration (default, valid values); any other option is refused.
    OPTIONS: ClassVar[dict[str, Option]] = {}
    COMMON_OPTIONS: ClassVar[dict[str, Option]] = {
        "objective": Option(None, "str"),  # the optimized objective (default: the first)
        "multi_objective": Option(False, "bool"),  # Pareto search over every objective
        "max_evals": Option(None, "int", low=1),  # stop after this many candidates asked
        "max_seconds": Option(None, "number", low=0),  # stop after this much wall time (summed over resumes)
    }
    # ---- capabilities: what the run reads instead of the optimizer's name ----
    #: can search a Pareto front over every objective (`multi_objective: true`)
    MULTI_OBJECTIVE: ClassVar[bool] = False
    #: learns from per-sample scores (`EvalResult.per_sample`), not only from the objectives
    NEEDS_PER_SAMPLE: ClassVar[bool] = False

    @classmethod
    def searches_space(cls, options: dict[str, Any]) -> bool:
        """Whether, with these options, candidates are genomes of a search space; False: they
        carry their own recipes over whole models (M2N2 model mode) and the stage has no space."""
        return True

    @classmethod
    def keeps_run_files(cls, options: dict[str, Any]) -> bool:
        """Whether, with these options, it keeps files of its own under the stage's directory
        (the run passes that directory as the option `run_dir`)."""
        return False

    def __init__(
        self,
        *,
        dim: int,
        bounds: Any,
        x0: Sequence[float] | np.ndarray | None,
        seed: int,
        objectives: dict[str, bool],
        **options: Any,
    ):
        self.dim = int(dim)
        if self.dim < 1:
            raise ConfigError(f"the search space has {dim} dimensions; it needs at least 1", field="dim")
        self.lower, self.upper = normalize_bounds(bounds, self.dim)
        self.x0 = None if x0 is None else np.asarray(x0, dtype=np.float64).reshape(-1).copy()
        if self.x0 is not None and self.x0.shape != (self.dim,):
            raise ConfigError(f"x0 has {self.x0.size} values but the space has {self.dim} dimensions", field="x0")
        if self.x0 is not None and (np.any(self.x0 < self.lower) or np.any(self.x0 > self.upper)):
            raise ConfigError("x0 lies outside the bounds", field="x0")
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        opts = self.check_options(options)
        self.options = opts
        self.objectives = Objectives.build(objectives, opts["objective"], opts["multi_objective"])
        self.max_evals = None if opts["max_evals"] is None else int(opts["max_evals"])
        self.max_seconds = None if opts["max_seconds"] is None else float(opts["max_seconds"])
        self._next_id = 0
        # Candidates handed out by ask(); the budget counts these, not ids: a generational
        # optimizer assigns ids to a whole generation before handing it out piecemeal.
        self._n_handed = 0
        self._in_flight: dict[int, Candidate] = {}
        self._n_told = 0
        self._elapsed = 0.0
        self._clock: float | None = None
        self._stop_reason: str | None = None
        self._best: tuple[Candidate, EvalResult] | None = None
        self._front: list[tuple[Candidate, EvalResult]] = []
        self._worst_seen: float | None = None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Every option with its default, the given ones checked against their declarations."""
        return check_all({**cls.COMMON_OPTIONS, **cls.OPTIONS}, options, owner=f"optimizer '{cls.name}'")

    # ---- the public contract ------------------------------------------------------------
    def ask(self, n: int | None = None) -> list[Candidate]:
        """Up to `n` new candidates (None: the natural batch); [] when waiting or stopped."""
        self._tick()
        if n is not None and n < 0:
            raise ValueError("ask(n) needs n >= 0")
        if self.stopped:
            return []
        n = self.natural_batch() if n is None else n
        if self.max_evals is not None:
            n = min(n, self.max_evals - self._n_handed)
            if n <= 0:
                self._stop_reason = f"evaluation budget spent ({self.max_evals})"
                return []
        out = self._propose(n) if n > 0 else []
        self._n_handed += len(out)
        for cand in out:
            self._in_flight[cand.id] = cand
        return out

    def tell(self, candidates: Sequence[Candidate], results: Sequence[EvalResult]) -> None:
        """Report results of candidates in flight (any subset, ask order for reproducibility)."""
        self._tick()
        if len(candidates) != len(results):
            raise ValueError(f"tell got {len(candidates)} candidates but {len(results)} results")
        for cand in candidates:
            if cand.id not in self._in_flight:
                raise ValueError(f"candidate {cand.id} was not asked or was already told")
        cands = [self._in_flight.pop(c.id) for c in candidates]
        for cand, result in zip(cands, results, strict=True):
            self._record(cand, result)
        self._n_told += len(cands)
        self._observe(cands, list(results))

    def best(self) -> tuple[Candidate, EvalResult] | None:
        """Best told candidate on the primary objective (multi-objective runs: see pareto_front)."""
        return self._best

    def pareto_front(self) -> list[tuple[Candidate, EvalResult]]:
        """Non-dominated told candidates over the optimized objectives, in ask order."""
        return list(self._front)

    def in_flight(self) -> list[Candidate]:
        """Candidates asked and not yet told, in ask order."""
        return [self._in_flight[i] for i in sorted(self._in_flight)]

    def reopen(self) -> bool:
        """Go on after its budget was raised (`evomerge resume --set`): a stop on an evaluation or
        time budget that is no longer spent is lifted. Returns whether it was."""
        reason = self._stop_reason or ""
        spent = reason.startswith("evaluation budget spent") and (self.max_evals is None or self.n_asked < self.max_evals)
        timed = reason.startswith("time budget spent") and (self.max_seconds is None or self._elapsed < self.max_seconds)
        if spent or timed:
            self._stop_reason = None
        return spent or timed

    @property
    def stopped(self) -> str | None:
        """Why the optimizer will propose nothing more, or None while it goes on."""
        if self._stop_reason is None and self.max_seconds is not None and self._elapsed >= self.max_seconds:
            self._stop_reason = f"time budget spent ({self.max_seconds:g} s)"
        if self._stop_reason is None:
            self._stop_reason = self._finished()
        return self._stop_reason

    @property
    def n_asked(self) -> int:
        return self._n_handed

    @property
    def n_told(self) -> int:
        return self._n_told

    def natural_batch(self) -> int:
        return 1

    def state_dict(self) -> dict:
        """JSON-able state: everything needed to continue exactly (see module docstring)."""
        self._tick()
        return {
            "format": FORMAT,
            "optimizer": self.name,
            "seed": self.seed,
            "dim": self.dim,
            "next_id": self._next_id,
            "n_handed": self._n_handed,
            "n_told": self._n_told,
            "elapsed": self._elapsed,
            "stop_reason": self._stop_reason,
            "rng": self.rng.bit_generator.state,
            "in_flight": [c.to_dict() for c in self.in_flight()],
            "best": _pair_to_dict(self._best) if self._best else None,
            "front": [_pair_to_dict(p) for p in self._front],
            "worst_seen": self._worst_seen,
            "impl": self._state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ConfigError(f"unknown optimizer checkpoint format {state.get('format')!r}; expected {FORMAT}", field="checkpoint")
        if state.get("optimizer") != self.name or int(state.get("dim", -1)) != self.dim:
            raise ConfigError(
                f"the checkpoint is of optimizer '{state.get('optimizer')}' over {state.get('dim')} dimensions, "
                f"not '{self.name}' over {self.dim}",
                field="checkpoint",
            )
        self._next_id = int(state["next_id"])
        self._n_handed = int(state.get("n_handed", state["next_id"]))
        self._n_told = int(state["n_told"])
        self._elapsed = float(state["elapsed"])
        self._clock = None
        self._stop_reason = state["stop_reason"]
        self.rng.bit_generator.state = state["rng"]
        self._in_flight = {c["id"]: Candidate.from_dict(c) for c in state["in_flight"]}
        self._best = _pair_from_dict(state["best"]) if state["best"] else None
        self._front = [_pair_from_dict(p) for p in state["front"]]
        self._worst_seen = state["worst_seen"]
        self._load_state(state["impl"])

    # ---- for subclasses -----------------------------------------------------------------
    @abstractmethod
    def _propose(self, n: int) -> list[Candidate]:
        """Up to n new candidates (ids from `_new_id`)."""

    @abstractmethod
    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        """Learn from told results (already removed from the in-flight set)."""

    def _state(self) -> dict:
        return {}

    def _load_state(self, state: dict) -> None:
        return None

    def _finished(self) -> str | None:
        return None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _fill(self, raw: Sequence[float | None]) -> list[float]:
        """Scalar fitness of one batch with its failures (None) set to the batch's worst value;
        also remembers the worst value seen, for batches where everything failed."""
        filled = fill_failures(raw, self._worst_seen)
        finite = [v for v in raw if v is not None]
        if finite:
            low = min(finite)
            self._worst_seen = low if self._worst_seen is None else min(self._worst_seen, low)
        return filled

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lower, self.upper)

    # ---- internals ----------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        if self._clock is not None:
            self._elapsed += now - self._clock
        self._clock = now

    def _record(self, cand: Candidate, result: EvalResult) -> None:
        score = self.objectives.score(result)
        if score is None:
            return
        light = _light(result)
        if self._best is None or score > self.objectives.score(self._best[1]):  # type: ignore[operator]
            self._best = (cand, light)
        vec = self.objectives.vector(result)
        assert vec is not None
        front_vecs = [self.objectives.vector(r) for _, r in self._front]
        if any(dominates(v, vec) or tuple(v) == vec for v in front_vecs):  # type: ignore[arg-type]
            return
        self._front = [p for p, v in zip(self._front, front_vecs, strict=True) if not dominates(vec, v)]  # type: ignore[arg-type]
        self._front.append((cand, light))
        self._front.sort(key=lambda p: p[0].id)


def _light(result: EvalResult) -> EvalResult:
    """The result without its per-sample scores (kept for best/front, where only objectives matter)."""
    return EvalResult(
        objectives=dict(result.objectives),
        higher_is_better=dict(result.higher_is_better),
        counts=dict(result.counts),
        seconds=result.seconds,
        error=result.error,
    )


def _pair_to_dict(pair: tuple[Candidate, EvalResult]) -> dict:
    return {"candidate": pair[0].to_dict(), "result": pair[1].to_dict()}


def _pair_from_dict(data: dict) -> tuple[Candidate, EvalResult]:
    return Candidate.from_dict(data["candidate"]), EvalResult.from_dict(data["result"])
