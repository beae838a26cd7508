"""The contract between the scheduler and its worker pools (Ray or in-process).

The scheduler turns candidates into `Job`s, submits them to a `WorkerPool` and collects
`JobOutcome`s. A pool never raises for a bad candidate: failures (exceptions, NaN, a worker
that died three times) come back as outcomes whose `result.error` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from evomerge.evaluate.result import EvalResult
from evomerge.recipe import Recipe

#: how many times a job is retried on a fresh worker after its worker died
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class TensorsPayload:
    """Raw weights to score (a weights-space candidate, `evomerge.run.weights`): `tensors` fill the
    architecture of the source model `template`; `recipe` names them in the ledger (a passthrough
    of `genome:<sha256 of the tensors>`, so its hash identifies exactly these weights)."""

    template: str
    tensors: Mapping[str, Any]  # name -> torch.Tensor
    recipe: Recipe


#: what a job scores: a merge recipe, or raw tensors
Payload: TypeAlias = Recipe | TensorsPayload


def payload_recipe(payload: Payload) -> Recipe:
    """The recipe that names what `payload` scores (in the ledger, for dedup and replay)."""
    return payload.recipe if isinstance(payload, TensorsPayload) else payload


@dataclass
class Job:
    """One evaluation: a recipe (or raw tensors) scored on one split (optionally one shard of its
    documents)."""

    job_id: str  # unique, e.g. f"{stage}:{candidate_id}:{split}:{shard}"
    payload: Payload
    split: str  # "search" | "holdout"
    subset: Any | None = None  # evaluator subset object (evomerge.evaluate), None = all docs
    shard: tuple[int, int] | None = None  # (i, n): score only shard i of n of the documents

    @property
    def recipe(self) -> Recipe:
        return payload_recipe(self.payload)


@dataclass
class JobOutcome:
    """What came back for a job: its result (failed results have `.error` set) and where/when."""

    job_id: str
    result: EvalResult
    worker: str
    attempts: int
    started: float
    finished: float


@runtime_checkable
class WorkerPool(Protocol):
    """A set of workers, each holding the sources, one resident model and the evaluator."""

    def start(
        self, sources: dict[str, str], evaluator: dict, *, allow_pickle: bool, dtype: str | None
    ) -> None:
        """Start the workers. `sources`: ref -> local model dir (already resolved);
        `evaluator`: the resolved evaluator spec dict."""

    def add_source(self, ref: str, path: str) -> None:
        """Make a new source known to every worker (e.g. "stage:ps" after a stage ends)."""

    def submit(self, job: Job) -> None:
        """Queue a job; it runs as soon as a worker is free."""

    def wait(self, timeout: float | None = None) -> list[JobOutcome]:
        """Finished jobs; at least one unless `timeout` passes (or nothing is pending)."""

    @property
    def size(self) -> int:
        """Number of workers."""

    def idle(self) -> int:
        """Workers without a job."""

    def shutdown(self) -> None:
        """Stop the workers and release their resources."""
