"""One stage of a run: its search space, evaluator and optimizer, the search, the holdout scoring
of its top-k, and its best model.

Stages run in order. A later stage refers to an earlier stage's best model as `stage:NAME`; it
is written to `<run>/stages/NAME/best_model` with the engine when a later stage needs it and
registered as a source. The best of a stage is chosen by search fitness (ties: the earlier
row) and reported with its holdout scores. M2N2 in model mode keeps its archive members under
`<run>/archive/<stage>/<id>` and registers each as `archive:<id>`.

A weights stage (a `weights` space: the genome is the raw parameters of the stage's first model,
the template) sends each candidate as raw tensors (`TensorsPayload`, `evomerge.run.weights`); `initial_models` in an M2N2 genome-mode stage's optimizer options
become its initial genomes (each model's parameters, encoded in the space's order).

The run's best (`run_best`): when every stage scores with the same evaluator spec their search
fitnesses compare, and the best over all stages wins (ties: the earlier stage); otherwise the
last stage with a result is taken, and the best says so (`selection`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluate import evaluator_class
from evomerge.fsutil import atomic_write_text
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.optim import OPTIMIZERS, make_optimizer
from evomerge.optim.base import Candidate, Optimizer
from evomerge.recipe import Recipe
from evomerge.run.jobs import Payload, WorkerPool
from evomerge.run.ledger import LONG_GENOME, Ledger, LedgerRow
from evomerge.run.scheduler import Evaluation, Scheduler


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
    space_kind: str  # the space's kind; with no space, the optimizer's name
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

    @property
    def raw_tensors(self) -> bool:
        """Whether the space decodes to raw tensors of the first model (`SearchSpace.RAW_TENSORS`)."""
        return self.space is not None and self.space.RAW_TENSORS


class RunArchive:
    """M2N2 model mode: a member entering the archive is materialized to disk and registered."""

    def __init__(self, root: Path, pool: SourcePool, workers: WorkerPool | None):
        self.root = root
        self.pool = pool
        self.workers = workers

    def persist(self, member_id: int, candidate: Candidate) -> None:
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


def make_stage_optimizer(plan: StagePlan, *, seed: int, run_dir: Path | None, pool: SourcePool, port: RunArchive | None) -> Optimizer:
    options = dict(plan.optimizer_options)
    if plan.budget_evaluations is not None:
        if options.get("max_evals") is not None:
            raise ConfigError("set the stage's budget.evaluations, not optimizer.max_evals", field=f"stages[{plan.index}].optimizer.max_evals")
        options["max_evals"] = plan.budget_evaluations
    if plan.budget_seconds is not None:
        options["max_seconds"] = plan.budget_seconds
    where = f"stages[{plan.index}]"
    optimizer = OPTIMIZERS.get(plan.optimizer_name, field=f"{where}.optimizer")
    if optimizer.NEEDS_PER_SAMPLE and evaluator_class(plan.evaluator_spec.get("kind")).PER_SAMPLE is False:
        raise ConfigError(
            f"optimizer '{plan.optimizer_name}' learns from per-sample scores; evaluator kind '{plan.evaluator_spec['kind']}' reports none",
            field=f"{where}.evaluator",
        )
    if run_dir is not None and optimizer.keeps_run_files(options):
        options.setdefault("run_dir", str(run_dir / "stages" / plan.name))
    if plan.raw_tensors and options.get("initial_models") is not None and optimizer.searches_space(options):
        from evomerge.run.weights import encode_model  # imports torch: only for raw tensors

        field = f"stages[{plan.index}].optimizer.initial_models"
        refs = options.pop("initial_models")
        if not isinstance(refs, list) or not refs:
            raise ConfigError("give a list of model references (their weights are the initial genomes)", field=field)
        if options.get("initial") is not None:
            raise ConfigError("give initial_models or initial, not both", field=field)
        try:
            options["initial"] = [encode_model(plan.space, pool.get(str(ref))) for ref in refs]
        except EvomergeError as exc:
            raise ConfigError(exc.message, file=exc.file, field=field) from None
    if plan.space is None:  # the optimizer's candidates carry recipes over the models (m2n2 model mode)
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


def decode_candidate(plan: StagePlan, cand: Candidate) -> Payload:
    if cand.recipe is not None:
        return cand.recipe
    if plan.raw_tensors:
        from evomerge.run.weights import weights_payload  # imports torch: only for raw tensors

        return weights_payload(plan.space, cand.genome, plan.models[0])
    recipe = plan.space.decode(cand.genome)
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"the {plan.space_kind} space decodes to {type(recipe).__name__}, not a merge recipe, and does not declare RAW_TENSORS",
            field=f"stages[{plan.index}].space",
        )
    return recipe


def row_payload(plan: StagePlan, row: LedgerRow) -> Payload | None:
    """What a ledger row scored, ready to evaluate again (a weights row: its tensors rebuilt from
    its genome, None when the ledger did not keep it)."""
    if plan.raw_tensors:
        from evomerge.run.weights import weights_payload  # imports torch: only for raw tensors

        return None if row.genome is None else weights_payload(plan.space, row.genome, plan.models[0])
    return Recipe.from_string(row.recipe_yaml)


def ranked_rows(ledger: Ledger, stage: str, k: int | None = None) -> list[LedgerRow]:
    """Successful search rows of a stage, best search fitness first, one per recipe (ties: the
    earlier row); at most `k`."""
    return ledger.top(stage, k)


def score_holdout(
    plan: StagePlan, scheduler: Scheduler, ledger: Ledger, fitness: Any
) -> list[LedgerRow]:
    """Score the stage's top-k recipes on the holdout split (reusing rows already in the ledger)
    and write their rows in rank order."""
    top = ranked_rows(ledger, plan.name, plan.holdout_top_k)
    todo: list[tuple[LedgerRow, Evaluation]] = []
    for row in top:
        if ledger.find(row.recipe_hash, "holdout", stage=plan.name) is not None:
            continue
        payload = row_payload(plan, row)
        if payload is None:
            continue
        key = f"{plan.name}|holdout||{row.recipe_hash}"
        todo.append((row, scheduler.evaluation(key, payload, "holdout", None, "")))
    scheduler.evaluate_all([ev for _, ev in todo])
    written = []
    for row, ev in todo:
        result = ev.result
        assert result is not None
        written.append(
            ledger.append(
                LedgerRow.from_result(
                    result,
                    None if result.failed else fitness(result),
                    stage=plan.name,
                    candidate_id=row.candidate_id,
                    generation=row.generation,
                    split="holdout",
                    genome=row.genome if row.genome is None or len(row.genome) <= LONG_GENOME else None,
                    recipe_hash=row.recipe_hash,
                    recipe_yaml=row.recipe_yaml,
                    worker=ev.worker,
                    started=ev.started,
                    finished=ev.finished,
                    meta={"doc_ids": result.doc_ids} if result.doc_ids else {},
                )
            )
        )
    return written


@dataclass(frozen=True)
class Best:
    """The best candidate of a stage (`stage_best`) or of the run (`run_best`): its ledger row's
    facts, its holdout scores when scored, its M2N2 lineage (ancestors first; empty when it has
    none or was not read); a run's best also names its stage's optimizer and why it was chosen
    (`selection`)."""

    stage: str
    candidate_id: int
    generation: int
    recipe_hash: str
    recipe_yaml: str
    score: float  # search fitness
    search: dict[str, float]  # search objectives
    holdout: dict[str, float] | None  # holdout objectives
    holdout_score: float | None  # holdout fitness
    seq: int
    genome: list[float] | None
    lineage: list[dict[str, Any]]
    optimizer: str | None = None
    selection: str | None = None

    def scores(self) -> dict[str, Any]:
        """What `best/scores.json` holds: everything but the recipe and the genome."""
        return {k: v for k, v in asdict(self).items() if k not in ("recipe_yaml", "genome")}


def stage_best(ledger: Ledger, stage: str, *, with_lineage: bool = True) -> Best | None:
    """The stage's best by search fitness, with its holdout scores when scored (and its M2N2
    lineage unless `with_lineage` is False: that reads every row's recipe)."""
    ranked = ranked_rows(ledger, stage, 1)
    if not ranked:
        return None
    row = ranked[0]
    holdout = ledger.find(row.recipe_hash, "holdout", stage=stage)
    scored = holdout is not None and holdout.ok
    return Best(
        stage=stage, candidate_id=row.candidate_id, generation=row.generation, recipe_hash=row.recipe_hash,
        recipe_yaml=row.recipe_yaml, score=row.fitness, search=row.objectives,
        holdout=holdout.objectives if scored else None,
        holdout_score=holdout.fitness if scored else None,
        seq=row.seq, genome=row.genome,
        lineage=lineage(ledger, stage, row) if with_lineage and row.meta.get("parents") else [],
    )  # fmt: skip


