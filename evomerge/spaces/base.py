"""The SearchSpace kind: a genome (a real vector inside bounds) <-> a merge recipe."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


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
    """

    kind: str = ""

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
