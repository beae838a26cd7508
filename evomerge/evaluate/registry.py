"""Evaluator kinds by name, and `build_evaluator`: a spec's ``kind:`` resolves through
`EVALUATORS` to a lazy ``"module:Class"`` (the kind's module is imported when first used, so
checking a spec of another kind never imports lm-eval or torch). A new kind is one module with an
`Evaluator` subclass (its `spec_model` and capabilities), registered by name::

    register_evaluator("my_kind", "mypackage.scoring:MyEvaluator")   # or the class itself

(from the CLI and on Ray workers too when the registering module is a plugin:
``EVOMERGE_PLUGINS=mypackage.scoring``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evomerge.errors import ConfigError, schema_error
from evomerge.evaluate.base import Evaluator, SpecModel
from evomerge.faults import os_fault
from evomerge.plugins import load_plugins
from evomerge.registry import Registry
from evomerge.resources import find_yaml, read_yaml

EVALUATORS: Registry[Evaluator] = Registry("evaluator kind", Evaluator, field="kind", on_miss=load_plugins)
EVALUATORS.register("lm_eval", "evomerge.evaluate.lmeval:LmEvalEvaluator")
EVALUATORS.register("classification", "evomerge.evaluate.classification:ClassificationEvaluator")
EVALUATORS.register("python", "evomerge.evaluate.pyfunc:PythonEvaluator")


def register_evaluator(name: str, target: str | type[Evaluator], *, replace: bool = False) -> None:
    """Make `name` an evaluator ``kind:`` of specs and experiments: an `Evaluator` subclass (with
    its `spec_model`, whose `kind` field takes `name`) or a lazy ``"package.module:Class"``."""
    EVALUATORS.register(name, target, replace=replace)


def evaluator_class(kind: str, *, file: str | None = None) -> type[Evaluator]:
    """The class of evaluator `kind`; an unknown kind is a ConfigError (field `kind`) listing the
    valid ones."""
    if kind is None:
        raise ConfigError(f"missing; valid: {', '.join(EVALUATORS)}", file=file, field="kind")
    return EVALUATORS.get(kind, file=file)


def load_spec(ref: str | Path | Mapping, overrides: Mapping | None = None) -> tuple[dict, str | None]:
    """The spec mapping and the file it came from (None for a mapping)."""
    file: str | None = None
    if isinstance(ref, Mapping):
        data = dict(ref)
    else:
        path = find_yaml("evaluators", ref, field="evaluator")
        file = str(path)
        try:
            data = read_yaml(path)
        except OSError as err:
            raise os_fault(err, path) from None
        if not isinstance(data, dict):
            raise ConfigError("an evaluator file must be a mapping with a 'kind:' key", file=file)
        data.setdefault("_dir", str(path.parent))
    if overrides:
        data = _merge(data, overrides)
    return data, file


def resolve_spec(ref: str | Path | Mapping, overrides: Mapping | None = None) -> dict:
    """The spec mapping with its overrides applied (what an experiment freezes and the workers
    build their evaluator from)."""
    return load_spec(ref, overrides or None)[0]


def _merge(base: dict, overrides: Mapping) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def check_spec(ref: str | Path | Mapping, overrides: Mapping | None = None) -> type[Evaluator]:
    """The spec's kind and schema, as `build_evaluator` checks them, without building the
    evaluator (no dataset, no lm-eval task lookup): what a run checks before it loads anything.
    Returns the evaluator class (its declared capabilities)."""
    return _validated(ref, overrides)[1]


def _validated(ref: str | Path | Mapping, overrides: Mapping | None) -> tuple[SpecModel, type[Evaluator], str | None, str | None]:
    """(the validated spec, its evaluator class, the file it came from, its directory)."""
    data, file = load_spec(ref, overrides)
    base_dir = data.pop("_dir", None)
    ev_cls = evaluator_class(data.get("kind"), file=file)
    try:
        return ev_cls.spec_model.model_validate(data), ev_cls, file, base_dir
    except ValidationError as err:
        error = schema_error(err, file=file, model=ev_cls.spec_model, specific=True)
        if overrides and error.field and _overridden(error.field, overrides):
            # the user's override is at fault, not the evaluator file: name the override
            raise ConfigError(error.message, field=f"evaluator_overrides.{error.field}") from None
        raise error from None


def _overridden(field: str, overrides: Mapping) -> bool:
    """True when `field` (e.g. "subsample.size", "tasks[0].task") is set by `overrides`."""
    node: Any = overrides
    for part in re.findall(r"[^.\[\]]+", field):
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
    return ev_cls(spec, file=file, base_dir=Path(base_dir) if base_dir else None)
