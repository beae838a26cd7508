"""The scheduler: ask, evaluate on the worker pool, write the ledger, tell, checkpoint.

The rules (the project's design: every worker busy, the same run whatever order workers finish
in, nothing lost to a kill, no recipe evaluated twice, failures told), and how they are kept:

- *Every worker busy.* Up to `depth` candidates (default: twice the pool's size, so a slow
  candidate at the head of the tell order does not leave the other workers without work) are
  asked and in flight at once; a generational optimizer hands out its whole generation. When there are fewer candidates to evaluate than idle workers (a generational
  optimizer waiting for the end of its generation), one candidate is split across the idle
  workers by document shards and its parts combined (`EvalResult.combine`).
- *Reproducible.* Results are told strictly in ask order, one candidate at a time, and the
  optimizer is asked again right after each tell, so where asks fall between tells depends only
  on the number of tells, never on which worker finished first. Each result is written to the
  ledger just before it is told, so ledger order is tell order.
- *Durable.* A checkpoint follows every tell. A resumed stage loads the last checkpoint: the
  optimizer lists what was in flight, and rows the ledger holds beyond the checkpoint (written
  before a kill, not yet checkpointed) are told from the ledger instead of being evaluated again.
- *Never twice.* A recipe whose hash the ledger already scored on the same split, stage and
  document subset takes that row's scores (a new row with `meta.reused_from`); twins asked
  together share one evaluation.
- *Faults.* A failed evaluation is written with its error and told as failed (the optimizer
  scores it worst); `max_failures` failures in a row stop the run with the last error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.result import EvalResult
from evomerge.optim.base import Candidate, Optimizer
from evomerge.recipe import Recipe
from evomerge.run.jobs import Job, JobOutcome, Payload, WorkerPool, payload_recipe
from evomerge.run.ledger import Ledger, LedgerRow

MAX_FAILURES_IN_A_ROW = 20


class RunStopped(EvomergeError):
    """The run cannot go on (too many failures in a row); the ledger keeps everything so far."""

    exit_code = 1


@dataclass
class Evaluation:
    """One recipe to score on one split: its jobs, their parts, and the result once complete."""

    key: str  # stage|split|subset|hash
    payload: Payload | None  # None: the candidate did not decode
    split: str
    subset: Any
    n_parts: int = 0
    parts: dict[int, EvalResult] = field(default_factory=dict)
    result: EvalResult | None = None
    worker: str = ""
    started: float = 0.0
    finished: float = 0.0
    reused_from: int | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def recipe(self) -> Recipe | None:
        return None if self.payload is None else payload_recipe(self.payload)


@dataclass
class Pending:
    """A candidate asked and not yet told."""

    cand: Candidate
    recipe: Recipe | None
    recipe_hash: str
    subset_key: str
    evaluation: Evaluation
    replayed: LedgerRow | None = None  # its row is already in the ledger (resume)
    # scored under a fidelity strategy (`evomerge.fidelity.runner`): its member, the scores its
    # recipe already has in the ledger, the evaluation of the documents it lacks now
    member: Any = None
    known: dict[str, dict[int, float]] = field(default_factory=dict)
    delta: Evaluation | None = None
    delta_positions: dict[str, Any] | None = None
    seconds: float = 0.0
    new_docs: int = 0  # documents evaluated for it (not taken from the ledger)

    @property
    def ready(self) -> bool:
        """Whether it can be told: its evaluation is complete (under a fidelity strategy: the
        strategy is done with it)."""
        if self.member is None:
            return self.evaluation.done
        return self.member.done and self.delta is None

    def add_timing(self, ev: Evaluation) -> None:
        """One more evaluation of its documents: its worker, times and seconds count for the row."""
        mine = self.evaluation
        if ev.worker and ev.worker not in mine.worker.split(","):
            mine.worker = f"{mine.worker},{ev.worker}" if mine.worker else ev.worker
        mine.started = ev.started if not mine.started else min(mine.started, ev.started)
        mine.finished = max(mine.finished, ev.finished)
        if ev.result is not None and ev.reused_from is None:
            self.seconds += float(ev.result.seconds)


def result_from_row(row: LedgerRow) -> EvalResult:
    """The EvalResult a ledger row stands for (what the optimizer was or will be told)."""
    return EvalResult(
        objectives=dict(row.objectives),
        higher_is_better=dict(row.higher_is_better),
        per_sample={k: np.asarray(v, dtype=np.float64) for k, v in row.per_sample.items()},
        doc_ids={k: list(v) for k, v in row.meta.get("doc_ids", {}).items()},
        counts=dict(row.meta.get("counts", {})),
        seconds=float(row.finished - row.started),
        error=row.error,
    )


def recipe_hash(recipe: Recipe | None) -> str:
    return recipe.content_hash() if recipe is not None else "undecodable"


class Scheduler:
    """Drives one stage's optimizer over a worker pool; see the module docstring.

    decode: candidate -> recipe or raw tensors (raises on a genome the space cannot build: the candidate fails).
    subset_for: generation -> (subset object for the evaluator, key naming its documents).
    fitness: result -> higher-is-better scalar or None when failed.
    on_tell: called after each tell with the scheduler's counters; writes the checkpoint.
    replay: rows of this stage written after the last checkpoint, by candidate id.
    """

    def __init__(
        self,
        *,
        stage: str,
        optimizer: Optimizer,
        pool: WorkerPool,
        ledger: Ledger,
        decode: Callable[[Candidate], Payload],
        subset_for: Callable[[int], tuple[Any, str]],
        fitness: Callable[[EvalResult], float | None],
        on_tell: Callable[[dict], None],
        replay: dict[int, LedgerRow] | None = None,
        fidelity: Any = None,
        failures_in_a_row: int = 0,
        last_error: str | None = None,
        depth: int | None = None,
        max_failures: int = MAX_FAILURES_IN_A_ROW,
        shardable: bool = True,
        progress: Callable[[int, str], None] | None = None,
    ):
        self.stage = stage
        self.opt = optimizer
        self.pool = pool
        self.ledger = ledger
        self.decode = decode
        self.subset_for = subset_for
        self.fitness = fitness
        self.on_tell = on_tell
        self.replay = dict(replay or {})
        self.fidelity = fidelity  # a FidelityRunner (`evomerge.fidelity.runner`), None: every document
        self.failures_in_a_row = failures_in_a_row
        self.last_error = last_error
        self.depth = max(1, depth if depth is not None else 2 * pool.size)
        self.max_failures = max_failures
        self.shardable = shardable
        self.progress = progress
        self._jobs: dict[str, tuple[Evaluation, int]] = {}  # job id -> (evaluation, part)
        self._evals: dict[str, Evaluation] = {}  # evaluation key -> evaluation (twins share one)
        self._queue: list[Evaluation] = []  # evaluations not submitted yet
        self._job_counter = 0
        self.told = 0
        self.evaluated = 0
        self.started = time.perf_counter()

    # ---- the search loop ----------------------------------------------------------------
    def run(self) -> str:
        """Search until the optimizer stops; returns why it stopped."""
        outstanding: list[Pending] = [self._pending(c) for c in self.opt.in_flight()]
        self._refill(outstanding)
        while outstanding:
            if self.fidelity is not None:
                self.fidelity.advance(outstanding, self)
            head = outstanding[0]
            if head.ready:
                outstanding.pop(0)
                self._tell(head)
                self._refill(outstanding)
                continue
            self._submit()
            self._collect()
        return self.opt.stopped or "the optimizer proposed nothing more"

    def _refill(self, outstanding: list[Pending]) -> None:
        # Ask at least the optimizer's natural batch so a generational optimizer hands out its
        # whole generation at once (more candidates queued than workers is fine).
        if len(outstanding) < self.depth and not self.opt.stopped:
            n = max(self.depth - len(outstanding), self.opt.natural_batch())
            outstanding.extend(self._pending(c) for c in self.opt.ask(n))

    def _pending(self, cand: Candidate) -> Pending:
        subset, subset_key = self.subset_for(cand.generation)
        try:
            payload: Payload | None = cand.recipe if cand.recipe is not None else self.decode(cand)
        except Exception as exc:  # a genome the space cannot build fails like a bad merge
            payload, error = None, f"decode: {type(exc).__name__}: {exc}"
        else:
            error = None
        recipe = None if payload is None else payload_recipe(payload)
        digest = recipe_hash(recipe)
        key = f"{self.stage}|search|{subset_key}|{digest}"
        replayed = self.replay.pop(cand.id, None)
        if replayed is not None and replayed.recipe_hash != digest:
            replayed = None  # not the same candidate after all: evaluate it again
        if self.fidelity is not None:
            pending = Pending(cand, recipe, digest, subset_key, Evaluation(key, payload, "search", subset), replayed)
            self.fidelity.start(pending, None if payload is not None else (error or "decode failed"), self)
            return pending
        if replayed is not None:
            evaluation = Evaluation(key, payload, "search", subset, result=result_from_row(replayed))
            return Pending(cand, recipe, digest, subset_key, evaluation, replayed)
        if payload is None:
            evaluation = Evaluation(key, None, "search", subset, result=EvalResult.failure(error or "", self._directions()))
            return Pending(cand, recipe, digest, subset_key, evaluation)
        return Pending(cand, recipe, digest, subset_key, self.evaluation(key, payload, "search", subset, subset_key))

    def _tell(self, p: Pending) -> None:
        estimate = False
        if p.member is not None:
            result, row_result, estimate = self.fidelity.result(p)
            p.evaluation.result = row_result
        else:
            result = row_result = p.evaluation.result
        assert result is not None
        if p.replayed is None:
            self.ledger.append(self._row(p, row_result, estimate))
        else:
            self.ledger.passed(p.replayed.seq)
        # Once its row is in the ledger a twin asked later finds it there: keeping every finished
        # evaluation here grew a digits M2N2 run by 2.3 MB per candidate (its weights, per-sample
        # scores and doc ids, and the heap they pinned).
        self._evals.pop(p.evaluation.key, None)
        self.opt.tell([p.cand], [result])
        if p.member is not None:
            self.fidelity.told(p, None if result.failed else self.fitness(result))
        self.told += 1
        if result.failed:
            self.failures_in_a_row += 1
            self.last_error = result.error or "non-finite objective"
        else:
            self.failures_in_a_row = 0
        self.on_tell({"failures_in_a_row": self.failures_in_a_row, "last_error": self.last_error})
        if self.progress is not None:
            self.progress(self.told, self._note())
        if self.failures_in_a_row >= self.max_failures:
            raise RunStopped(
                f"{self.failures_in_a_row} failed evaluations in a row in stage '{self.stage}'; "
                f"the last error: {self.last_error}"
            )

    def _row(self, p: Pending, result: EvalResult, estimate: bool = False) -> LedgerRow:
        ev = p.evaluation
        meta: dict[str, Any] = {}
        if result.doc_ids:
            meta["doc_ids"] = result.doc_ids
        if result.counts:
            meta["counts"] = result.counts
        if p.cand.parents:
            meta["parents"] = list(p.cand.parents)
        if ev.reused_from is not None:
            meta["reused_from"] = ev.reused_from
        if p.member is not None:
            meta["new_docs"] = p.new_docs
        return LedgerRow.from_result(
            result,
            None if result.failed else self.fitness(result),
            stage=self.stage,
            candidate_id=p.cand.id,
            generation=p.cand.generation,
            split="search",
            genome=None if p.cand.genome is None else np.asarray(p.cand.genome, dtype=np.float64).ravel().tolist(),
            recipe_hash=p.recipe_hash,
            recipe_yaml=p.recipe.to_yaml() if p.recipe is not None else "",
            worker=ev.worker,
            started=ev.started,
            finished=ev.finished,
            subset=p.subset_key,
            meta=meta,
            estimate=estimate,
        )

    # ---- evaluations (search, holdout, baselines) ---------------------------------------
    def evaluation(self, key: str, payload: Payload, split: str, subset: Any, subset_key: str) -> Evaluation:
        """The evaluation of `payload` (a recipe, or raw tensors): one already running for the
        same key, one from the ledger, or a new one queued for the pool."""
        known = self._evals.get(key)
        if known is not None:
            return known
        digest = payload_recipe(payload).content_hash()
        stage = key.split("|", 1)[0]
        row = self.ledger.find(digest, split, stage=stage, subset=subset_key)
        if row is not None:
            ev = Evaluation(key, payload, split, subset, result=result_from_row(row), reused_from=row.seq)
            ev.worker, ev.started, ev.finished = f"ledger:{row.seq}", time.time(), time.time()
            return ev
        ev = Evaluation(key, payload, split, subset)
        self._evals[key] = ev
        self._queue.append(ev)
        return ev

    def forget(self, ev: Evaluation) -> None:
        """A complete evaluation its owners have taken: twins asked later find its row instead."""
        if self._evals.get(ev.key) is ev:
            del self._evals[ev.key]

    def evaluate_all(self, evaluations: Sequence[Evaluation]) -> None:
        """Run queued evaluations until all of `evaluations` are complete (holdout, baselines)."""
        while not all(ev.done for ev in evaluations):
            self._submit()
            self._collect()

    def _submit(self) -> None:
        if not self._queue:
            return
        busy = len(self._jobs)
        free = max(0, self.pool.size - busy)
        queued, self._queue = self._queue, []
        shards = [1] * len(queued)
        if self.shardable and 0 < len(queued) < free:
            base, extra = divmod(free, len(queued))
            shards = [base + (1 if i < extra else 0) for i in range(len(queued))]
        for ev, n in zip(queued, shards, strict=True):
            ev.n_parts, ev.started = n, time.time()
            for i in range(n):
                self._job_counter += 1
                job_id = f"{ev.key}|{i}/{n}|{self._job_counter}"
                self._jobs[job_id] = (ev, i)
                self.pool.submit(Job(job_id, ev.payload, ev.split, ev.subset, (i, n) if n > 1 else None))  # type: ignore[arg-type]

    def _collect(self) -> None:
        if not self._jobs:
            raise RuntimeError("the scheduler waits for results but no job is running")
        outcomes: list[JobOutcome] = self.pool.wait()
        for out in outcomes:
            entry = self._jobs.pop(out.job_id, None)
            if entry is None:
                continue
            ev, part = entry
            ev.parts[part] = out.result
            ev.worker = out.worker if not ev.worker else (ev.worker if out.worker in ev.worker.split(",") else f"{ev.worker},{out.worker}")
            ev.finished = max(ev.finished, out.finished)
            if len(ev.parts) == ev.n_parts:
                ev.result = self._combine(ev)
                self.evaluated += 1

    def _combine(self, ev: Evaluation) -> EvalResult:
        parts = [ev.parts[i] for i in range(ev.n_parts)]
        if len(parts) == 1:
            return parts[0]
        try:
            return EvalResult.combine(parts)
        except Exception as exc:
            return EvalResult.failure(f"combining {len(parts)} shards: {exc}", parts[0].higher_is_better)

    # ---- reporting ----------------------------------------------------------------------
    def _directions(self) -> dict[str, bool]:
        return dict(self.opt.objectives.directions)

    def _note(self) -> str:
        best = self.opt.best()
        score = self.fitness(best[1]) if best else None
        rate = self.evaluated / max(1e-9, time.perf_counter() - self.started)
        best_text = f"best {score:.4f}" if score is not None else "best -"
        eta = ""
        if self.opt.max_evals is not None and rate > 0:
            eta = f", ETA {max(0, self.opt.max_evals - self.opt.n_told) / rate:.0f} s"
        return f"{best_text}, {rate:.2f} evals/s{eta}, {self.failures_in_a_row} failed in a row"
