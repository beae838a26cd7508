"""What a run directory says about itself: `run_status(run_dir) -> dict` (and `evomerge status`).

Read-only: works while the run is going (the ledger is WAL), after it was killed, and after
it finished. A damaged run directory (experiment, checkpoint or ledger unreadable, or a ledger
that lost rows its checkpoint counts) is refused with one line (`check_run_dir`). Keys::

    run, dir, stage (current, or the last one when finished), evaluations (search rows),
    budget (sum of the stages' evaluation budgets, None if one has only a time budget),
    best {stage, score, holdout, recipe_hash, candidate_id, objectives, holdout_objectives,
    selection} (the run's best: over all stages by search fitness when they share the evaluator,
    else the last stage's; `selection` says which rule applied, see `run_best`),
    failures, finished, state ("running": a driver holds the run's lock, its `pid`; "stopped":
    none does and the run is not finished, `evomerge resume DIR` carries it on; "finished"),
    pid, stop_reasons, throughput (search evaluations per second of wall time between the first
    and the last row), elapsed_seconds,
    stages: [{name, space_kind, evaluations, budget, best{...}, objectives [{name,
    higher_is_better}], failures, finished, stop_reason, fidelity (the strategy's name),
    documents (evaluated vs a full-fidelity run, estimates and their error where the full score
    is known: `evomerge.fidelity.figures`)}], documents (the stages' evaluated and full summed,
    and their ratio),
    baselines: [{name, search, holdout, recipe_hash}], sources: [{ref, path}],
    memory (memory.json: the `memory:` budget and what the node and each worker hold, see
    `evomerge.memory`; None before a pool started)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.fidelity import split_spec
from evomerge.fidelity.figures import documents_line, run_documents, stage_documents
from evomerge.memory import memory_lines, read_memory_report
from evomerge.run.integrity import check_run_dir
from evomerge.run.ledger import BASELINE_PREFIX, Ledger
from evomerge.run.rundir import RunDir, lock_holder
from evomerge.run.stages import Best, run_best, stage_best
from evomerge.spaces.config import space_kind_of


def _space_kind(stage: Any) -> str:
    if stage.space is None:  # the optimizer's candidates carry recipes (m2n2 model mode)
        return stage.optimizer.name
    return space_kind_of(stage.space, stage.space_overrides) or "?"


def _best(best: Best | None) -> dict[str, Any]:
    if best is None:
        return {"stage": None, "score": None, "holdout": None, "recipe_hash": None, "candidate_id": None}
    return {
        "stage": best.stage,
        "score": best.score,
        "holdout": best.holdout_score,
        "recipe_hash": best.recipe_hash,
        "candidate_id": best.candidate_id,
        "objectives": best.search,
        "holdout_objectives": best.holdout,
        **({"selection": best.selection} if best.selection else {}),
    }


def run_status(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    exp, ckpt = check_run_dir(run_dir)
    ckpt = ckpt or {}
    done = set(ckpt.get("stages_done", []))
    pid = lock_holder(run_dir)
    finished = bool(ckpt.get("finished")) and pid is None
    with Ledger.open(RunDir(run_dir).ledger, readonly=True) as ledger:
        stages = []
        summaries = {spec.name: ledger.summary(spec.name) for spec in exp.stages}
        for spec in exp.stages:
            summary = summaries[spec.name]
            first = summary["started"]
            directions = summary["higher_is_better"]
            stages.append(
                {
                    "name": spec.name,
                    "space_kind": _space_kind(spec),
                    "optimizer": spec.optimizer.name,
                    "evaluations": summary["rows"],
                    "budget": spec.budget.evaluations,
                    "budget_seconds": spec.budget.seconds,
                    "best": _best(stage_best(ledger, spec.name, with_lineage=False)),
                    "objectives": [{"name": k, "higher_is_better": v} for k, v in directions.items()],
                    "failures": summary["failures"],
                    "started": first,
                    "finished": spec.name in done,
                    "stop_reason": ckpt.get("stop_reasons", {}).get(spec.name),
                    "fidelity": split_spec(spec.fidelity)[0],
                    "documents": stage_documents(ledger, spec.name),
                }
            )
        overall = run_best(exp.stages, ledger, with_lineage=False)
        baselines: dict[str, dict[str, Any]] = {}
        for row in ledger.baselines():
            entry = baselines.setdefault(row.stage[len(BASELINE_PREFIX):], {"recipe_hash": row.recipe_hash, "search": None, "holdout": None})
            entry[row.split] = row.objectives if row.ok else {"error": row.error}
    current = next((s for s in stages if not s["finished"]), stages[-1])
    if not finished:
        current = next((s for s in stages if s["name"] == ckpt.get("stage")), current)
    budgets = [s["budget"] for s in stages]
    with_rows = [s for s in summaries.values() if s["rows"]]
    elapsed = (max(s["finished"] for s in with_rows) - min(s["started"] for s in with_rows)) if with_rows else 0.0
    evaluations = sum(s["rows"] for s in with_rows)
    errors = [s for s in with_rows if s["last_error_seq"] is not None]
    last_error = max(errors, key=lambda s: s["last_error_seq"])["last_error"] if errors else None
    sources = [{"ref": ref} for ref in dict.fromkeys([*([exp.models.base] if exp.models.base else []), *exp.models.sources])]
    for stage in exp.stages:
        path = RunDir(run_dir).stage_model(stage.name)
        if path.is_dir():
            sources.append({"ref": f"stage:{stage.name}", "path": str(path)})
    return {
        "run": exp.name,
        "dir": str(run_dir),
        "seed": exp.seed,
        "base": exp.models.base,
        "stage": current["name"],
        "evaluations": evaluations,
        "budget": None if any(b is None for b in budgets) else sum(budgets),
        "best": _best(overall),
        "failures": sum(s["failures"] for s in with_rows),
        "last_error": last_error,
        "finished": finished,
        "state": "running" if pid is not None else ("finished" if finished else "stopped"),
        "pid": pid or None,
        "stop_reasons": ckpt.get("stop_reasons", {}),
        "throughput": (evaluations / elapsed) if elapsed > 0 else None,
        "elapsed_seconds": elapsed,
        "stages": stages,
        "documents": run_documents([s["documents"] for s in stages]),
        "baselines": [{"name": k, **v} for k, v in baselines.items()],
        "sources": sources,
        "memory": read_memory_report(run_dir),
    }


def format_status(status: dict[str, Any]) -> str:
    """The human-readable `evomerge status` text."""

    def score(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    state = status.get("state", "finished" if status["finished"] else "stopped")
    if state == "running":
        state = f"running (pid {status.get('pid') or '?'})"
    elif state == "stopped":
        state = f"stopped: resume with `evomerge resume {status['dir']}`"
    lines = [f"run {status['run']} ({status['dir']}): {state}; stage {status['stage']}"]
    budget = status["budget"] if status["budget"] is not None else "-"
    rate = f", {status['throughput']:.2f} evals/s" if status["throughput"] else ""
    lines.append(f"evaluations {status['evaluations']}/{budget}, failures {status['failures']}{rate}")
    best = status["best"]
    origin = f" (stage {best['stage']}, candidate {best['candidate_id']})" if best.get("stage") else ""
    lines.append(f"best: search {score(best['score'])}, holdout {score(best['holdout'])}, recipe {best['recipe_hash'] or '-'}{origin}")
    if best.get("selection"):
        lines.append(f"  chosen as {best['selection']}")
    for s in status["stages"]:
        live = status.get("state", "running") == "running"
        flag = "done" if s["finished"] else (("running" if live else "stopped") if s["name"] == status["stage"] and not status["finished"] else "waiting")
        lines.append(
            f"  {s['name']:<10} {s['space_kind']:<7} {s['evaluations']}/{s['budget'] if s['budget'] is not None else '-'} "
            f"best {score(s['best']['score'])} holdout {score(s['best']['holdout'])} [{flag}]"
        )
        documents = documents_line(f"fidelity {s.get('fidelity', 'full')}:", s.get("documents"))
        if documents:
            lines.append(documents)
    def objectives(values: dict | None) -> str:
        if not values:
            return "-"
        if "error" in values:
            return f"failed ({values['error']})"
        return " ".join(f"{k} {v:.4f}" for k, v in values.items())

    for b in status["baselines"]:
        lines.append(f"  baseline {b['name']}: search {objectives(b['search'])}; holdout {objectives(b['holdout'])}")
    lines += memory_lines(status.get("memory"))
    if status["failures"] and status["last_error"]:
        lines.append(f"last error: {status['last_error']}")
    return "\n".join(lines)
