"""Search-space files (search_spaces/*.yaml): one schema per kind, checked before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from evomerge.errors import ConfigError, schema_error
from evomerge.merge.specs import find_spec, unknown_method
from evomerge.recipe import DTYPES, check_setting
from evomerge.resources import find_yaml, read_yaml

KINDS = ("ps", "dfs", "weights")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GeneRange(_Spec):
    """Bounds of one searched parameter and where the search starts (default: the middle)."""

    low: float
    high: float
    init: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> GeneRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init ({self.init}) must lie in [{self.low}, {self.high}]")
        return self

    @property
    def start(self) -> float:
        return self.init if self.init is not None else (self.low + self.high) / 2


class PSSpec(_Spec):
    kind: Literal["ps"]
    method: str
    genes: dict[str, GeneRange] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    layer_groups: int = Field(1, ge=1)
    smooth: bool = False
    filters: list[str] = Field(default_factory=list)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    seed: int = 0

    @model_validator(mode="after")
    def _smooth_needs_anchors(self) -> PSSpec:
        if self.smooth and self.layer_groups < 2:
            raise ValueError("smooth: true needs layer_groups >= 2 (the gradient's anchor points)")
        return self


class DFSSpec(_Spec):
    kind: Literal["dfs"]
    repeats: int = Field(1, ge=1)
    scales: Literal["matrix", "per_slot"] = "per_slot"
    scale_range: GeneRange = GeneRange(low=0.5, high=2.0, init=1.0)
    pin_ends: bool = False
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _positive_scales(self) -> DFSSpec:
        if self.scale_range.low <= 0:
            raise ValueError(
                f"scale_range.low: input scales must be > 0 (the exported path divides by their product), got {self.scale_range.low}"
            )
        return self


class WeightsSpec(_Spec):
    kind: Literal["weights"]
    bound: float | None = Field(None, gt=0)
    init: Literal["model", "zeros"] = "model"


SpaceSpec = Annotated[PSSpec | DFSSpec | WeightsSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter = TypeAdapter(SpaceSpec)


def load_space_spec(ref: str | Path | dict, overrides: dict | None = None) -> tuple[PSSpec | DFSSpec | WeightsSpec, str | None]:
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
        try:
            spec = _ADAPTER.validate_python(data)
        except ValidationError as exc:
            if exc.errors()[0]["type"] in ("union_tag_invalid", "union_tag_not_found"):
                raise ConfigError(f"kind must be one of: {', '.join(KINDS)}", file=file, field="kind") from None
            raise schema_error(exc, file=file, skip=KINDS) from None
        if isinstance(spec, PSSpec):
            check_ps_spec(spec, file=file)
    except ConfigError as exc:
        # A value the overrides gave (they replace whole top-level keys) is theirs, not the file's:
        # no file, field `space_overrides.FIELD` (the caller names the experiment and the stage).
        if overrides and (exc.field or "").split(".")[0] in overrides:
            raise ConfigError(exc.message, field=f"space_overrides.{exc.field}") from None
        raise
    return spec, file


def check_ps_spec(spec: PSSpec, *, file: str | None = None) -> None:
    """A PS space against its method's declared parameters (`evomerge.merge.specs`): genes are
    numeric parameters that have an effect, with bounds valid for the parameter (density in
    [0, 1], t in [0, 1], every bound finite); fixed values are valid settings. Needs no model."""
    try:
        method = find_spec(spec.method)
    except ValueError as exc:  # a plugin that fails to import
        raise ConfigError(str(exc), file=file, field="method") from None
    if method is None:
        raise ConfigError(unknown_method(spec.method), file=file, field="method")
    valid = ", ".join(sorted(p.name for p in (*method.model_params, *method.global_params)))
    for name, rng in spec.genes.items():
        param = method.param(name)
        field = f"genes.{name}"
        if param is None:
            raise ConfigError(f"method '{method.name}' has no parameter '{name}'; valid: {valid}", file=file, field=field)
        if param.kind != "number":
            raise ConfigError(f"{name} is {param.valid}, not a number to search; set it under fixed:", file=file, field=field)
        if param.inert:
            raise ConfigError(f"{name} has no effect in method '{method.name}' ({param.doc}); search another parameter", file=file, field=field)
        ends = {"low": rng.low, "high": rng.high}
        if name == "weight" and spec.allow_negative_weights and rng.low >= 0:
            ends["low"] = -rng.high  # what the space searches (see ParameterSpace)
        for end, value in ends.items():
            if problem := param.problem(value):
                raise ConfigError(f"the bounds must be valid values: {problem}", file=file, field=f"{field}.{end}")
    for name, value in spec.fixed.items():
        param = method.param(name)
        if param is None:
            raise ConfigError(f"method '{method.name}' has no parameter '{name}'; valid: {valid}", file=file, field=f"fixed.{name}")
        check_setting(value, param, file=file, field=f"fixed.{name}")
