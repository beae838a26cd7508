"""Experiment files (experiments/*.yaml): the schema, `--set key=value` overrides, name resolution.

An experiment names its models, one or more stages (search space, evaluator, optimizer, budget)
and how to run them (Ray or in-process workers). Example::

    name: tiny_ps
    seed: 0
    models:
      base: zoo:tiny/base
      sources: [zoo:tiny/add, zoo:tiny/reverse, zoo:tiny/sort]
    stages:
      - name: ps
        space: ps_dare_ties              # built-in name or a path; space_overrides: {...}
        evaluator: zoo_all               # built-in name or a path; evaluator_overrides: {...}
        optimizer: {name: cmaes, popsize: 8}
        budget: {evaluations: 64}        # and/or seconds
    ray: {workers: 0}                    # 0: in-process workers; N: N Ray workers

A stage's `models` default to the experiment's `sources` and its `base` to the experiment's
`base`; a stage that lists its own `models` names its own `base` (if its method needs one).
`stage:NAME` refers to the best model of an earlier stage (PS then DFS, as in Sakana's paper).
`baselines` are hand-set recipes scored on both splits with the first stage's evaluator.
`--set stages.ps.budget.evaluations=20` changes one field (lists by index or, for stages, by
name; values are read as YAML). Paths are relative to the
experiment file. `resolve_experiment` makes every path absolute and inlines the search-space
spec, so the copy frozen in the run directory does not depend on where it was started from.
Errors are one line naming the file and the field (`ConfigError`, exit code 2).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import ConfigError, EvomergeError, schema_error
from evomerge.evaluate.registry import check_spec, resolve_spec
from evomerge.fidelity import check_fidelity
from evomerge.fidelity.stage import check_stage_fidelity
from evomerge.memory import MemorySpec, NodeMemory, WorkerMemory
from evomerge.optim import OPTIMIZERS, check_options
from evomerge.recipe import DTYPES, Recipe
from evomerge.resources import find_yaml, read_yaml
from evomerge.run.rundir import RunDir, experiment_data
from evomerge.spaces.config import load_space_spec
from evomerge.tracking import TrackingSpec, check_tracking

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _name_rule(what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"a {what} name is letters, digits, '_', '-' or '.'")
        return value

    return AfterValidator(check)


StageName = Annotated[str, _name_rule("stage")]
RunName = Annotated[str, _name_rule("run")]


# Every number finite; a non-finite value in a free-form part (optimizer options, overrides,
# baseline recipes) is kept as such in the frozen copy (not turned into null) so that the checks
# see it.
_NUMBERS = ConfigDict(allow_inf_nan=False, ser_json_inf_nan="constants")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", **_NUMBERS)


class ModelsSpec(_Strict):
    """The models of the experiment: `base` (for methods that need one) and the merged `sources`."""

    base: str | None = None
    sources: list[str] = Field(min_length=1)


class OptimizerSpec(BaseModel):
    """`name` plus that optimizer's options (checked by `evomerge.optim.make_optimizer`)."""

    model_config = ConfigDict(extra="allow", **_NUMBERS)

    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class BudgetSpec(_Strict):
    evaluations: int | None = Field(None, ge=1)
    seconds: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetSpec:
        if self.evaluations is None and self.seconds is None:
            raise ValueError("give evaluations and/or seconds")
        return self


class StageSpec(_Strict):
    name: StageName
    space: str | dict | None = None  # None only for M2N2 in model mode (candidates carry recipes)
    space_overrides: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = None
    base: str | None = None
    evaluator: str | dict
    evaluator_overrides: dict[str, Any] = Field(default_factory=dict)
    optimizer: OptimizerSpec
    budget: BudgetSpec
    holdout_top_k: int = Field(3, ge=0)
    fidelity: Any = "full"  # a strategy name or {strategy: NAME, ...}: evomerge/fidelity, checked by check_experiment

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def searches_space(self) -> bool:
        """Whether the stage's optimizer searches a space (not: M2N2 in model mode, whose
        candidates carry recipes); an unknown optimizer is named by `check_experiment`."""
        if not OPTIMIZERS.find(self.optimizer.name):
            return True
        return OPTIMIZERS.get(self.optimizer.name).searches_space(self.optimizer.options)


class RaySpec(_Strict):
    address: str | None = None  # None: local; "auto" or "ray://host:port": join a cluster
    workers: int = Field(0, ge=0)  # 0: in-process workers (no Ray)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    num_cpus: int | None = Field(None, ge=1)  # CPUs of a local Ray instance (default: workers x per worker)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # extra custom Ray resources


class BaselineSpec(_Strict):
    """A hand-set recipe scored on the search and holdout splits of the first stage, for reference."""

    name: str
    recipe: str | dict


