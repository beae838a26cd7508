"""Ask/tell optimizers: cmaes (pycma), optuna (tpe, cmaes, nsgaii, random), m2n2, random, grid.

Build one with `make_optimizer`; the contract every optimizer follows, and the capabilities it
declares (`Optimizer.MULTI_OBJECTIVE`, `searches_space`, ...), are in `evomerge.optim.base`. A new
optimizer is one module with an `Optimizer` subclass, registered by name::

    register_optimizer("my_es", "mypackage.es:MyES")   # or the class itself

after which an experiment's `optimizer: {name: my_es, ...}` uses it (from the CLI and on Ray
workers too when the registering module is a plugin: ``EVOMERGE_PLUGINS=mypackage.es``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.state import load_state, save_state
from evomerge.plugins import load_plugins
from evomerge.registry import Registry

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", Optimizer, field="optimizer", on_miss=load_plugins)
OPTIMIZERS.register("cmaes", "evomerge.optim.cmaes:CMAES")
OPTIMIZERS.register("grid", "evomerge.optim.simple:GridSearch")
OPTIMIZERS.register("m2n2", "evomerge.optim.m2n2:M2N2")
OPTIMIZERS.register("optuna", "evomerge.optim.optuna_study:OptunaSearch")
OPTIMIZERS.register("random", "evomerge.optim.simple:RandomSearch")


def register_optimizer(name: str, target: str | type[Optimizer], *, replace: bool = False) -> None:
    """Make `name` an optimizer of experiments and `make_optimizer`: an `Optimizer` subclass or a
    lazy `"package.module:Class"` (imported when first used)."""
    OPTIMIZERS.register(name, target, replace=replace)


def optimizer_class(name: str) -> type[Optimizer]:
    """The class registered as `name`; an unknown name is a ConfigError listing the valid ones."""
    return OPTIMIZERS.get(name)


def pareto_optimizers() -> list[str]:
    """The registered optimizers that can search a Pareto front (`multi_objective: true`)."""
    out = []
    for name in OPTIMIZERS:
        try:
            if OPTIMIZERS.get(name).MULTI_OBJECTIVE:
                out.append(name)
        except ConfigError:  # a user entry that does not import is no help here
            continue
    return out


def valid_options(name: str) -> list[str]:
    cls = optimizer_class(name)
    return sorted({**cls.COMMON_OPTIONS, **cls.OPTIONS})


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's options with their defaults, checked without building it (unknown
    optimizers and options, wrong types, out-of-range values, a Pareto search by an optimizer of
    one objective: a one-line ConfigError whose field is `optimizer` or `optimizer.OPTION`)."""
    cls = optimizer_class(name)
    try:
        checked = cls.check_options(options)
        if checked["multi_objective"] and not cls.MULTI_OBJECTIVE:
            raise ConfigError(
                f"optimizer '{name}' optimizes one objective; for a Pareto search use {', '.join(pareto_optimizers())}",
                field="multi_objective",
            )
        return checked
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
    return optimizer_class(name)(dim=dim, bounds=bounds, x0=x0, seed=seed, objectives=objectives, **options)


__all__ = [
    "OPTIMIZERS",
    "Candidate",
    "Optimizer",
    "check_options",
    "load_state",
    "make_optimizer",
    "optimizer_class",
    "pareto_optimizers",
    "register_optimizer",
    "save_state",
    "valid_options",
]
