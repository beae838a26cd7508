"""What an evaluation returns: the contract between evaluators, the ledger and the optimizers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EvalResult:
    """Scores of one candidate on one split.

    objectives: named scalar objectives (e.g. {"mean_acc": 0.71} or one per skill).
    higher_is_better: direction of each objective (same keys as objectives).
    per_sample: per task, the score of every document, aligned with `doc_ids[task]`
        (M2N2 needs them; 0/1 correctness or a graded score).
    counts: per task, the number of documents scored.
    seconds: wall time of the evaluation.
    error: set when the candidate failed (exception, NaN, out of memory); the objectives are
        then the worst values and per_sample is empty.
    """

    objectives: dict[str, float]
    higher_is_better: dict[str, bool]
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    doc_ids: dict[str, list] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(not math.isfinite(v) for v in self.objectives.values())

    @classmethod
    def failure(cls, error: str, higher_is_better: dict[str, bool], seconds: float = 0.0) -> EvalResult:
        """A failed candidate: every objective at its worst value."""
        worst = {name: (-math.inf if up else math.inf) for name, up in higher_is_better.items()}
        return cls(objectives=worst, higher_is_better=dict(higher_is_better), seconds=seconds, error=error)

    def to_dict(self) -> dict:
        return {
            "objectives": self.objectives,
            "higher_is_better": self.higher_is_better,
            "per_sample": {k: np.asarray(v).tolist() for k, v in self.per_sample.items()},
            "doc_ids": self.doc_ids,
            "counts": self.counts,
            "seconds": self.seconds,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        return cls(
            objectives=dict(data["objectives"]),
            higher_is_better=dict(data["higher_is_better"]),
            per_sample={k: np.asarray(v, dtype=np.float64) for k, v in data.get("per_sample", {}).items()},
            doc_ids={k: list(v) for k, v in data.get("doc_ids", {}).items()},
            counts=dict(data.get("counts", {})),
            seconds=float(data.get("seconds", 0.0)),
            error=data.get("error"),
        )
