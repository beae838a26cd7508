"""What an evaluation returns: the contract between evaluators, the ledger and the optimizers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EvalResult:
    """Scores of one candidate on one split.

    objectives: named scalar objectives (e.g. {"mean_acc": 0.71} or one per skill); the first
        one is the evaluator's primary objective.
    higher_is_better: direction of each objective (same keys as objectives).
    per_sample: per task, the score of every document, aligned with `doc_ids[task]`
        (M2N2 needs them; 0/1 correctness or a graded score).
    counts: per task, the number of documents scored.
    seconds: wall time of the evaluation (for a combined result: the sum over its parts).
    error: set when the candidate failed (exception, NaN, out of memory); the objectives are
        then the worst values and per_sample is empty.
    task_scores: per task, its aggregate score (lm-eval's aggregation of the per-sample scores).
    objective_weights: per objective, the weight of each task in it (objective = weighted mean
        of task scores). With `task_scores` this lets `combine` rebuild the objectives of a
        candidate that was scored in shards, without the evaluator at hand.
    """

    objectives: dict[str, float]
    higher_is_better: dict[str, bool]
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    doc_ids: dict[str, list] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    task_scores: dict[str, float] = field(default_factory=dict)
    objective_weights: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None or any(not math.isfinite(v) for v in self.objectives.values())

    @classmethod
    def failure(cls, error: str, higher_is_better: dict[str, bool], seconds: float = 0.0) -> EvalResult:
        """A failed candidate: every objective at its worst value."""
        worst = {name: (-math.inf if up else math.inf) for name, up in higher_is_better.items()}
        return cls(objectives=worst, higher_is_better=dict(higher_is_better), seconds=seconds, error=error)

    @classmethod
    def combine(cls, parts: Sequence[EvalResult]) -> EvalResult:
        """One result from the shards of one candidate (see `Evaluator.evaluate(shard=...)`).

        Parts must be given in shard order (0..n-1): per-sample vectors and doc ids are
        concatenated in that order, which is the order of an unsharded evaluation. Task scores
        are recomputed as the mean of the concatenated per-sample scores (evaluators only shard
        mean-aggregated metrics), objectives as the weighted means of `objective_weights`.
        A failed part makes the whole candidate failed, with every part's error.
        """
        if not parts:
            raise ValueError("EvalResult.combine needs at least one part")
        first = parts[0]
        seconds = float(sum(p.seconds for p in parts))
        if len(parts) == 1:
            return first
        errors = [p.error or "non-finite objective" for p in parts if p.failed]
        if errors:
            return cls.failure("; ".join(dict.fromkeys(errors)), first.higher_is_better, seconds)
        if not first.objective_weights:
            raise ValueError("EvalResult.combine needs objective_weights (set by every built-in evaluator)")
        per_sample: dict[str, np.ndarray] = {}
        doc_ids: dict[str, list] = {}
        for task in first.per_sample:
            per_sample[task] = np.concatenate([np.asarray(p.per_sample.get(task, []), dtype=np.float64) for p in parts])
            doc_ids[task] = [d for p in parts for d in p.doc_ids.get(task, [])]
        task_scores = {t: float(np.mean(v)) if len(v) else math.nan for t, v in per_sample.items()}
        objectives = weighted_objectives(first.objective_weights, task_scores)
        return cls(
            objectives=objectives,
            higher_is_better=dict(first.higher_is_better),
            per_sample=per_sample,
            doc_ids=doc_ids,
            counts={t: len(v) for t, v in per_sample.items()},
            seconds=seconds,
            task_scores=task_scores,
            objective_weights={k: dict(v) for k, v in first.objective_weights.items()},
        )

    def to_dict(self) -> dict:
        return {
            "objectives": self.objectives,
            "higher_is_better": self.higher_is_better,
            "per_sample": {k: np.asarray(v).tolist() for k, v in self.per_sample.items()},
            "doc_ids": self.doc_ids,
            "counts": self.counts,
            "seconds": self.seconds,
            "error": self.error,
            "task_scores": self.task_scores,
            "objective_weights": self.objective_weights,
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
            task_scores={k: float(v) for k, v in data.get("task_scores", {}).items()},
            objective_weights={k: dict(v) for k, v in data.get("objective_weights", {}).items()},
        )


def weighted_objectives(
    weights: dict[str, dict[str, float]], task_scores: dict[str, float], *, partial: bool = False
) -> dict[str, float]:
    """objective -> sum_t w_t * score_t / sum_t w_t (NaN when a task score is missing).

    partial: for one shard of a candidate, whose blocks may hold no document of some task:
    missing or NaN task scores are left out (0.0 when none is left). Such provisional
    objectives are replaced by `EvalResult.combine`.
    """
    out: dict[str, float] = {}
    for name, per_task in weights.items():
        if partial:
            per_task = {t: w for t, w in per_task.items() if math.isfinite(task_scores.get(t, math.nan))}
            if not per_task:
                out[name] = 0.0
                continue
        total = sum(per_task.values())
        if total <= 0 or any(t not in task_scores for t in per_task):
            out[name] = math.nan
            continue
        out[name] = float(sum(w * task_scores[t] for t, w in per_task.items()) / total)
    return out
