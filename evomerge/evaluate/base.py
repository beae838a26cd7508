"""The Evaluator kind: built once per worker from a YAML spec, called once per candidate.

Worker-side use::

    ev = build_evaluator("zoo_all")              # or a path, or a spec dict from the experiment
    result = ev.evaluate(model, tokenizer, "search", Subset(seed, generation))
    part = ev.evaluate(model, tokenizer, "search", subset, shard=(i, n))   # one of n shards
    whole = EvalResult.combine([part_0, ..., part_n-1])                   # in shard order

A spec is a mapping with a ``kind:`` key (``lm_eval``, ``classification`` or ``python``); the
rest is validated by that kind's pydantic model (unknown keys are errors). Everything costly
(task objects, datasets, prompts, tokenization, batches) is prepared once; `evaluate` runs the
model and the metric code only. `evaluate` never raises for a bad candidate: an exception or a
non-finite objective comes back as `EvalResult.failure` with the message, so the worker goes on.
"""

from __future__ import annotations

import math
import re
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import ConfigError, pydantic_message
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset
from evomerge.resources import find_yaml

SPLITS: tuple[str, ...] = ("search", "holdout")
Split = Literal["search", "holdout"]


class SpecModel(BaseModel):
    """Base of every evaluator spec model: unknown keys are errors, numbers are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Evaluator(ABC):
    """Scores in-memory models; subclasses implement `_evaluate` and `objective_directions`."""

    kind: ClassVar[str]

    def __init__(self, spec: SpecModel, *, file: str | None = None, base_dir: Path | None = None) -> None:
        self.spec = spec
        self.file = file
        self.base_dir = base_dir  # where relative paths of the spec resolve (the YAML's folder)

    @abstractmethod
    def objective_directions(self) -> dict[str, bool]:
        """objective name -> higher is better, in order (the first is the primary objective)."""

    @property
    def primary(self) -> str:
        return next(iter(self.objective_directions()))

    def evaluate(
        self,
        model: Any,
        tokenizer: Any = None,
        split: Split = "search",
        subset: Subset | None = None,
        *,
        shard: tuple[int, int] | None = None,
    ) -> EvalResult:
        """Score `model` on `split` (the documents `subset` selects; one block with `shard`).

        Never raises because of the candidate: failures return `EvalResult.failure`.
        A wrong `split` or `shard` is the caller's bug and raises ValueError.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if shard is not None and not (len(shard) == 2 and shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
        start = time.perf_counter()
        directions = self.objective_directions()
        try:
            result = self._evaluate(model, tokenizer, split, subset, shard)
        except Exception as err:  # the candidate failed (incl. out of memory); the worker goes on
            where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
            at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
            message = " ".join(f"{type(err).__name__}: {err}".split()) + at
            return EvalResult.failure(message, directions, time.perf_counter() - start)
        result.seconds = time.perf_counter() - start
        bad = [name for name, value in result.objectives.items() if not math.isfinite(float(value))]
        if bad and result.error is None:
            return EvalResult.failure(f"objective {', '.join(bad)} is not finite (NaN or inf)", directions, result.seconds)
        missing = [name for name in directions if name not in result.objectives]
        if missing and result.error is None:
            return EvalResult.failure(f"evaluator returned no value for objective {', '.join(missing)}", directions, result.seconds)
        return result

    @abstractmethod
    def _evaluate(
        self, model: Any, tokenizer: Any, split: Split, subset: Subset | None, shard: tuple[int, int] | None
    ) -> EvalResult: ...

    def doc_ids(self, split: Split, subset: Subset | None = None, *, shard: tuple[int, int] | None = None) -> dict[str, list]:
        """Per task, the ids of the documents `evaluate` would score (without running a model)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its documents")

    @staticmethod
    def combine(parts: list[EvalResult]) -> EvalResult:
        """The result of one candidate from its shards (in shard order)."""
        return EvalResult.combine(parts)


def resolve_objectives(
    objectives: Mapping[str, list[str] | Mapping[str, float]] | None,
    tasks: Mapping[str, tuple[float, bool]],
    *,
    primary: str | None = None,
    default_name: str = "score",
    file: str | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """Objective -> {task: weight} and objective -> higher is better, primary first.

    `tasks` maps each task to (its default weight, its metric's direction). An objective lists
    tasks (default weights) or maps them to weights; without `objectives` there is one,
    `default_name`, over every task. The tasks of one objective must agree on the direction.
    """
    groups: dict[str, dict[str, float]] = {}
    spec = dict(objectives) if objectives else {default_name: list(tasks)}
    for name, members in spec.items():
        field = f"objectives.{name}"
        weights = dict(members) if isinstance(members, Mapping) else {t: tasks[t][0] if t in tasks else 0.0 for t in members}
        if not weights:
            raise ConfigError("an objective needs at least one task", file=file, field=field)
        for task, weight in weights.items():
            if task not in tasks:
                raise ConfigError(f"'{task}' is not one of the evaluator's tasks; valid: {', '.join(tasks)}", file=file, field=field)
            if not (isinstance(weight, (int, float)) and weight > 0):
                raise ConfigError(f"weight of '{task}' must be a number > 0, got {weight!r}", file=file, field=field)
        ups = {tasks[t][1] for t in weights}
        if len(ups) > 1:
            raise ConfigError("mixes metrics where higher is better with metrics where lower is better", file=file, field=field)
        groups[name] = {t: float(w) for t, w in weights.items()}
    if primary is not None:
        if primary not in groups:
            raise ConfigError(f"'{primary}' is not an objective; valid: {', '.join(groups)}", file=file, field="primary")
        groups = {primary: groups[primary], **{k: v for k, v in groups.items() if k != primary}}
    directions = {name: tasks[next(iter(w))][1] for name, w in groups.items()}
    return groups, directions


def _kinds() -> dict[str, tuple[type[SpecModel], type[Evaluator]]]:
    from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationSpec
    from evomerge.evaluate.lmeval import LmEvalEvaluator, LmEvalSpec
    from evomerge.evaluate.pyfunc import PythonEvaluator, PythonSpec

    return {
        "lm_eval": (LmEvalSpec, LmEvalEvaluator),
        "classification": (ClassificationSpec, ClassificationEvaluator),
        "python": (PythonSpec, PythonEvaluator),
    }


def _merge(base: dict, overrides: Mapping) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_UNION_TAG = re.compile(r"^[A-Z]\w*$|[\[\]]|^(str|int|float|bool|function-after)$")


def validation_error(err: ValidationError, *, file: str | None, prefix: str = "") -> ConfigError:
    """The most specific pydantic error as a one-line ConfigError naming the field.

    Union members (``str | TaskSpec``) tag their errors with the member's type; those tags are
    dropped from the field path, and an error inside a member (an unknown key of a task
    mapping) wins over "not a string".
    """
    errors = err.errors()

    def path(e: dict) -> tuple[list, list]:
        keep, tags = [], []
        for p in e["loc"]:
            (tags if isinstance(p, str) and _UNION_TAG.search(p) else keep).append(p)
        return keep, tags

    def rank(e: dict) -> tuple[bool, int]:
        return (e["type"].endswith("_type"), -len(e["loc"]))

    first = min(errors, key=rank)
    keep, _ = path(first)
    field = prefix + ".".join(str(p) for p in keep) if keep else (prefix.rstrip(".") or None)
    message = pydantic_message(first)
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required"
    elif first["type"].endswith("_type"):
        same = [e for e in errors if path(e)[0] == keep and e["type"].endswith("_type")]
        tags = [t for e in same for t in path(e)[1]]
        if len(tags) > 1:
            message = f"expected one of: {', '.join(dict.fromkeys(tags))}; got {type(first.get('input')).__name__}"
    return ConfigError(message, file=file, field=field)


def load_spec(ref: str | Path | Mapping, overrides: Mapping | None = None) -> tuple[dict, str | None]:
    """The spec mapping and the file it came from (None for a mapping)."""
    file: str | None = None
    if isinstance(ref, Mapping):
        data = dict(ref)
    else:
        path = find_yaml("evaluators", ref, field="evaluator")
        file = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}", file=file) from None
        except UnicodeDecodeError:
            raise ConfigError("not a text file (not valid UTF-8); an evaluator file is YAML", file=file) from None
        except OSError as err:
            raise ConfigError(f"cannot read it ({err.strerror or err})", file=file) from None
        if not isinstance(data, dict):
            raise ConfigError("an evaluator file must be a mapping with a 'kind:' key", file=file)
        data.setdefault("_dir", str(path.parent))
    if overrides:
        data = _merge(data, overrides)
    return data, file


def check_spec(ref: str | Path | Mapping, overrides: Mapping | None = None) -> None:
    """The spec's kind and schema, as `build_evaluator` checks them, without building the
    evaluator (no dataset, no lm-eval task lookup): what a run checks before it loads anything."""
    _validated(ref, overrides)


def _validated(ref: str | Path | Mapping, overrides: Mapping | None) -> tuple[SpecModel, type[Evaluator], str | None, str | None]:
    """(the validated spec, its evaluator class, the file it came from, its directory)."""
    data, file = load_spec(ref, overrides)
    base_dir = data.pop("_dir", None)
    kinds = _kinds()
    kind = data.get("kind")
    if kind not in kinds:
        got = "missing" if kind is None else f"'{kind}' is not a kind"
        raise ConfigError(f"{got}; valid: {', '.join(kinds)}", file=file, field="kind")
    spec_cls, ev_cls = kinds[kind]
    try:
        return spec_cls.model_validate(data), ev_cls, file, base_dir
    except ValidationError as err:
        error = validation_error(err, file=file)
        if overrides and error.field and _overridden(error.field, overrides):
            # the user's override is at fault, not the evaluator file: name the override
            raise ConfigError(error.message, field=f"evaluator_overrides.{error.field}") from None
        raise error from None


def _overridden(field: str, overrides: Mapping) -> bool:
    """True when the dotted `field` (e.g. "subsample.size", "tasks.0.task") is set by `overrides`."""
    node: Any = overrides
    for part in field.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def build_evaluator(ref: str | Path | Mapping, overrides: Mapping | None = None) -> Evaluator:
    """An evaluator from a built-in name (`evaluators/NAME.yaml`), a YAML path or a spec mapping.

    `overrides` are merged into the spec (nested mappings key by key), e.g.
    ``{"subsample": {"size": 50}}``. Relative paths in a YAML file resolve next to that file.
    Raises ConfigError (one line: file, field, what is valid) for anything invalid, including
    unknown lm-eval tasks, metrics a task does not produce and broken local task folders.
    """
    spec, ev_cls, file, base_dir = _validated(ref, overrides)
    return ev_cls(spec, file=file, base_dir=Path(base_dir) if base_dir else None)  # type: ignore[call-arg]


def import_callable(ref: str, *, file: str | None, field: str, base_dir: Path | None = None) -> Any:
    """`package.module:function`, or `path/to/file.py:function` (relative to `base_dir`)."""
    import importlib
    import importlib.util

    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"'{ref}' is not 'package.module:function' or 'file.py:function'", file=file, field=field)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise ConfigError(f"file '{path}' does not exist", file=file, field=field)
            mod_spec = importlib.util.spec_from_file_location(f"evomerge_user_{path.stem}", path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"cannot import '{module_name}': {' '.join(f'{type(err).__name__}: {err}'.split())}", file=file, field=field) from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"'{module_name}' has no function '{attr}'", file=file, field=field)
    return fn
