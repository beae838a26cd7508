"""The SearchSpace contract: a genome (a real vector inside bounds) <-> a merge recipe (or raw
tensors), the schema of a space file (`SpaceSpec`), and the capabilities a kind declares, which
the run, the report and validation read instead of its name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from evomerge.merge.sources import SourcePool


class SpaceSpec(BaseModel):
    """Base of every space file's schema: `kind` (a `Literal` of the kind's name in a subclass),
    no unknown field, every number finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: str

    def check(self, *, file: str | None = None) -> None:
        """Checks beyond the schema that need no model (a PS space: its method's parameters)."""

    def base_needed(self) -> str | None:
        """Why a stage searching this space needs a base model (None: it needs none)."""
        return None


class GeneRange(BaseModel):
    """Bounds of one searched parameter and where the search starts (default: the middle)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


@dataclass(frozen=True)
class Gene:
    """What one coordinate of the genome controls, for `describe()` and reports."""

    name: str
    low: float
    high: float
    init: float
    meaning: str


class SearchSpace(ABC):
    """A box of genomes and a pure, deterministic map from a genome to what it builds.

    `bounds` are real bounds for the optimizer (shape (dim, 2)); `decode` never clamps silently:
    a genome outside the bounds is an error of the caller.

    A kind declares its name (`kind`), its file schema (`spec_model`), `build` (a space from its
    spec and the stage's models) and its capabilities:
    RAW_TENSORS: `decode` gives the raw tensors of the stage's first model (the template), not a
        recipe: candidates travel as tensors, the template must be a buildable model, and
        pre-trained models can be encoded as initial genomes (`initial_models`).
    RECIPE_VIEW: what a report draws of a stage's best recipe: "parameters" (merge parameters per
        model and layer group), "layer_path" (the DFS layer path), or None.
    """

    kind: ClassVar[str] = ""
    spec_model: ClassVar[type[SpaceSpec]] = SpaceSpec
    RAW_TENSORS: ClassVar[bool] = False
    RECIPE_VIEW: ClassVar[Literal["parameters", "layer_path"] | None] = None

    @classmethod
    @abstractmethod
    def build(cls, spec: Any, *, models: list[str], base: str | None, pool: SourcePool, file: str | None) -> SearchSpace:
        """The space of `spec` over the stage's `models` (and `base`), whose sources `pool` opens."""

    def __init__(self, genes: list[Gene]):
        self.genes = genes

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def bounds(self) -> np.ndarray:
        return np.array([[g.low, g.high] for g in self.genes], dtype=np.float64).reshape(-1, 2)

    @property
    def x0(self) -> np.ndarray:
        return np.array([g.init for g in self.genes], dtype=np.float64)

    @abstractmethod
    def decode(self, genome: np.ndarray) -> Any:
        """The recipe (or, for raw weights, the state dict) this genome stands for."""

    def check_genome(self, genome: np.ndarray) -> np.ndarray:
        genome = np.asarray(genome, dtype=np.float64)
        if genome.shape != (self.dim,):
            raise ValueError(f"genome has shape {genome.shape}; this {self.kind} space has {self.dim} genes")
        bounds = self.bounds
        tol = 1e-9 * np.maximum(1.0, np.abs(bounds).max(axis=1))
        outside = (genome < bounds[:, 0] - tol) | (genome > bounds[:, 1] + tol)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(f"gene {i} ({self.genes[i].name}) = {genome[i]} is outside its bounds {list(bounds[i])}")
        return genome

    def describe(self) -> str:
        """A short table: genome size and what each gene controls."""
        lines = [f"{self.kind} space: {self.dim} genes"]
        width = max((len(g.name) for g in self.genes), default=4)
        lines.append(f"{'#':>4}  {'gene':<{width}}  {'low':>7} {'high':>7} {'init':>7}  meaning")
        for i, g in enumerate(self.genes):
            lines.append(f"{i:>4}  {g.name:<{width}}  {g.low:>7.3g} {g.high:>7.3g} {g.init:>7.3g}  {g.meaning}")
        return "\n".join(lines)