class Experiment(_Strict):
    name: RunName
    seed: int = 0
    models: ModelsSpec
    stages: list[StageSpec] = Field(min_length=1)
    ray: RaySpec = Field(default_factory=RaySpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)  # evomerge/memory.py
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    output_dir: str = "runs"
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)  # evomerge/tracking
    baselines: list[BaselineSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages(self) -> Experiment:
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}]: stage name '{stage.name}' is used twice")
            for ref in [*(stage.models or []), *([stage.base] if stage.base else [])]:
                if ref.startswith("stage:") and ref[len("stage:"):] not in seen:
                    raise ValueError(
                        f"stages[{i}]: '{ref}' is not an earlier stage (earlier: {', '.join(seen) or 'none'})"
                    )
            if stage.space is None and stage.searches_space:
                raise ValueError(f"stages[{i}].space: a stage needs a search space (only m2n2 with mode: model has none)")
            seen.append(stage.name)
        return self

    # ---- helpers ------------------------------------------------------------------------
    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def stage_models(self, stage: StageSpec) -> list[str]:
        return list(stage.models) if stage.models is not None else list(self.models.sources)

    def stage_base(self, stage: StageSpec) -> str | None:
        if stage.models is not None:
            return stage.base
        return stage.base if stage.base is not None else self.models.base

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- loading ------------------------------------------------------------------------------