def same_objective(stages: list[Any]) -> bool:
    """Whether the stages (StageSpecs) score with the same evaluator spec, so that their search
    fitnesses compare."""
    specs = {json.dumps([s.evaluator, s.evaluator_overrides], sort_keys=True, default=str) for s in stages}
    return len(specs) <= 1


def run_best(stages: list[Any], ledger: Ledger, *, with_lineage: bool = True) -> Best | None:
    """The run's best so far over `stages` (StageSpecs, in order): see the module docstring.
    Its `selection` is a sentence saying how it was chosen."""
    found = [(s.name, replace(best, optimizer=_optimizer_text(s))) for s in stages if (best := stage_best(ledger, s.name, with_lineage=with_lineage)) is not None]
    if not found:
        return None
    if len(found) == 1:
        name, best = found[0]
        return replace(best, selection=f"the best search fitness of stage '{name}'" + (" (the only stage)" if len(stages) == 1 else " (the only stage with a result so far)"))
    names = ", ".join(f"'{n}'" for n, _ in found)
    if same_objective(stages):
        name, best = max(found, key=lambda item: item[1].score)  # max keeps the first on ties
        return replace(best, selection=f"the best search fitness over stages {names} (same evaluator), from stage '{name}'")
    name, best = found[-1]
    return replace(best, selection=f"the last stage's best (stage '{name}'): the stages' evaluators differ, so their search fitnesses do not compare")


