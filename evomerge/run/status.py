"""What a run directory says about itself: `run_status(run_dir) -> dict` (and `evomerge status`).

Read-only: works while the run is going (the ledger is WAL), after it was killed, and after
it finished. Keys::

    run, dir, stage (current, or the last one when finished), evaluations (search rows),
    budget (sum of the stages' evaluation budgets, None if one has only a time budget),
    best {stage, score, holdout, recipe_hash, candidate_id, objectives, holdout_objectives},
    failures, finished, stop_reasons, throughput (search evaluations per second of wall time
    between the first and the last row), elapsed_seconds,
    stages: [{name, space_kind, evaluations, budget, best{...}, objectives [{name,
    higher_is_better}], failures, finished, stop_reason}],
    baselines: [{name, search, holdout, recipe_hash}], sources: [{ref, path}]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.run.checkpoint import load_checkpoint
from evomerge.run.driver import LEDGER_FILE, is_run_dir, read_experiment
from evomerge.run.ledger import BASELINE_PREFIX, Ledger
from evomerge.run.stages import stage_best


def _space_kind(stage: Any) -> str:
    if stage.space is None:
        return "m2n2"
    if isinstance(stage.space, dict):
        return str(stage.space.get("kind", "?"))
    try:
        from evomerge.spaces.config import load_space_spec

        spec, _ = load_space_spec(stage.space, stage.space_overrides or None)
        return spec.kind
    except Exception:
        return "?"


def _best(best: dict[str, Any] | None) -> dict[str, Any]:
    if best is None:
        return {"stage": None, "score": None, "holdout": None, "recipe_hash": None, "candidate_id": None}
    return {
        "stage": best["stage"],
        "score": best["score"],
        "holdout": best["holdout_score"],
        "recipe_hash": best["recipe_hash"],
        "candidate_id": best["candidate_id"],
        "objectives": best["search"],
        "holdout_objectives": best["holdout"],
    }


def run_status(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError("not a run directory (it needs experiment.yaml and ledger.sqlite)", file=str(run_dir))
    exp = read_experiment(run_dir)
    ckpt = load_checkpoint(run_dir) or {}
    done = set(ckpt.get("stages_done", []))
    finished = bool(ckpt.get("finished"))
    with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
        stages = []
        for spec in exp.stages:
            rows = ledger.rows(stage=spec.name, split="search")
            first = rows[0].started if rows else None
            directions = rows[0].higher_is_better if rows else {}
            stages.append(
                {
                    "name": spec.name,
                    "space_kind": _space_kind(spec),
                    "optimizer": spec.optimizer.name,
                    "evaluations": len(rows),
                    "budget": spec.budget.evaluations,
                    "budget_seconds": spec.budget.seconds,
                    "best": _best(stage_best(ledger, spec.name)),
                    "objectives": [{"name": k, "higher_is_better": v} for k, v in directions.items()],
                    "failures": sum(1 for r in rows if not r.ok),
                    "started": first,
                    "finished": spec.name in done,
                    "stop_reason": ckpt.get("stop_reasons", {}).get(spec.name),
                }
            )
        search_rows = [r for s in exp.stages for r in ledger.rows(stage=s.name, split="search")]
        baselines: dict[str, dict[str, Any]] = {}
        for row in ledger.baselines():
            entry = baselines.setdefault(row.stage[len(BASELINE_PREFIX):], {"recipe_hash": row.recipe_hash, "search": None, "holdout": None})
            entry[row.split] = row.objectives if row.ok else {"error": row.error}
    current = next((s for s in stages if not s["finished"]), stages[-1])
    if not finished:
        current = next((s for s in stages if s["name"] == ckpt.get("stage")), current)
    best_stage = next((s for s in reversed(stages) if s["best"]["score"] is not None), None)
    budgets = [s["budget"] for s in stages]
    elapsed = (max(r.finished for r in search_rows) - min(r.started for r in search_rows)) if search_rows else 0.0
    sources = [{"ref": ref} for ref in dict.fromkeys([*([exp.models.base] if exp.models.base else []), *exp.models.sources])]
    for stage in exp.stages:
        path = run_dir / "stages" / stage.name / "best_model"
        if path.is_dir():
            sources.append({"ref": f"stage:{stage.name}", "path": str(path)})
    return {
        "run": exp.name,
        "dir": str(run_dir),
        "seed": exp.seed,
        "base": exp.models.base,
        "stage": current["name"],
        "evaluations": len(search_rows),
        "budget": None if any(b is None for b in budgets) else sum(budgets),
        "best": best_stage["best"] if best_stage else _best(None),
        "failures": sum(1 for r in search_rows if not r.ok),
        "last_error": next((r.error for r in reversed(search_rows) if not r.ok), None),
        "finished": finished,
        "stop_reasons": ckpt.get("stop_reasons", {}),
        "throughput": (len(search_rows) / elapsed) if elapsed > 0 else None,
        "elapsed_seconds": elapsed,
        "stages": stages,
        "baselines": [{"name": k, **v} for k, v in baselines.items()],
        "sources": sources,
    }


def format_status(status: dict[str, Any]) -> str:
    """The human-readable `evomerge status` text."""

    def score(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    state = "finished" if status["finished"] else "not finished"
    lines = [f"run {status['run']} ({status['dir']}): {state}, stage {status['stage']}"]
    budget = status["budget"] if status["budget"] is not None else "-"
    rate = f", {status['throughput']:.2f} evals/s" if status["throughput"] else ""
    lines.append(f"evaluations {status['evaluations']}/{budget}, failures {status['failures']}{rate}")
    best = status["best"]
    lines.append(f"best: search {score(best['score'])}, holdout {score(best['holdout'])}, recipe {best['recipe_hash'] or '-'}")
    for s in status["stages"]:
        flag = "done" if s["finished"] else ("running" if s["name"] == status["stage"] and not status["finished"] else "waiting")
        lines.append(
            f"  {s['name']:<10} {s['space_kind']:<7} {s['evaluations']}/{s['budget'] if s['budget'] is not None else '-'} "
            f"best {score(s['best']['score'])} holdout {score(s['best']['holdout'])} [{flag}]"
        )
    def objectives(values: dict | None) -> str:
        if not values:
            return "-"
        if "error" in values:
            return f"failed ({values['error']})"
        return " ".join(f"{k} {v:.4f}" for k, v in values.items())

    for b in status["baselines"]:
        lines.append(f"  baseline {b['name']}: search {objectives(b['search'])}; holdout {objectives(b['holdout'])}")
    if status["failures"] and status["last_error"]:
        lines.append(f"last error: {status['last_error']}")
    return "\n".join(lines)
