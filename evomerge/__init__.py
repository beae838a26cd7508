"""evomerge: evolutionary search for model-merge recipes.

The Python API (`evomerge.api`) is re-exported here: `Experiment`, `run`, `resume`, `Run`,
`merge`, `Recipe`, `python_evaluator` and the `register_*` functions. They are imported on first
use (module `__getattr__`), so `import evomerge` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.api import (
        ConfigError,
        EvomergeError,
        Experiment,
        Exported,
        Recipe,
        Run,
        merge,
        merge_method,
        python_evaluator,
        register_evaluator,
        register_function,
        register_method,
        register_model_kind,
        register_optimizer,
        register_space,
        resume,
        run,
    )

__all__ = [
    "ConfigError",
    "EvomergeError",
    "Experiment",
    "Exported",
    "Recipe",
    "Run",
    "merge",
    "merge_method",
    "python_evaluator",
    "register_evaluator",
    "register_function",
    "register_method",
    "register_model_kind",
    "register_optimizer",
    "register_space",
    "resume",
    "run",
]


def __getattr__(name: str) -> Any:
    if name in ("run", "merge"):  # the packages, which called are the API's functions (`evomerge.pkgcall`)
        return importlib.import_module(f"evomerge.{name}")
    if name in __all__:
        from evomerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
