"""Search-space kinds and files (search_spaces/*.yaml).

`SPACES` maps a space file's `kind:` to its `SearchSpace` class, a lazy ``"module:Class"``
imported when first used. The class declares its schema (`spec_model`), how it builds, and its
capabilities (`evomerge.spaces.base`), which validation, the run and the report read instead of
the kind's name. A new kind is one module with a `SpaceSpec` and a `SearchSpace` subclass,
registered by name::

    register_space("my_kind", "mypackage.spaces:MySpace")   # or the class itself

(from the CLI too when the registering module is a plugin: ``EVOMERGE_PLUGINS=mypackage.spaces``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evomerge.errors import ConfigError, schema_error
from evomerge.plugins import load_plugins
from evomerge.registry import Registry
from evomerge.resources import find_yaml, read_yaml
from evomerge.spaces.base import SearchSpace, SpaceSpec

SPACES: Registry[SearchSpace] = Registry("search space kind", SearchSpace, field="kind", on_miss=load_plugins)
SPACES.register("ps", "evomerge.spaces.ps:ParameterSpace")
SPACES.register("dfs", "evomerge.spaces.dfs:DataFlowSpace")
SPACES.register("weights", "evomerge.spaces.weights:WeightsSpace")


def register_space(name: str, target: str | type[SearchSpace], *, replace: bool = False) -> None:
    """Make `name` a space file's ``kind:``: a `SearchSpace` subclass (with its `spec_model`, whose
    `kind` field takes `name`) or a lazy ``"package.module:Class"``."""
    SPACES.register(name, target, replace=replace)


def space_class(kind: str, *, file: str | None = None) -> type[SearchSpace]:
    """The class of space kind `kind`; an unknown kind is a ConfigError (field `kind`) listing the
    valid ones."""
    if not isinstance(kind, str) or not SPACES.find(kind, file=file):
        raise ConfigError(f"kind must be one of: {', '.join(SPACES)}; got {kind!r}", file=file, field="kind")
    return SPACES.get(kind, file=file)


def find_space(kind: str) -> type[SearchSpace] | None:
    """The class of space kind `kind`; None where no such kind can be imported (a stage without a
    space is labelled with its optimizer's name)."""
    try:
        return SPACES.get(kind) if SPACES.find(kind) else None
    except ConfigError:
        return None


def load_space_spec(ref: str | Path | dict, overrides: dict | None = None) -> tuple[SpaceSpec, str | None]:
    """(spec, file it came from) from a built-in name, a path or a mapping, with overrides applied."""
    file = None
    if isinstance(ref, dict):
        data = dict(ref)
    else:
        path = find_yaml("search_spaces", ref)
        file = str(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError("a search space is a mapping (kind, ...)", file=file)
    data.update(overrides or {})
    try:
        spec_model = space_class(data.get("kind"), file=file).spec_model
        try:
            spec = spec_model.model_validate(data)
        except ValidationError as exc:
            raise schema_error(exc, file=file, model=spec_model) from None
        spec.check(file=file)
    except ConfigError as exc:
        # A value the overrides gave (they replace whole top-level keys) is theirs, not the file's:
        # no file, field `space_overrides.FIELD` (the caller names the experiment and the stage).
        if overrides and (exc.field or "").split(".")[0] in overrides:
            raise ConfigError(exc.message, field=f"space_overrides.{exc.field}") from None
        raise
    return spec, file


def space_kind_of(space: str | Path | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> str | None:
    """The kind of a stage's `space` (a name, a path or an inline mapping); None for no space or
    one that cannot be read."""
    if space is None:
        return None
    if isinstance(space, Mapping) and "kind" in space:
        return str(space["kind"])
    try:
        return load_space_spec(dict(space) if isinstance(space, Mapping) else space, dict(overrides or {}) or None)[0].kind
    except Exception:  # whatever is wrong with it, a status or a report shows what it can
        return None
