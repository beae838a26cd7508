"""Search-space files (search_spaces/*.yaml): one schema per kind, checked before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from evomerge.errors import ConfigError
from evomerge.recipe import DTYPES
from evomerge.resources import find_yaml


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML ({exc})".replace("\n", " "), file=file) from None
    data.update(overrides or {})
    try:
        return _ADAPTER.validate_python(data), file
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in ("ps", "dfs", "weights"):
            loc = loc[1:]
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        if err["type"] == "union_tag_invalid" or (err["type"] == "union_tag_not_found"):
            message, loc = "kind must be one of: ps, dfs, weights", ["kind"]
        raise ConfigError(message, file=file, field=".".join(loc) or None) from None
