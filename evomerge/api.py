"""evomerge from Python: build an experiment, run or resume it, read its ledger, export, merge.

::

    import evomerge as em

    def accuracy(model, tokenizer, split):           # any scoring function
        return {"acc": ...}

    exp = em.Experiment("tiny_ps").with_overrides({
        "stages.ps.budget.evaluations": 8,
        "stages.ps.evaluator": em.python_evaluator(accuracy, objectives={"acc": True}),
        "stages.ps.evaluator_overrides": {},         # tiny_ps's were for its lm_eval evaluator
    })
    run = em.run(exp, out="runs/mine", local=True)
    run.best().score, run.ledger()                   # a pandas DataFrame, one row per evaluation
    run.export("merged/mine"); run.report()

The command line (`evomerge.cli`) is a layer over these functions. A problem with the user's
input is an `EvomergeError` (`ConfigError`, ...) whose `str` is one line naming the file, the
field and what would be valid, the line the CLI prints; a file fault (disk full, a damaged
ledger) is one too.

Registries: `register_evaluator`, `register_optimizer`, `register_method` / `merge_method`,
`register_space`, `register_model_kind` and `register_function` (a scoring function for the
`python` evaluator kind, by name, with no module path) add to evomerge from the user's own code; what is
registered here is also registered in the Ray workers of a run started from this process
(`evomerge.usercode`).

The run machinery (torch, Ray, pandas, matplotlib) is imported by the functions that use it, so
that `import evomerge` and building an `Experiment` stay fast.
"""

from __future__ import annotations

import copy
import functools
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from evomerge import usercode
from evomerge.config import Experiment as ExperimentConfig
from evomerge.config import apply_sets, parse_experiment, parse_sets, resolve_experiment
from evomerge.errors import ConfigError, EvomergeError
from evomerge.faults import os_fault, sqlite_fault
from evomerge.recipe import Recipe
from evomerge.resources import find_yaml, read_yaml
from evomerge.usercode import register_function

if TYPE_CHECKING:
    import pandas as pd

    from evomerge.evaluate.base import Evaluator
    from evomerge.merge.specs import MethodSpec
    from evomerge.optim.base import Optimizer
    from evomerge.run.hub import Pushed
    from evomerge.run.stages import Best
    from evomerge.spaces.base import SearchSpace


F = TypeVar("F", bound=Callable[..., Any])
Echo = Callable[[str], None] | None