def parse_sets(items: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """`key.path=value` pairs; the value is read as YAML (numbers, lists, null, strings)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"'{item}' is not key=value (example: stages.ps.budget.evaluations=20)", field="--set")
        key, _, text = item.partition("=")
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"'{item}' has an empty key part (example: stages.ps.budget.evaluations=20)", field="--set")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def apply_sets(data: dict, sets: list[tuple[str, Any]]) -> dict:
    """Set dotted keys in a raw experiment mapping. A list is indexed by number or, for `stages`,
    by stage name (`stages.ps.budget.evaluations=20`)."""
    data = copy.deepcopy(data)
    for key, value in sets:
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                index = _list_index(node, part, key)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"cannot set '{key}': '{where}' is not a mapping or list", field="--set")
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(node) <= index < len(node):
            return index
        raise ConfigError(f"cannot set '{key}': index {index} is out of range (the list has {len(node)} items)", field="--set")
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [str(item.get("name")) for item in node if isinstance(item, dict)]
    raise ConfigError(f"cannot set '{key}': no item named '{part}' (names: {', '.join(names) or 'none'})", field="--set")


def load_experiment(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, override and check the schema of an experiment file (nothing is resolved yet)."""
    path = find_yaml("experiments", path)
    file = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("an experiment is a mapping (name, models, stages, ...)", file=file)
    data = apply_sets(data, parse_sets(sets))
    return parse_experiment(data, file=file)


def parse_experiment(data: dict, *, file: str | None = None) -> Experiment:
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise schema_error(exc, file=file, valid_fields=_valid_fields) from None


def read_experiment(run_dir: str | Path) -> Experiment:
    """A run's frozen experiment (`experiment.yaml`); a damaged file is one line naming it."""
    return parse_experiment(experiment_data(run_dir), file=str(RunDir(run_dir).experiment))


def _valid_fields(parent: str) -> list[str]:
    leaf = re.sub(r"\[\d+\]", "", parent.rsplit(".", 1)[-1]) if parent else ""
    model = {
        "": Experiment,
        "models": ModelsSpec,
        "stages": StageSpec,
        "budget": BudgetSpec,
        "ray": RaySpec,
        "baselines": BaselineSpec,
        "memory": MemorySpec, "node": NodeMemory, "worker": WorkerMemory,
    }.get(leaf)
    return list(model.model_fields) if model else []


# ---- resolution ---------------------------------------------------------------------------


def _absolute_ref(ref: str, base_dir: Path) -> str:
    """A model reference with a relative local directory made absolute; other refs unchanged."""
    if ref.startswith(("zoo:", "stage:", "archive:")):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute() and (base_dir / path).is_dir():
        return str((base_dir / path).resolve())
    if path.is_absolute() or ref.startswith((".", "~")):
        return str(path.resolve())
    return ref


def _absolute_yaml(ref: str | dict, base_dir: Path) -> str | dict:
    if isinstance(ref, dict):
        return ref
    text = str(ref)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        return str(path.resolve())
    return text


def resolve_experiment(exp: Experiment, *, file: str | None = None) -> Experiment:
    """A copy with paths made absolute (relative to the experiment file) and each stage's search
    space and evaluator inlined (the spec with its overrides applied), ready to be frozen in a
    run directory. Checked first (`check_experiment`), while the overrides are still apart."""
    check_experiment(exp, file=file)  # overrides still apart: a bad one is named as such
    base_dir = Path(file).resolve().parent if file else Path.cwd()
    data = exp.to_dict()
    data["models"]["base"] = _absolute_ref(data["models"]["base"], base_dir) if data["models"]["base"] else None
    data["models"]["sources"] = [_absolute_ref(r, base_dir) for r in data["models"]["sources"]]
    for i, stage in enumerate(data["stages"]):
        if stage["models"] is not None:
            stage["models"] = [_absolute_ref(r, base_dir) for r in stage["models"]]
        if stage["base"]:
            stage["base"] = _absolute_ref(stage["base"], base_dir)
        if stage["space"] is not None:
            try:
                spec, _ = load_space_spec(_absolute_yaml(stage["space"], base_dir), stage["space_overrides"] or None)
            except EvomergeError as exc:
                raise _space_error(exc, i, file) from None
            stage["space"] = spec.model_dump(mode="json")
            stage["space_overrides"] = {}
        try:
            stage["evaluator"] = resolve_spec(_absolute_yaml(stage["evaluator"], base_dir), stage["evaluator_overrides"])
        except EvomergeError as exc:
            raise ConfigError(exc.message, file=exc.file or file, field=f"stages[{i}].evaluator" + (f".{exc.field}" if exc.field and exc.field != "evaluator" else "")) from None
        stage["evaluator_overrides"] = {}
    for baseline in data["baselines"]:
        if isinstance(baseline["recipe"], str):
            baseline["recipe"] = str(_absolute_yaml(baseline["recipe"], base_dir))
    return parse_experiment(data, file=file)


def _space_error(exc: EvomergeError, index: int, file: str | None) -> ConfigError:
    """A search-space problem: inside a space file, that file and field; in an inline space, the
    experiment's `stages[i].space.FIELD`; in the overrides, `stages[i].space_overrides.FIELD`."""
    if exc.file:
        return ConfigError(exc.message, file=exc.file, field=exc.field)
    if (exc.field or "").startswith("space_overrides."):
        return ConfigError(exc.message, file=file, field=f"stages[{index}].{exc.field}")
    return ConfigError(exc.message, file=file, field=f"stages[{index}].space" + (f".{exc.field}" if exc.field else ""))


# ---- static checks ------------------------------------------------------------------------


def check_experiment(exp: Experiment, *, file: str | None = None) -> None:
    """Everything about an experiment that can be checked without a model or a dataset, in a
    second or two, before a run builds a zoo or loads anything: each stage's optimizer (name,
    options and their values), search space (its spec against the merge method's declared
    parameters; a base model where the method needs one), the baselines' recipes (structure,
    parameter names and values) and each evaluator's spec (kind and schema). One line naming the
    file and the field for the first problem."""
    base_dir = Path(file).resolve().parent if file else Path.cwd()
    check_tracking(exp.tracking, file=file)
    for i, stage in enumerate(exp.stages):
        where = f"stages[{i}]"
        try:
            check_options(stage.optimizer.name, stage.optimizer.options)
        except EvomergeError as exc:
            raise ConfigError(exc.message, file=file, field=f"{where}.{exc.field}") from None
        if stage.space is None:
            continue
        try:
            spec, _ = load_space_spec(_absolute_yaml(stage.space, base_dir), stage.space_overrides or None)
        except EvomergeError as exc:
            raise _space_error(exc, i, file) from None
        if (needs_base := spec.base_needed()) and not exp.stage_base(stage):
            field = f"{where}.base" if stage.models is not None else "models.base"
            raise ConfigError(f"the stage's space {needs_base}", file=file, field=field)
    for i, stage in enumerate(exp.stages):
        check_fidelity(stage.fidelity, file=file, where=f"stages[{i}].fidelity")
    for i, baseline in enumerate(exp.baselines):
        field = f"baselines[{i}].recipe"
        try:
            if isinstance(baseline.recipe, dict):
                Recipe.parse(baseline.recipe, file=file)
            else:
                Recipe.from_yaml(_absolute_yaml(baseline.recipe, base_dir))
        except EvomergeError as exc:
            if exc.file and exc.file != file:  # inside a recipe file: that file and field
                raise
            raise ConfigError(exc.message, file=file, field=f"{field}.{exc.field}" if exc.field else field) from None
    for i, stage in enumerate(exp.stages):
        try:
            evaluator_cls = check_spec(_absolute_yaml(stage.evaluator, base_dir), stage.evaluator_overrides or None)
        except EvomergeError as exc:
            if exc.field and exc.field.startswith("evaluator_overrides."):
                raise ConfigError(exc.message, file=file, field=f"stages[{i}].{exc.field}") from None
            field = f"stages[{i}].evaluator" + (f".{exc.field}" if exc.field and exc.field != "evaluator" else "")
            raise ConfigError(exc.message, file=exc.file or file, field=field) from None
        check_stage_fidelity(stage.fidelity, evaluator_cls, file=file, where=f"stages[{i}]")
