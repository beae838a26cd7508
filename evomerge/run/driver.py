"""A run from start to end: validate, freeze the experiment, run the stages, write the best.

`start_run` checks everything first (sources exist, every stage's evaluator builds, its search
space builds and its starting point decodes into a recipe the engine can plan against the
sources, the optimizer accepts its options, baselines plan) and only then creates the run
directory. `resume_run` picks a run up from its last checkpoint, whatever stopped it.

Stage seeds: stage i's optimizer is seeded with `seed + i`, so two stages never draw the same
numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.config import (
    Experiment,
    StageSpec,
    check_experiment,
    load_experiment,
    read_experiment,
    resolve_experiment,
)
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluate import build_evaluator, evaluator_class
from evomerge.evaluate.base import evaluator_directions
from evomerge.evaluate.registry import resolve_spec
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset
from evomerge.faults import os_fault
from evomerge.fidelity.stage import check_stage_fidelity, make_runner, rescore_estimates
from evomerge.fsutil import atomic_write_text
from evomerge.memory import MemoryBudget, record_memory, refresh_memory, run_memory
from evomerge.merge.sources import SourcePool
from evomerge.models import registered_model
from evomerge.optim import OPTIMIZERS
from evomerge.progress import Progress
from evomerge.recipe import Recipe
from evomerge.resources import find_yaml
from evomerge.run.card import record_references, written_references
from evomerge.run.checkpoint import CheckpointPacer, load_checkpoint, save_checkpoint
from evomerge.run.export import run_files, write_best, write_best_model
from evomerge.run.integrity import check_ledger, find_gap
from evomerge.run.jobs import WorkerPool
from evomerge.run.ledger import BASELINE_PREFIX, Ledger, LedgerRow
from evomerge.run.resume import log_changes, reopened_checkpoint, resume_changes
from evomerge.run.rundir import (
    EXPERIMENT_FILE,
    LEDGER_FILE,
    RunDir,
    acquire_lock,
    lock_holder,
    require_run_dir,
)
from evomerge.run.scheduler import RunStopped, Scheduler
from evomerge.run.stages import (
    Best,
    RunArchive,
    StagePlan,
    decode_candidate,
    make_stage_optimizer,
    row_payload,
    run_best,
    score_holdout,
    stage_best,
    uses_subsamples,
)
from evomerge.spaces import build_space
from evomerge.tracking import open_tracking
from evomerge.usercode import worker_evaluator


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; it goes on from its last checkpoint with `evomerge resume DIR`."""

    def __init__(self, run_dir: str | Path):
        super().__init__(f"interrupted (Ctrl-C); the run goes on from its last checkpoint with `evomerge resume {run_dir}`")
        self.run_dir = Path(run_dir)


