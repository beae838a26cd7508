"""One stage of a run: its search space, evaluator and optimizer, the search, the holdout scoring
of its top-k, and its best model.

Stages run in order. A later stage refers to an earlier stage's best model as `stage:NAME`; it
is written to `<run>/stages/NAME/best_model` with the engine when a later stage needs it and
registered as a source. The best of a stage is chosen by search fitness (ties: the earlier
row) and reported with its holdout scores. M2N2 in model mode keeps its archive members under
`<run>/archive/<stage>/<id>` and registers each as `archive:<id>`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.sources import SourcePool
from evomerge.optim import make_optimizer
from evomerge.optim.base import Candidate, Optimizer
from evomerge.recipe import Recipe
from evomerge.run.jobs import WorkerPool
from evomerge.run.ledger import Ledger, LedgerRow
from evomerge.run.scheduler import Evaluation, Scheduler

SHARDABLE_KINDS = ("lm_eval", "classification")


def evaluator_spec(ref: str | dict, overrides: dict | None = None) -> dict:
    """The resolved evaluator spec mapping (what workers build their evaluator from)."""
    from evomerge.evaluate.base import load_spec

    data, _ = load_spec(ref, overrides or None)
    return data


def build_evaluator(spec: dict) -> Any:
    from evomerge.evaluate import build_evaluator as build

    return build(dict(spec))


def directions_of(evaluator: Any) -> dict[str, bool]:
    """objective -> higher_is_better, the primary objective first."""
    getter = getattr(evaluator, "objective_directions", None)
    if callable(getter):
        return dict(getter())
    return dict(evaluator.higher_is_better)


def uses_subsamples(spec: Any) -> bool:
    """Whether the evaluator draws a document subset per generation (then a recipe's scores are
    only reusable within the same generation)."""
    if isinstance(spec, dict):
        return spec.get("subsample") is not None or any(uses_subsamples(v) for v in spec.values())
    if isinstance(spec, list):
        return any(uses_subsamples(v) for v in spec)
    return False


@dataclass
class StagePlan:
    """What a stage needs, built and checked before anything runs."""

    name: str
    index: int
    models: list[str]
    base: str | None
    space: Any | None  # SearchSpace; None for M2N2 model mode
    space_kind: str  # "ps" | "dfs" | "weights" | "m2n2"
    evaluator_spec: dict
    directions: dict[str, bool]
    optimizer_name: str
    optimizer_options: dict[str, Any]
    budget_evaluations: int | None
    budget_seconds: float | None
    holdout_top_k: int

    @property
    def budget(self) -> int | None:
        return self.budget_evaluations

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "space_kind": self.space_kind,
            "models": self.models,
            "base": self.base,
            "objectives": [{"name": k, "higher_is_better": v} for k, v in self.directions.items()],
            "optimizer": self.optimizer_name,
            "budget": {"evaluations": self.budget_evaluations, "seconds": self.budget_seconds},
        }


class ArchivePort:
    """M2N2 model mode: a member entering the archive is materialized to disk and registered."""

    def __init__(self, root: Path, pool: SourcePool, workers: WorkerPool | None):
        self.root = root
        self.pool = pool
        self.workers = workers

    def persist(self, member_id: int, candidate: Candidate) -> None:
        from evomerge.merge.writer import write_model

        out = self.root / str(member_id)
        if not (out / "config.json").is_file():  # written whole or not at all (writer renames)
            assert candidate.recipe is not None
            write_model(candidate.recipe, self.pool, out)
        self.register(member_id, out)

    def register(self, member_id: int, path: Path) -> None:
        ref = f"archive:{member_id}"
        self.pool.register(ref, path)
        if self.workers is not None:
            self.workers.add_source(ref, str(path))

    def register_existing(self) -> list[tuple[str, str]]:
        found = []
        if self.root.is_dir():
            for sub in sorted(self.root.iterdir()):
                if sub.name.isdigit() and (sub / "config.json").is_file():
                    self.pool.register(f"archive:{sub.name}", sub)
                    found.append((f"archive:{sub.name}", str(sub)))
        return found


def make_stage_optimizer(plan: StagePlan, *, seed: int, run_dir: Path | None, pool: SourcePool, port: ArchivePort | None) -> Optimizer:
    options = dict(plan.optimizer_options)
    if plan.budget_evaluations is not None:
        if options.get("max_evals") is not None:
            raise ConfigError("set the stage's budget.evaluations, not optimizer.max_evals", field=f"stages[{plan.index}].optimizer.max_evals")
        options["max_evals"] = plan.budget_evaluations
    if plan.budget_seconds is not None:
        options["max_seconds"] = plan.budget_seconds
    if plan.optimizer_name == "optuna" and options.get("storage") is None and run_dir is not None:
        options.setdefault("run_dir", str(run_dir / "stages" / plan.name))
    if plan.space is None:  # m2n2 model mode
        options.setdefault("initial_models", list(plan.models))
        if options.get("tensor_names") is None:
            options["tensor_names"] = pool.get(plan.models[0]).names
        options["archive_port"] = port
        dim, bounds, x0 = 1, None, None
    else:
        dim, bounds, x0 = plan.space.dim, plan.space.bounds, plan.space.x0
    try:
        return make_optimizer(plan.optimizer_name, dim=dim, bounds=bounds, x0=x0, seed=seed, objectives=plan.directions, **options)
    except EvomergeError as exc:
        field = exc.field or ""
        if not field.startswith("stages["):
            exc.field = f"stages[{plan.index}].optimizer" + (f".{field.removeprefix('optimizer.')}" if field and field != "optimizer" else "")
        raise


def decode_candidate(plan: StagePlan, cand: Candidate) -> Recipe:
    if cand.recipe is not None:
        return cand.recipe
    recipe = plan.space.decode(cand.genome)
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"the {plan.space_kind} space decodes to raw weights, not a merge recipe; run it with its own evaluator loop",
            field=f"stages[{plan.index}].space",
        )
    return recipe


def ranked_rows(ledger: Ledger, stage: str) -> list[LedgerRow]:
    """Successful search rows of a stage, best search fitness first, one per recipe (ties: the
    earlier row)."""
    rows = [r for r in ledger.rows(stage=stage, split="search") if r.ok and math.isfinite(r.fitness)]
    rows.sort(key=lambda r: (-r.fitness, r.seq))
    seen: set[str] = set()
    out = []
    for row in rows:
        if row.recipe_hash not in seen:
            seen.add(row.recipe_hash)
            out.append(row)
    return out


def score_holdout(
    plan: StagePlan, scheduler: Scheduler, ledger: Ledger, fitness: Any
) -> list[LedgerRow]:
    """Score the stage's top-k recipes on the holdout split (reusing rows already in the ledger)
    and write their rows in rank order."""
    top = ranked_rows(ledger, plan.name)[: plan.holdout_top_k]
    todo: list[tuple[LedgerRow, Evaluation]] = []
    for row in top:
        if ledger.find(row.recipe_hash, "holdout", stage=plan.name) is not None:
            continue
        recipe = Recipe.from_string(row.recipe_yaml)
        key = f"{plan.name}|holdout||{row.recipe_hash}"
        todo.append((row, scheduler.evaluation(key, recipe, "holdout", None, "")))
    scheduler.evaluate_all([ev for _, ev in todo])
    written = []
    for row, ev in todo:
        result = ev.result
        assert result is not None
        score = None if result.failed else fitness(result)
        written.append(
            ledger.append(
                LedgerRow(
                    seq=0,
                    stage=plan.name,
                    candidate_id=row.candidate_id,
                    generation=row.generation,
                    split="holdout",
                    genome=row.genome,
                    recipe_hash=row.recipe_hash,
                    recipe_yaml=row.recipe_yaml,
                    objectives={k: float(v) for k, v in result.objectives.items()},
                    higher_is_better=dict(result.higher_is_better),
                    fitness=-math.inf if score is None else float(score),
                    per_sample={} if result.failed else {k: [float(x) for x in v] for k, v in result.per_sample.items()},
                    worker=ev.worker,
                    started=ev.started,
                    finished=ev.finished,
                    status="failed" if result.failed else "ok",
                    error=(result.error or "non-finite objective") if result.failed else None,
                    meta={"doc_ids": result.doc_ids} if result.doc_ids else {},
                )
            )
        )
    return written


def stage_best(ledger: Ledger, stage: str) -> dict[str, Any] | None:
    """The stage's best by search fitness, with its holdout scores when scored."""
    ranked = ranked_rows(ledger, stage)
    if not ranked:
        return None
    row = ranked[0]
    holdout = ledger.find(row.recipe_hash, "holdout", stage=stage)
    return {
        "stage": stage,
        "candidate_id": row.candidate_id,
        "generation": row.generation,
        "recipe_hash": row.recipe_hash,
        "recipe_yaml": row.recipe_yaml,
        "score": row.fitness,
        "search": row.objectives,
        "holdout": holdout.objectives if holdout is not None and holdout.ok else None,
        "holdout_score": holdout.fitness if holdout is not None and holdout.ok else None,
        "seq": row.seq,
        "lineage": lineage(ledger, stage, row) if row.meta.get("parents") else [],
    }


def lineage(ledger: Ledger, stage: str, row: LedgerRow) -> list[dict[str, Any]]:
    """M2N2 model mode: the candidate and its ancestors (ancestors first), each with the recipe
    that built it from its parents (or the source model an initial member copies)."""
    by_id = {r.candidate_id: r for r in ledger.rows(stage=stage, split="search") if r.ok}
    order: list[LedgerRow] = []
    seen: set[int] = set()

    def visit(r: LedgerRow) -> None:
        if r.candidate_id in seen:
            return
        seen.add(r.candidate_id)
        for parent in r.meta.get("parents", []):
            if int(parent) in by_id:
                visit(by_id[int(parent)])
        order.append(r)

    visit(row)
    out = []
    for r in order:
        recipe = Recipe.from_string(r.recipe_yaml)
        out.append(
            {
                "candidate_id": r.candidate_id,
                "recipe_hash": r.recipe_hash,
                "merge_method": recipe.merge_method,
                "models": recipe.model_refs(),
                "parents": list(r.meta.get("parents", [])),
                "parameters": recipe.parameters,
            }
        )
    return out


def write_json(path: Path, data: Any) -> None:
    from evomerge.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True, default=str) + "\n")
