"""What a tracker is sent: a ledger row as metrics, an experiment as parameters.

Metric names are `STAGE/SPLIT/NAME` (a baseline's stage `baseline:NAME` reads `baseline/NAME`):
`fitness`, `best_fitness` (search rows: the stage's best search fitness so far), `objectives/X`,
`docs_scored` (documents evaluated for this row; 0 for one that reused scores), `seconds` (its wall time), `failed` (0/1),
`estimate` (1: the fitness is an estimate from fewer documents, `evomerge.fidelity`; such rows
never make the best) and `evaluations` (the stage's rows of that split so far). A failed row
logs no fitness or objectives (they are -inf). Names keep letters, digits and `_ - . / space`
(MLflow's rule); other characters become `_`. The step of every metric is the row's ledger seq, so a resumed run
carries on where it stopped.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_PARAM_CHARS = 500  # MLflow's limit on a parameter value in its older versions
_UNSAFE = re.compile(r"[^\w./ -]")


def metric_prefix(stage: str, split: str) -> str:
    return f"{stage.replace(':', '/')}/{split}"


def metric_name(name: str) -> str:
    return _UNSAFE.sub("_", name)


class RowMetrics:
    """Turns ledger rows into metrics, keeping each stage's best search fitness and row counts
    (started from the ledger's rows when a run is resumed)."""

    def __init__(self, best: dict[str, float] | None = None, counts: dict[str, dict[str, int]] | None = None) -> None:
        self.best = dict(best or {})
        self.counts = {stage: dict(splits) for stage, splits in (counts or {}).items()}

    def __call__(self, row: Any) -> dict[str, float]:
        prefix = metric_prefix(row.stage, row.split)
        splits = self.counts.setdefault(row.stage, {})
        splits[row.split] = splits.get(row.split, 0) + 1
        ok = row.status == "ok" and math.isfinite(row.fitness)
        estimate = bool(getattr(row, "estimate", False))
        out = {
            f"{prefix}/evaluations": float(splits[row.split]),
            f"{prefix}/docs_scored": float(row.documents_evaluated),
            f"{prefix}/seconds": float(max(0.0, row.finished - row.started)),
            f"{prefix}/failed": 0.0 if ok else 1.0,
            f"{prefix}/estimate": float(estimate),
        }
        if ok:
            out[f"{prefix}/fitness"] = float(row.fitness)
            out.update({f"{prefix}/objectives/{k}": float(v) for k, v in row.objectives.items() if math.isfinite(v)})
        if row.split == "search" and not row.stage.startswith("baseline:"):
            if ok and not estimate and row.fitness > self.best.get(row.stage, -math.inf):
                self.best[row.stage] = float(row.fitness)
            if row.stage in self.best:
                out[f"{prefix}/best_fitness"] = self.best[row.stage]
        return {metric_name(k): v for k, v in out.items()}


def experiment_params(exp: Any) -> dict[str, str]:
    """The run's settings as flat `key: text` pairs: name, seed, dtype, device, Ray workers and,
    per stage, `stages.NAME.FIELD...` (optimizer and options, budget, models, base, holdout_top_k,
    the search space and the evaluator as inlined in the frozen experiment). Values longer than
    `MAX_PARAM_CHARS` are cut."""
    data = exp.to_dict()
    params: dict[str, str] = {}
    for key in ("name", "seed", "dtype", "device"):
        params[key] = _text(data.get(key))
    params["ray.workers"] = _text(data["ray"]["workers"])
    params["models.base"] = _text(data["models"]["base"])
    params["models.sources"] = _text(data["models"]["sources"])
    for stage in data["stages"]:
        models = stage["models"] if stage["models"] is not None else data["models"]["sources"]
        stage = {**stage, "models": models}
        _flatten(f"stages.{stage.pop('name')}", stage, params)
    return params


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif not (isinstance(value, dict) and not value):
        out[prefix] = _text(value)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