class Run:
    """A run directory and everything needed to carry it on."""

    def __init__(self, run_dir: Path, exp: Experiment, *, file: str | None = None, local: bool = False, echo: Callable[[str], None] = print, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.exp = exp
        self.file = file
        self.local = local or exp.ray.workers == 0
        self.echo = echo
        self.show_progress = progress
        self.sources = SourcePool(allow_pickle=exp.allow_pickle)
        self._evaluators: dict[str, tuple[dict, Any, dict[str, bool]]] = {}
        self._pool: WorkerPool | None = None
        self._pool_key: str | None = None
        self._pool_sources: dict[str, str] = {}
        self._rebuild_caps: dict[str, int] = {}  # finished stages being rebuilt: search rows to replay
        self._rebuild_reasons: dict[str, str] = {}
        self.memory: MemoryBudget | None = None  # the `memory:` budget, resolved by validate()

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> list[StagePlan]:
        """Build every stage's plan against the sources; raise a one-line ConfigError otherwise.
        What needs no model or dataset is checked first (`check_experiment`: optimizer options,
        space specs, baseline recipes, evaluator schemas), in a second, before a zoo is built or
        a source or dataset is loaded."""
        exp = self.exp
        check_experiment(exp, file=self.file)
        refs = [("models.base", exp.models.base)] if exp.models.base else []
        refs += [(f"models.sources[{i}]", r) for i, r in enumerate(exp.models.sources)]
        for i, stage in enumerate(exp.stages):
            refs += [(f"stages[{i}].models[{j}]", r) for j, r in enumerate(stage.models or [])]
            if stage.base:
                refs.append((f"stages[{i}].base", stage.base))
        from evomerge.zoo import PRESETS, build_zoo, list_zoo_models  # only when a run uses the zoo

        zoo_refs = [ref[len("zoo:"):].partition("/") for _, ref in refs if ref.startswith("zoo:")]
        # A first build takes minutes: say what is going on (a bad name fails below, unbuilt).
        if all(p in PRESETS and name in list_zoo_models(p) for p, _, name in zoo_refs):
            for preset in dict.fromkeys(p for p, _, _ in zoo_refs):
                build_zoo(preset, progress=self.echo)
        for field, ref in refs:
            if ref.startswith(("stage:", "archive:")):
                continue
            try:
                self.sources.get(ref)  # opened: a missing or damaged model is refused here, by its field
            except EvomergeError as exc:
                raise ConfigError(exc.message, file=self.file, field=field) from None
        # stage:NAME stands for the reference model of stage NAME until that stage has run.
        check_pool = SourcePool(allow_pickle=exp.allow_pickle, aliases=self.sources.aliases)
        plans = []
        for i, stage in enumerate(exp.stages):
            plan = self.plan(i, check_pool, checking=True)
            reference = plan.base or plan.models[0]
            check_pool.register(f"stage:{stage.name}", check_pool.resolve(reference))
            plans.append(plan)
        for i in range(len(exp.baselines)):
            recipe = self._baseline_recipe(i)
            self._check_recipe(recipe, check_pool, f"baselines[{i}].recipe")
        opened = [ref for _, ref in refs if not ref.startswith(("stage:", "archive:"))]
        self.memory = run_memory(exp, self.sources, opened, local=self.local, file=self.file)
        return plans

    def plan(self, index: int, pool: SourcePool, *, checking: bool = False) -> StagePlan:
        exp = self.exp
        stage: StageSpec = exp.stages[index]
        where = f"stages[{index}]"
        models, base = exp.stage_models(stage), exp.stage_base(stage)
        spec, evaluator, directions = self._evaluator(stage, where)
        check_stage_fidelity(stage.fidelity, type(evaluator), file=self.file, where=where)
        space, kind = None, stage.optimizer.name  # no space: the optimizer's candidates carry recipes
        if stage.space is not None:
            try:
                space = build_space(stage.space, models=models, base=base, pool=pool, overrides=stage.space_overrides or None)
            except EvomergeError as exc:
                raise ConfigError(exc.message, file=self.file, field=f"{where}.space" + (f".{exc.field}" if exc.field else "")) from None
            kind = space.kind
        plan = StagePlan(
            name=stage.name, index=index, models=models, base=base, space=space, space_kind=kind,
            evaluator_spec=spec, directions=directions,
            optimizer_name=stage.optimizer.name, optimizer_options=stage.optimizer.options,
            budget_evaluations=stage.budget.evaluations, budget_seconds=stage.budget.seconds,
            holdout_top_k=stage.holdout_top_k,
        )  # fmt: skip
        if checking:
            port = RunArchive(RunDir(self.run_dir).archive(stage.name), pool, None)
            try:
                make_stage_optimizer(plan, seed=exp.seed + index, run_dir=None, pool=pool, port=port)
            except EvomergeError as exc:
                raise exc.located(file=self.file) from None
            if plan.raw_tensors:
                self._check_template(models[0], pool, f"{where}.space")
            elif space is not None:
                self._check_recipe(space.decode(space.x0), pool, f"{where}.space")
        return plan

    def _evaluator(self, stage: StageSpec, where: str) -> tuple[dict, Any, dict[str, bool]]:
        key = json.dumps([stage.evaluator, stage.evaluator_overrides], sort_keys=True, default=str)
        if key not in self._evaluators:
            try:
                spec = resolve_spec(stage.evaluator, stage.evaluator_overrides)
                evaluator = build_evaluator(spec)
                directions = evaluator_directions(evaluator)
            except EvomergeError as exc:
                field = f"{where}.evaluator" + (f".{exc.field}" if exc.field else "")
                raise ConfigError(exc.message, file=exc.file or self.file, field=field) from None
            if not directions:
                raise ConfigError("the evaluator declares no objectives", file=self.file, field=f"{where}.evaluator")
            self._evaluators[key] = (spec, evaluator, directions)
        return self._evaluators[key]

    def _check_recipe(self, recipe: Recipe, pool: SourcePool, field: str) -> None:
        from evomerge.merge.engine import plan_merge  # imports torch: only when a recipe is checked

        try:
            plan_merge(recipe, pool)
        except EvomergeError as exc:
            raise ConfigError(f"the recipe does not fit its models: {exc.message}", file=self.file, field=field) from None

    def _check_template(self, ref: str, pool: SourcePool, field: str) -> None:
        """A raw-tensors space's template must be a model the workers can build: a Hugging Face
        config or a registered model kind (`evomerge.models`)."""
        config = pool.get(ref).config
        if config.get("model_type") is None:
            try:
                model = registered_model(config)
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"the template '{ref}' cannot be built: {exc}", file=self.file, field=field) from None
            if model is None:
                raise ConfigError(f"the template '{ref}' has no model_type or architecture in its config.json", file=self.file, field=field)

    def _baseline_recipe(self, index: int) -> Recipe:
        baseline = self.exp.baselines[index]
        field = f"baselines[{index}].recipe"
        try:
            if isinstance(baseline.recipe, dict):
                return Recipe.parse(baseline.recipe, file=self.file)
            return Recipe.from_yaml(baseline.recipe)
        except EvomergeError as exc:
            raise exc.located(file=self.file, field=field) from None

    # ---- execution ----------------------------------------------------------------------
    def execute(self, *, rebuild: bool = False) -> Best | None:
        """Run (or carry on) every stage; returns the run's best (see `stage_best`). `rebuild`:
        first re-create the rows the ledger lost (see `rebuild_state`). Ctrl-C raises
        RunInterrupted, a file fault (disk full, permissions) one line naming the file; both say
        how the run goes on."""
        lock = self._lock()
        try:
            return self._execute(rebuild)
        except KeyboardInterrupt:
            raise RunInterrupted(self.run_dir) from None
        except OSError as exc:
            raise os_fault(exc, resume=self.run_dir) from None
        finally:
            lock.close()

    def _lock(self) -> Any:
        """Hold the run's lock while it executes (`evomerge.run.rundir.acquire_lock`)."""
        return acquire_lock(self.run_dir)

    def _execute(self, rebuild: bool = False) -> Best | None:
        ckpt = self._readable_checkpoint() if rebuild else load_checkpoint(self.run_dir)
        ledger = Ledger.open(self.run_dir / LEDGER_FILE)
        tracking = open_tracking(self.exp, self.run_dir, ledger)  # fed by the ledger, on a thread of its own
        try:
            ckpt = self.rebuild_state(ledger, ckpt) if rebuild else (ckpt or {})
            state = {
                "stages_done": list(ckpt.get("stages_done", [])),
                "stop_reasons": dict(ckpt.get("stop_reasons", {})),
                "started": ckpt.get("started", time.time()),
                "stage_bests": dict(ckpt.get("stage_bests", {})),
            }
            if ckpt.get("final_optimizer"):  # the last stage ended before a kill: keep it reopenable
                state["final_optimizer"] = ckpt["final_optimizer"]
            self._register_stage_models()
            for index, stage in enumerate(self.exp.stages):
                if stage.name in state["stages_done"]:
                    continue
                self._run_stage(index, ledger, ckpt if ckpt.get("stage") == stage.name else {}, state)
                ckpt = {}
            best = run_best(self.exp.stages, ledger)
            if best is not None:
                write_best(self.run_dir, best, self.sources)
            tracking.finish(run_files(self.run_dir, best))
            self._save(ledger, {**state, "stage": None, "finished": True, "ledger_seq": ledger.last_seq()})
            return best
        finally:
            tracking.close()
            ledger.close()
            self.shutdown()

    def _save(self, ledger: Ledger, state: dict[str, Any]) -> None:
        """A checkpoint, after the ledger rows it counts are on disk (and in the ledger's main
        file); it records the ledger's rows per stage and split (`evomerge.run.integrity`)."""
        ledger.sync()
        save_checkpoint(self.run_dir, {**state, "ledger_rows": ledger.counts()})
        refresh_memory(self.run_dir, self.memory, self._pool)  # memory.json live (at most every 30 s, off this thread)

    # ---- rebuild ------------------------------------------------------------------------
    def _readable_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint, or None when it cannot be read (a rebuild then starts from the ledger)."""
        try:
            return load_checkpoint(self.run_dir)
        except EvomergeError as exc:
            self.echo(f"the checkpoint cannot be read ({exc.message.split(';')[0]}); rebuilding the run's state from its ledger alone")
            return None

    def rebuild_state(self, ledger: Ledger, ckpt: dict[str, Any] | None) -> dict[str, Any]:
        """`evomerge resume RUN --rebuild`: the checkpoint to go on from after the ledger lost rows.

        The rule: the run starts again at the first stage that lost rows (the checkpoint counts
        more of its rows than the ledger holds, or a gap in the seqs follows one of its rows;
        baseline rows belong to the first stage). That stage and every later one restart their
        optimizer from its seed (seed + stage index) and every row that survived is told again
        from the ledger, matched by candidate id (and recipe hash), so only candidates whose rows
        are missing are evaluated; new rows take the missing seqs in order (`Ledger.fill_gaps`).
        Asks, tells and evaluations being deterministic, the rebuilt ledger has the same rows
        (seqs, recipes, fitness) as the run that lost none. Stages before it keep their rows and
        stay finished. A later stage keeps its surviving rows only while they stay valid: when a
        stage it builds on (`stage:NAME`) ends the rebuild with another best than it had (the
        checkpoint records each finished stage's best), the rebuild stops with one line, since
        those rows were scored on another model. A finished stage with a time budget is capped at
        the search rows the checkpoint counts (replayed tells take no time) and keeps its stop
        reason; an unfinished one's time budget starts again. A checkpoint that cannot be read is
        ignored: every stage is rebuilt from the ledger (lost rows at its end cannot be seen then;
        they are evaluated again, as after a kill -9).
        """
        names = [s.name for s in self.exp.stages]
        gap = find_gap(ledger, ckpt)
        if ckpt is not None and gap is None:
            self.echo("the ledger holds every row the checkpoint counts; nothing to rebuild")
            return ckpt
        ckpt = ckpt or {}
        first = gap.first_stage(names) if gap is not None and ckpt else 0
        ledger.fill_gaps()
        done = [name for name in ckpt.get("stages_done", []) if name in names[:first]]
        counted = ckpt.get("ledger_rows") or {}
        counts = ledger.counts()
        self._rebuild_caps = {
            name: int(counted.get(name, {}).get("search", counts.get(name, {}).get("search", 0)))
            for name in ckpt.get("stages_done", [])
            if name in names[first:]
        }
        self._rebuild_reasons = dict(ckpt.get("stop_reasons", {}))
        missing = f"{gap.missing} missing row(s): {gap.describe()}" if gap is not None else "no checkpoint to compare with"
        self.echo(
            f"rebuilding from stage '{names[first]}' ({missing}): its optimizer restarts from its seed, surviving rows "
            "are told again from the ledger, only candidates whose rows are missing are evaluated"
        )
        return {
            "stages_done": done,
            "stop_reasons": {name: reason for name, reason in ckpt.get("stop_reasons", {}).items() if name in done},
            "started": ckpt.get("started", time.time()),
            "stage_bests": dict(ckpt.get("stage_bests", {})),
        }

    def _check_later_rows(self, index: int, ledger: Ledger, was: str, now: str | None) -> None:
        """A rebuilt stage ended with another best than before: rows of later stages built on it
        (`stage:NAME`) were scored on another model and cannot be kept."""
        name = self.exp.stages[index].name
        for later in self.exp.stages[index + 1 :]:
            if f"stage:{name}" in self._refs(later) and ledger.count(stage=later.name):
                raise ConfigError(
                    f"the rebuilt stage '{name}' ended with another best (recipe {now}, was {was}), but stage "
                    f"'{later.name}' has rows scored on its old best model; they cannot be rebuilt: start a new run "
                    f"from {EXPERIMENT_FILE}",
                    file=str(self.run_dir),
                )

    def shutdown(self) -> None:
        if self._pool is not None:
            record_memory(self.run_dir, self.memory, self._pool)  # the workers' peaks, while they are idle
            self._pool.shutdown()
            self._pool = self._pool_key = None

    def _run_stage(self, index: int, ledger: Ledger, ckpt: dict, state: dict) -> Best | None:
        stage = self.exp.stages[index]
        plan = self.plan(index, self.sources)
        _, evaluator, _ = self._evaluator(stage, f"stages[{index}]")
        pool = self._pool_for(plan, evaluator)
        port = None
        if plan.space is None:
            port = RunArchive(RunDir(self.run_dir).archive(stage.name), self.sources, pool)
            for ref, path in port.register_existing():
                pool.add_source(ref, path)
        opt = make_stage_optimizer(plan, seed=self.exp.seed + index, run_dir=self.run_dir, pool=self.sources, port=port)
        cap = self._rebuild_caps.pop(stage.name, None)
        capped = cap is not None and plan.budget_seconds is not None
        if capped:  # a finished stage with a time budget, rebuilt: as many tells as it had (see rebuild_state)
            opt.max_seconds = None
            opt.max_evals = cap if opt.max_evals is None else min(opt.max_evals, cap)
        ledger.keep_genomes(stage.name, plan.holdout_top_k)
        if index == 0 and self.exp.baselines:
            self._score_baselines(plan, pool, ledger, opt)
        after = 0
        if ckpt.get("optimizer") is not None:
            opt.load_state_dict(ckpt["optimizer"])
            after = int(ckpt.get("ledger_seq", 0))
            opt.reopen()  # a budget raised by `resume --set` lets a stopped search go on
        replay = {r.candidate_id: r for r in ledger.rows(stage=stage.name, split="search", after_seq=after) if "rescore_of" not in r.meta}
        ledger.cursor = after  # checkpoints count what has been told: rows after it are replayed
        subsampled = uses_subsamples(plan.evaluator_spec)

        def subset_for(generation: int) -> tuple[Any, str]:
            key = f"seed={self.exp.seed},generation={generation}" if subsampled else ""
            return Subset(seed=self.exp.seed, generation=generation), key

        def fitness(result: EvalResult) -> float | None:
            return opt.objectives.score(result)

        runner = make_runner(
            stage.fidelity, stage=stage.name, evaluator=evaluator, directions=plan.directions, primary=opt.objectives.primary,
            seed=self.exp.seed + index, subset_for=subset_for, top_k=plan.holdout_top_k,
            needs_core=OPTIMIZERS.get(plan.optimizer_name).NEEDS_PER_SAMPLE, per_generation=subsampled, ledger=ledger,
            state=ckpt.get("fidelity", {}) if ckpt.get("optimizer") is not None else None, baseline_rows=ledger.baselines(),
        )  # fmt: skip
        fidelity_state = (lambda: {}) if runner is None else (lambda: {"fidelity": runner.state_dict()})
        pacer = CheckpointPacer()

        def on_tell(counters: dict) -> None:
            pacer.maybe_write(
                lambda: self._save(
                    ledger,
                    {**state, "stage": stage.name, "phase": "search", "optimizer": opt.state_dict(), "ledger_seq": ledger.cursor, **counters, **fidelity_state()},
                )
            )

        with Progress(f"stage {stage.name}", log_every_s=10.0 if self.show_progress else 1e9) as bar:
            scheduler = Scheduler(
                stage=stage.name,
                optimizer=opt,
                pool=pool,
                ledger=ledger,
                decode=lambda cand: decode_candidate(plan, cand),
                subset_for=subset_for,
                fitness=fitness,
                on_tell=on_tell,
                replay=replay,
                failures_in_a_row=int(ckpt.get("failures_in_a_row", 0)),
                last_error=ckpt.get("last_error"),
                shardable=evaluator_class(plan.evaluator_spec["kind"]).SHARDABLE,
                progress=lambda done, note: bar.update(opt.n_told, plan.budget_evaluations, note),
                fidelity=runner,
            )
            reason = scheduler.run()
        if capped and self._rebuild_reasons.get(stage.name):
            reason = self._rebuild_reasons[stage.name]
        state["stop_reasons"][stage.name] = reason
        told = ledger.count(stage=stage.name, split="search")
        self.echo(f"stage {stage.name}: {told} evaluations; stopped: {reason}")
        self._save(ledger, {**state, "stage": stage.name, "phase": "holdout", "optimizer": opt.state_dict(), "ledger_seq": ledger.cursor, **fidelity_state()})
        if runner is not None:  # nothing is selected on an estimate alone (evomerge.fidelity.stage)
            rescore_estimates(runner, scheduler, ledger, payload=lambda row: row_payload(plan, row), subset_for=subset_for, fitness=fitness, k=plan.holdout_top_k)
        score_holdout(plan, scheduler, ledger, fitness)
        best = stage_best(ledger, stage.name)
        if best is None and any(f"stage:{stage.name}" in self._refs(s) for s in self.exp.stages[index + 1 :]):
            raise RunStopped(f"stage '{stage.name}' has no successful evaluation, and a later stage uses stage:{stage.name}")
        was = state["stage_bests"].get(stage.name)
        now = None if best is None else best.recipe_hash
        if was is not None and was != now:
            self._check_later_rows(index, ledger, was, now)
        state["stage_bests"][stage.name] = now
        if best is not None:
            self._finish_stage(index, best, pool, ledger)
            holdout = "-" if best.holdout_score is None else f"{best.holdout_score:.4f}"
            self.echo(f"stage {stage.name}: best search {best.score:.4f}, holdout {holdout} (candidate {best.candidate_id})")
        state["stages_done"].append(stage.name)
        if index == len(self.exp.stages) - 1:  # kept so that `resume --set` can raise its budget
            state["final_optimizer"] = {"stage": stage.name, "state": opt.state_dict()}
        self._save(ledger, {**state, "stage": None, "ledger_seq": ledger.last_seq()})
        return best

    def _finish_stage(self, index: int, best: Best, pool: WorkerPool, ledger: Ledger) -> None:
        name = self.exp.stages[index].name
        later = self.exp.stages[index + 1 :]
        needed = any(f"stage:{name}" in self._refs(s) for s in later)
        if needed:
            out = RunDir(self.run_dir).stage_model(name)
            write_best_model(best, self.sources, out)
            self.sources.register(f"stage:{name}", out)
            pool.add_source(f"stage:{name}", str(out))
            self._pool_sources[f"stage:{name}"] = str(out)
        run = run_best(self.exp.stages[: index + 1], ledger)
        if run is not None:
            write_best(self.run_dir, run, self.sources)

    def _refs(self, stage: StageSpec) -> list[str]:
        base = self.exp.stage_base(stage)
        return [*self.exp.stage_models(stage), *([base] if base else [])]

    def _register_stage_models(self) -> None:
        for stage in self.exp.stages:
            out = RunDir(self.run_dir).stage_model(stage.name)
            if (out / "config.json").is_file():
                self.sources.register(f"stage:{stage.name}", out)

    def _pool_for(self, plan: StagePlan, evaluator: Any) -> WorkerPool:
        key = json.dumps(plan.evaluator_spec, sort_keys=True, default=str)
        refs = [*plan.models, *([plan.base] if plan.base else [])]
        sources = {ref: str(self.sources.resolve(ref)) for ref in refs}
        sources.update({ref: str(path) for ref, path in self.sources.aliases.items()})
        if self._pool is not None and key == self._pool_key:  # same evaluator: keep the workers
            for ref, path in sources.items():
                if self._pool_sources.get(ref) != path:
                    self._pool.add_source(ref, path)
            self._pool_sources.update(sources)
            return self._pool
        self.shutdown()
        pool = make_pool(self.exp, local=self.local, evaluator=evaluator, memory=self.memory)
        pool.start(sources, worker_evaluator(plan.evaluator_spec), allow_pickle=self.exp.allow_pickle, dtype=self.exp.dtype)
        self._pool, self._pool_key, self._pool_sources = pool, key, dict(sources)
        record_memory(self.run_dir, self.memory, pool)  # the budget and what the sources take
        return pool

    def _score_baselines(self, plan: StagePlan, pool: WorkerPool, ledger: Ledger, opt: Any) -> None:
        """Hand-set recipes scored on both splits with the first stage's evaluator (stage
        `baseline:NAME` in the ledger), once per run."""
        scheduler = Scheduler(
            stage="baseline", optimizer=opt, pool=pool, ledger=ledger, decode=lambda c: c.recipe,
            subset_for=lambda g: (None, ""), fitness=opt.objectives.score, on_tell=lambda c: None,
        )  # fmt: skip
        todo = []
        for i, baseline in enumerate(self.exp.baselines):
            recipe = self._baseline_recipe(i)
            digest = recipe.content_hash()
            stage = f"{BASELINE_PREFIX}{baseline.name}"
            for split in ("search", "holdout"):
                if ledger.find(digest, split, stage=stage) is None:
                    subset = Subset(seed=self.exp.seed, generation=0) if split == "search" else None
                    ev = scheduler.evaluation(f"{stage}|{split}||{digest}", recipe, split, subset, "")
                    todo.append((i, stage, split, recipe, ev))
        if not todo:
            return
        self.echo(f"scoring {len(self.exp.baselines)} baseline(s)")
        scheduler.evaluate_all([t[-1] for t in todo])
        for i, stage, split, recipe, ev in todo:
            result = ev.result
            ledger.append(
                LedgerRow.from_result(
                    result, None if result.failed else opt.objectives.score(result),
                    stage=stage, candidate_id=i, generation=-1, split=split, recipe_hash=recipe.content_hash(),
                    recipe_yaml=recipe.to_yaml(), worker=ev.worker, started=ev.started, finished=ev.finished,
                )
            )  # fmt: skip


def make_pool(exp: Experiment, *, local: bool, evaluator: Any = None, memory: MemoryBudget | None = None) -> WorkerPool:
    """The worker pool the experiment's `ray:` section asks for (`workers: 0` or --local: in-process),
    within the `memory` budget (`evomerge.memory`; None: no budget)."""
    device = None if exp.device == "auto" else exp.device
    if local or exp.ray.workers == 0:
        from evomerge.run.local import LocalWorkerPool  # imports torch

        threads = max(1, round(exp.ray.num_cpus_per_worker)) if exp.ray.num_cpus_per_worker else None
        return LocalWorkerPool(evaluator=evaluator, device=device, threads=threads, memory=memory)
    from evomerge.run.workers import RayWorkerPool  # Ray: only for a run on Ray workers

    return RayWorkerPool.from_config(exp.ray.model_dump(), device=device, memory=memory)


# ---- entry points ------------------------------------------------------------------------------


def start_run(
    experiment: str | Path,
    *,
    out: str | Path | None = None,
    sets: tuple[str, ...] | list[str] = (),
    local: bool = False,
    echo: Callable[[str], None] = print,
    execute: bool = True,
) -> Run:
    """Validate an experiment, create its run directory and run it."""
    file = str(find_yaml("experiments", experiment))
    written = load_experiment(file, sets)
    exp = resolve_experiment(written, file=file)
    return start_experiment(exp, file=file, written=written, out=out, local=local, echo=echo, execute=execute)


def start_experiment(
    exp: Experiment,
    *,
    file: str | None,
    written: Experiment | None = None,
    out: str | Path | None = None,
    local: bool = False,
    echo: Callable[[str], None] = print,
    execute: bool = True,
) -> Run:
    """`start_run` for an experiment already loaded and resolved (`resolve_experiment`; `file`:
    the file it came from, None for one built in Python; `written`: the experiment before it
    was resolved, whose model references the model card names): check the run directory,
    validate, create the directory and run it."""
    run_dir = Path(out) if out is not None else Path(exp.output_dir) / exp.name
    if (run_dir / EXPERIMENT_FILE).exists() or (run_dir / LEDGER_FILE).exists():
        raise ConfigError(f"already holds a run; continue it with `evomerge resume {run_dir}` or pick another --out", file=str(run_dir))
    where = "--out" if out is not None else "output_dir"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("is a file, not a directory; pick a new or empty directory for the run", file=str(run_dir), field=where)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError("holds files that are not a run (evomerge never writes among them); pick a new or empty directory", file=str(run_dir), field=where)
    run = Run(run_dir, exp, file=file, local=local, echo=echo)
    run.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / EXPERIMENT_FILE, exp.to_yaml())
    record_references(run_dir, written_references(written or exp, exp))  # for the model card
    Ledger.open(run_dir / LEDGER_FILE).close()
    echo(f"run directory: {run_dir}")
    if execute:
        run.execute()
    return run


def resume_run(
    run_dir: str | Path,
    *,
    sets: tuple[str, ...] | list[str] = (),
    local: bool = False,
    echo: Callable[[str], None] = print,
    execute: bool = True,
    rebuild: bool = False,
) -> Run:
    """Carry on a run from its last checkpoint (nothing told before it is evaluated again).
    `sets`: changes that may be made on resume (budgets, holdout_top_k, ray; see
    `evomerge.run.resume`); a raised budget of a finished run's last stage reopens it.
    A ledger that lacks rows the checkpoint counts is refused (`evomerge.run.integrity`) unless
    `rebuild` (`Run.rebuild_state`), which also goes on without a readable checkpoint."""

    run_dir = require_run_dir(run_dir)
    exp = read_experiment(run_dir)
    if rebuild:
        if sets:
            raise ConfigError("give --rebuild alone; change settings with a later `evomerge resume --set`", field="--set")
        run = Run(run_dir, exp, file=str(run_dir / EXPERIMENT_FILE), local=local, echo=echo)
        run.validate()
        if execute:
            run.execute(rebuild=True)
        return run
    ckpt = load_checkpoint(run_dir)  # before the ledger: the ledger only grows after it
    if lock_holder(run_dir) is None:  # a live driver is refused below, by its lock
        with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
            check_ledger(run_dir, ledger, ckpt)
    changes: list[str] = []
    if sets:
        exp, changes, reopen = resume_changes(run_dir, exp, sets, ckpt)
        if reopen:
            assert ckpt is not None
            ckpt = reopened_checkpoint(ckpt, exp.stages[-1].name)
    run = Run(run_dir, exp, file=str(run_dir / EXPERIMENT_FILE), local=local, echo=echo)
    if ckpt is not None and ckpt.get("finished"):
        if changes:
            echo(f"{run_dir}: the run is finished; nothing to resume, so nothing changed ({'; '.join(changes)})")
            return run
        echo(f"{run_dir}: the run is finished; nothing to resume")
        return run
    run.validate()
    if changes:
        run._lock().close()  # not while another driver runs it (raises), before its experiment changes
        atomic_write_text(run_dir / EXPERIMENT_FILE, exp.to_yaml())
        log_changes(run_dir, changes)
        if ckpt is not None and ckpt.get("stage") == exp.stages[-1].name and not ckpt.get("finished"):
            save_checkpoint(run_dir, ckpt)  # a reopened last stage (or the same checkpoint)
        for change in changes:
            echo(f"changed: {change}")
    if execute:
        run.execute()
    return run
