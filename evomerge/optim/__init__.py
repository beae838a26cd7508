"""Ask/tell optimizers: cmaes (pycma), optuna (tpe, cmaes, nsgaii, random), m2n2, random, grid.

Build one with `make_optimizer`; the contract every optimizer follows is in `evomerge.optim.base`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.cmaes import CMAES
from evomerge.optim.m2n2 import M2N2, ArchivePort
from evomerge.optim.optuna_study import OptunaSearch
from evomerge.optim.simple import GridSearch, RandomSearch
from evomerge.optim.state import load_state, save_state

OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (CMAES, OptunaSearch, M2N2, RandomSearch, GridSearch)
}


def valid_options(name: str) -> list[str]:
    cls = OPTIMIZERS[name]
    return sorted({**cls.COMMON_OPTIONS, **cls.OPTIONS})


def make_optimizer(
    name: str,
    *,
    dim: int,
    bounds: Any,
    x0: np.ndarray | list[float] | None,
    seed: int,
    objectives: dict[str, bool],
    **options: Any,
) -> Optimizer:
    """An optimizer by name.

    dim, bounds, x0: from the search space (bounds: `(lower, upper)` or `[dim, 2]` pairs).
    seed: the experiment's seed; every random draw of the optimizer derives from it.
    objectives: every objective of the evaluator, name -> higher_is_better; the optimized one
        is the first unless the option `objective` names another (`multi_objective: true` for a
        Pareto search, where the optimizer can do it).
    options: per optimizer, see `valid_options(name)`; unknown ones are refused.
    """
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown optimizer '{name}'; valid: {', '.join(sorted(OPTIMIZERS))}", field="optimizer")
    unknown = sorted(set(options) - set(valid_options(name)))
    if unknown:
        raise ConfigError(
            f"optimizer '{name}' has no option '{unknown[0]}'; valid: {', '.join(valid_options(name))}",
            field=f"optimizer.{unknown[0]}",
        )
    return cls(dim=dim, bounds=bounds, x0=x0, seed=seed, objectives=objectives, **options)


__all__ = [
    "OPTIMIZERS",
    "ArchivePort",
    "Candidate",
    "Optimizer",
    "load_state",
    "make_optimizer",
    "save_state",
    "valid_options",
]