def _one_line(fn: F) -> F:
    """File faults that reach an entry point become one-line EvomergeErrors, as in the CLI."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise os_fault(exc) from None
        except sqlite3.DatabaseError as exc:
            raise sqlite_fault(exc, "database") from None

    return wrapper  # type: ignore[return-value]


def _echo(echo: Echo) -> Callable[[str], None]:
    return echo if echo is not None else (lambda line: None)


# ---- experiments ---------------------------------------------------------------------------------


class Experiment:
    """An experiment, not run yet: from a YAML path, a built-in name (`experiments/NAME.yaml`) or a
    mapping with the fields of an experiment file (relative paths in a mapping resolve from the
    working directory). A ``callable:`` of an evaluator may be a Python function (registered by
    `register_function`). Immutable: `with_overrides` returns a new one."""

    @_one_line
    def __init__(self, source: str | Path | Mapping[str, Any] | Experiment) -> None:
        if isinstance(source, Experiment):
            self.file, self._data = source.file, copy.deepcopy(source._data)
            return
        if isinstance(source, Mapping):
            self.file: str | None = None
            self._data: dict[str, Any] = usercode.named_functions(copy.deepcopy(dict(source)))
            return
        if not isinstance(source, str | Path):
            raise ConfigError(f"an experiment is a YAML path, a built-in name or a mapping, got {type(source).__name__}")
        path = find_yaml("experiments", source)
        self.file = str(path)
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError("an experiment is a mapping (name, models, stages, ...)", file=self.file)
        self._data = data

    @property
    def name(self) -> Any:
        return self._data.get("name")

    def to_dict(self) -> dict[str, Any]:
        """The experiment's fields as given (overrides applied, nothing resolved)."""
        return copy.deepcopy(self._data)

    def with_overrides(self, *sets: str | Mapping[str, Any]) -> Experiment:
        """A copy with fields changed, as `evomerge run --set` does: ``"KEY=VALUE"`` strings (the
        value read as YAML) or mappings ``{"stages.ps.budget.evaluations": 20}`` (values as they
        are: a mapping, a list, a Python function for ``callable``). A list is indexed by number
        or, for stages, by name."""
        pairs: list[tuple[str, Any]] = []
        for item in sets:
            if isinstance(item, Mapping):
                pairs += [(str(key), usercode.named_functions(value)) for key, value in item.items()]
            elif isinstance(item, str):
                pairs += parse_sets([item])
            else:
                raise ConfigError(f"an override is 'KEY=VALUE' or a mapping {{KEY: value}}, got {type(item).__name__}", field="overrides")
        out = Experiment(self)
        try:
            out._data = apply_sets(out._data, pairs)
        except ConfigError as exc:
            if any(isinstance(item, Mapping) for item in sets):
                exc.field = "overrides"
            raise
        return out

    @_one_line
    def config(self) -> ExperimentConfig:
        """The experiment checked against the schema and resolved (paths absolute, each stage's
        search space and evaluator inlined): what a run freezes in its directory."""
        return resolve_experiment(parse_experiment(self._data, file=self.file), file=self.file)

    @_one_line
    def validate(self, *, models: bool = False) -> ExperimentConfig:
        """Check everything that needs no model or dataset (schema, optimizers and their options,
        search spaces, baseline recipes, evaluator specs), in a second or two; with `models`, also
        what a run checks before it starts (the zoo built, every source opened, each evaluator
        built, each stage's starting recipe planned against its models). Returns the resolved
        experiment; raises a one-line ConfigError naming the field otherwise."""
        resolved = self.config()
        if models:
            from evomerge.run import driver  # imports the evaluators and the merge engine

            driver.Run(Path(resolved.output_dir) / resolved.name, resolved, file=self.file, local=True, echo=lambda line: None).validate()
        return resolved

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self._data, sort_keys=False)

    def __repr__(self) -> str:
        return f"Experiment({self.file or self.name!r})"


def python_evaluator(
    fn: Callable[..., Any] | str,
    *,
    objectives: Mapping[str, bool],
    args: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """The spec of a `python` evaluator that scores with `fn` (a function, registered under `name`,
    or the name or ``module:function`` of one): called as ``fn(model, tokenizer, split, **args)``
    (plus ``subset=``/``shard=`` when it takes them), it returns ``{objective: value}`` or
    ``{"objectives": ..., "per_sample": {task: scores}}``. `objectives`: name -> higher is better,
    the first is optimized. Use it as a stage's ``evaluator``."""
    ref = fn if isinstance(fn, str) else register_function(fn, name)
    return {"kind": "python", "callable": ref, "objectives": dict(objectives), "args": dict(args or {})}


# ---- runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """What `Run.export` wrote: the best recipe (a mergekit config) and the model directory."""

    recipe: Path
    model: Path | None


class Run:
    """A handle on a run directory (running, stopped or finished); each method reads the
    directory when called."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r})"

    @_one_line
    def status(self) -> dict[str, Any]:
        """What `evomerge status --json` prints (see `evomerge.run.status`)."""
        from evomerge.run.status import run_status

        return run_status(self.run_dir)

    @_one_line
    def experiment(self) -> ExperimentConfig:
        """The experiment as frozen at the start (resolved, overrides of resumes applied)."""
        from evomerge.config import read_experiment
        from evomerge.run.rundir import require_run_dir

        return read_experiment(require_run_dir(self.run_dir))

    @_one_line
    def best(self) -> Best | None:
        """The run's best so far (`evomerge.run.stages.Best`: stage, candidate, search and holdout
        scores, recipe YAML; chosen as `status` and `export` choose it), None before the first
        successful evaluation."""
        from evomerge.run.integrity import check_run_dir
        from evomerge.run.ledger import Ledger
        from evomerge.run.rundir import LEDGER_FILE, require_run_dir
        from evomerge.run.stages import run_best

        exp, _ = check_run_dir(require_run_dir(self.run_dir))
        with Ledger.open(self.run_dir / LEDGER_FILE, readonly=True) as ledger:
            return run_best(exp.stages, ledger)

    @_one_line
    def ledger(self, *, per_sample: bool = False) -> pd.DataFrame:
        """The ledger as a pandas DataFrame: one row per evaluation in `seq` order (search,
        holdout and baseline rows), one column per ledger column (JSON columns as Python lists and
        dicts; `fitness` is -inf for a failed row). The `per_sample` column (per task, the score of
        every document; the document ids are in `meta`) only when asked for: it is most of the
        ledger's size."""
        import pandas as pd

        from evomerge.run.ledger import Ledger, LedgerRow
        from evomerge.run.rundir import LEDGER_FILE, require_run_dir

        columns = [f.name for f in fields(LedgerRow) if per_sample or f.name != "per_sample"]
        with Ledger.open(require_run_dir(self.run_dir) / LEDGER_FILE, readonly=True) as ledger:
            records = [[getattr(row, name) for name in columns] for row in ledger.rows()]
        return pd.DataFrame.from_records(records, columns=columns)

    @_one_line
    def export(self, out: str | Path | None = None, *, force: bool = False) -> Exported:
        """Write the best recipe to ``RUN/best/recipe.yaml`` and, with `out` (outside the run),
        the merged model with its model card, as `evomerge export RUN --out OUT` does."""
        from evomerge.run.export import export_run

        recipe, model = export_run(self.run_dir, out, force=force)
        return Exported(recipe=Path(recipe), model=None if model is None else Path(model))

    @_one_line
    def push_to_hub(
        self, repo: str, *, out: str | Path | None = None, private: bool = False, force: bool = False, echo: Echo = print
    ) -> Pushed:
        """Export the best model (to `out`, or a temporary directory) with its Hub model card and
        upload it to the Hugging Face Hub repo `repo` (created when missing), as
        `evomerge export RUN --push-to-hub REPO` does; returns the repo's URL and what was sent."""
        from evomerge.run.hub import push_run

        return push_run(self.run_dir, repo, out=out, private=private, force=force, echo=_echo(echo))

    @_one_line
    def report(self, out: str | Path | None = None) -> Path:
        """Write the HTML report and its plots (default ``RUN/report/``); returns index.html."""
        from evomerge.report import write_report

        return Path(write_report(self.run_dir, out))