def _optimizer_text(stage: Any) -> str:
    """"m2n2 (mode: genome, archive_size: 20, ...)" for a StageSpec (or what it has)."""
    optimizer = getattr(stage, "optimizer", None)
    if optimizer is None:
        return "?"
    options = ", ".join(f"{k}: {v}" for k, v in optimizer.options.items() if k != "initial")
    return f"{optimizer.name} ({options})" if options else str(optimizer.name)


def lineage(ledger: Ledger, stage: str, row: LedgerRow) -> list[dict[str, Any]]:
    """M2N2: the candidate and its ancestors (ancestors first), each with the recipe that built it
    from its parents (or the source model an initial member copies); a weights-space candidate's
    entry names its weights (`genome:<sha>`) and parents, there is no recipe to show. Reads only
    the ids, hashes, recipes and parents of the stage's rows."""
    from evomerge.run.weights import is_weights_recipe  # imports torch: only for an M2N2 lineage

    by_id = ledger.lineage_info(stage)
    order: list[int] = []
    seen: set[int] = set()
    stack = [(row.candidate_id, False)]
    while stack:  # depth-first, parents before children (no recursion limit on long lineages)
        cid, expanded = stack.pop()
        if expanded:
            order.append(cid)
            continue
        if cid in seen or cid not in by_id:
            continue
        seen.add(cid)
        stack.append((cid, True))
        stack.extend((int(p), False) for p in reversed(by_id[cid][2]))
    out = []
    for cid in order:
        digest, recipe_yaml, parents = by_id[cid]
        recipe = Recipe.from_string(recipe_yaml)
        entry: dict[str, Any] = {"candidate_id": cid, "recipe_hash": digest}
        if is_weights_recipe(recipe):
            entry.update(weights=recipe.model_refs()[0], parents=list(parents))
        else:
            entry.update(merge_method=recipe.merge_method, models=recipe.model_refs(), parents=list(parents), parameters=recipe.parameters)
        out.append(entry)
    return out


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True, default=str) + "\n")
