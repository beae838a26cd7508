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


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's options with their defaults, checked without building it (unknown
    optimizers and options, wrong types, out-of-range values: a one-line ConfigError whose field
    is `optimizer` or `optimizer.OPTION`)."""
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown optimizer '{name}'; valid: {', '.join(sorted(OPTIMIZERS))}", field="optimizer")
    try:
        return cls.check_options(options)
    except ConfigError as exc:
        exc.field = f"optimizer.{exc.field}" if exc.field else "optimizer"
        raise


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
    options: per optimizer, see `valid_options(name)` and `OPTIONS`; unknown or invalid ones
        are refused (`check_options`).
    """
    check_options(name, options)
    return OPTIMIZERS[name](dim=dim, bounds=bounds, x0=x0, seed=seed, objectives=objectives, **options)


__all__ = [
    "OPTIMIZERS",
    "ArchivePort",
    "Candidate",
    "Optimizer",
    "check_options",
    "load_state",
    "make_optimizer",
    "save_state",
    "valid_options",
]