@_one_line
def run(
    experiment: Experiment | str | Path | Mapping[str, Any],
    *,
    out: str | Path | None = None,
    local: bool = False,
    tracking: Mapping[str, Any] | None = None,
    echo: Echo = print,
) -> Run:
    """Validate `experiment` (an `Experiment`, a YAML path, a built-in name or a mapping), create
    its run directory (`out`, default ``OUTPUT_DIR/NAME``) and run it to the end; `local`:
    evaluate in this process instead of on Ray workers; `tracking`: the experiment's
    ``tracking:`` section (MLflow, TensorBoard, W&B), given here. `echo` gets the progress lines
    (None: silent). Ctrl-C stops the run at its last checkpoint (`resume` goes on from there)."""
    from evomerge.run.driver import start_experiment

    exp = Experiment(experiment)
    if tracking is not None:
        exp = exp.with_overrides({"tracking": tracking})
    written = parse_experiment(exp.to_dict(), file=exp.file)
    resolved = resolve_experiment(written, file=exp.file)
    driver = start_experiment(resolved, file=exp.file, written=written, out=out, local=local, echo=_echo(echo))
    return Run(driver.run_dir)


@_one_line
def resume(
    run_dir: str | Path,
    *,
    overrides: Iterable[str | Mapping[str, Any]] = (),
    local: bool = False,
    rebuild: bool = False,
    tracking: Mapping[str, Any] | None = None,
    echo: Echo = print,
) -> Run:
    """Carry on the run in `run_dir` from its last checkpoint (after a stop, a crash or kill -9)
    to its end. `overrides`: budgets, holdout_top_k or ray settings to change (as
    `Experiment.with_overrides`; a raised budget of a finished run's last stage reopens it).
    `rebuild`: re-evaluate rows the ledger lost (see `evomerge resume --rebuild`). `tracking`:
    the ``tracking:`` section from here on (a tracker added logs the rows still to come). A run
    whose evaluator is a function registered in another process needs it registered again."""
    from evomerge.run.driver import RunInterrupted, resume_run

    sets: list[str] = []
    for item in [overrides] if isinstance(overrides, str | Mapping) else overrides:
        if isinstance(item, Mapping):
            sets += [f"{key}={json.dumps(value)}" for key, value in item.items()]
        else:
            sets.append(item)
    if tracking is not None:
        sets.append(f"tracking={json.dumps(tracking)}")
    try:
        resume_run(run_dir, sets=sets, local=local, echo=_echo(echo), rebuild=rebuild)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None
    return Run(run_dir)


# ---- merging -------------------------------------------------------------------------------------


@_one_line
def merge(
    recipe: Recipe | str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    allow_pickle: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    pickle_switch: str = "pass allow_pickle=True",
) -> Path:
    """Build the model a recipe (a `Recipe`, a mergekit YAML path or a mapping) describes and write
    it to `out` (safetensors shards of at most `max_shard_bytes`, config, tokenizer, model card).
    Relative model paths of a recipe file resolve next to it. A non-empty `out` evomerge did not
    write is refused unless `force`. `pickle_switch`: how the error for a pickle checkpoint says
    to allow it."""
    from evomerge.merge.sources import SourcePool
    from evomerge.merge.writer import write_model

    file = None
    if isinstance(recipe, Recipe):
        parsed = recipe
    elif isinstance(recipe, Mapping):
        parsed = Recipe.parse(recipe)
    else:
        file = str(recipe)
        parsed = Recipe.from_yaml(recipe)
    search_dirs = (Path(file).resolve().parent,) if file else ()
    pool = SourcePool(allow_pickle=allow_pickle, search_dirs=search_dirs, pickle_switch=pickle_switch)
    try:
        return Path(write_model(parsed, pool, out, max_shard_bytes=max_shard_bytes, progress=progress, force=force))
    except EvomergeError as exc:
        raise exc.located(file=file) from None


# ---- registries ----------------------------------------------------------------------------------


def register_evaluator(name: str, target: str | type[Evaluator], *, replace: bool = False) -> None:
    """Make `name` an evaluator ``kind:`` (an `evomerge.evaluate.Evaluator` subclass with its
    `spec_model`, or a lazy ``"package.module:Class"``). For a plain scoring function, use
    `python_evaluator` or `register_function`."""
    from evomerge.evaluate.registry import register_evaluator as register

    usercode.record(register, name, target, replace=replace)


def register_optimizer(name: str, target: str | type[Optimizer], *, replace: bool = False) -> None:
    """Make `name` an optimizer of experiments (an `evomerge.optim.Optimizer` subclass or a lazy
    ``"package.module:Class"``)."""
    from evomerge.optim import register_optimizer as register

    usercode.record(register, name, target, replace=replace)


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add a merge method declared by an `evomerge.merge.specs.MethodSpec` (its parameters,
    capabilities and kernel)."""
    from evomerge.merge.specs import register_method as register

    return usercode.record(register, spec, replace=replace)


def merge_method(name: str, **declaration: Any) -> Callable[[F], F]:
    """Decorator: the decorated kernel ``f(base, tensors, model_params, params, ctx)`` becomes merge
    method `name`, declared by the other `MethodSpec` fields (``requires_base``,
    ``model_params``, ...)."""
    from evomerge.merge.specs import METHOD_SPECS
    from evomerge.merge.specs import merge_method as declare
    from evomerge.merge.specs import register_method as register

    def decorate(kernel: F) -> F:
        declare(name, **declaration)(kernel)
        usercode.remember(register, METHOD_SPECS[name], replace=True)
        return kernel

    return decorate


def register_space(name: str, target: str | type[SearchSpace], *, replace: bool = False) -> None:
    """Make `name` a search-space ``kind:`` (an `evomerge.spaces.SearchSpace` subclass with its spec
    schema, or a lazy ``"package.module:Class"``); see `evomerge.spaces.config`."""
    from evomerge.spaces.config import register_space as register

    usercode.record(register, name, target, replace=replace)


def register_model_kind(name: str, loader: Callable[[Mapping[str, Any]], Any] | str, *, load_hint: str | None = None, replace: bool = False) -> None:
    """Configs with ``"architecture": name`` are built by `loader` (a function of the config, or a
    lazy ``"package.module:attr"``); see `evomerge.models`."""
    from evomerge.models import register_model_kind as register

    usercode.record(register, name, loader, load_hint=load_hint, replace=replace)
