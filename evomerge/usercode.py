"""Code a user registers from Python in this process (a notebook, a test, an application) and
that Ray workers, other processes, must see too.

- Scoring functions for the `python` evaluator kind: `register_function(fn)` names a function, and
  a spec's ``callable:`` may give that name instead of a ``module:function`` path (the frozen
  experiment then holds the name; a resume in a new process registers the function again).
- Registrations made through `evomerge.api` (evaluator kinds, merge methods, model kinds,
  optimizers) are recorded with `record`, to be replayed.

`worker_evaluator(spec)` is what a run hands its worker pool as the evaluator: the spec itself
when nothing was registered from code, else a `WorkerSetup`, which Ray pickles with cloudpickle
(a function defined in `__main__` or a notebook travels by value) and which, called in the
worker, replays the registrations and then builds the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FUNCTIONS: dict[str, Callable[..., Any]] = {}
_RECORDED: list[tuple[Callable[..., Any], tuple, dict[str, Any]]] = []


def register_function(fn: Callable[..., Any], name: str | None = None) -> str:
    """Make `fn` a ``callable:`` of `python` evaluator specs under `name` (default
    ``module.qualname``, e.g. ``__main__.accuracy``); returns the name. Registering a name again
    replaces its function (a notebook cell run twice)."""
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    name = name or f"{getattr(fn, '__module__', None) or 'function'}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    if ":" in name:
        raise ValueError(f"a function's name has no ':' (that is a module path), got {name!r}")
    FUNCTIONS[name] = fn
    return name


def record(register: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `register(*args, **kwargs)` and remember it, to be replayed (with ``replace=True``) in
    every Ray worker of a run started later from this process."""
    out = register(*args, **kwargs)
    remember(register, *args, **kwargs)
    return out


def remember(register: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Remember a registration already made, to be replayed as `record` says."""
    _RECORDED.append((register, args, {**kwargs, "replace": True}))


def named_functions(data: Any) -> Any:
    """A copy of an experiment or evaluator mapping where every ``callable:`` given as a Python
    function is registered (`register_function`) and replaced by its name."""
    if isinstance(data, Mapping):
        return {
            key: register_function(value) if key == "callable" and callable(value) else named_functions(value)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [named_functions(item) for item in data]
    return data


@dataclass(frozen=True)
class WorkerSetup:
    """A zero-argument evaluator factory (`evomerge.run.worker_core.evaluator_or_factory`) that
    first registers, in the worker's process, what the driver's process registered from code."""

    spec: dict[str, Any]
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    recorded: tuple[tuple[Callable[..., Any], tuple, dict[str, Any]], ...] = ()

    def __call__(self) -> Any:
        from evomerge.evaluate import build_evaluator  # the evaluator kinds import their libraries

        FUNCTIONS.update(self.functions)
        for register, args, kwargs in self.recorded:
            register(*args, **kwargs)
        return build_evaluator(self.spec)


def worker_evaluator(spec: dict[str, Any]) -> dict[str, Any] | WorkerSetup:
    """What a worker pool builds its evaluator from: `spec`, or a `WorkerSetup` when the spec names
    a registered function or anything was registered from code (module docstring)."""
    name = spec.get("callable") if isinstance(spec, Mapping) else None
    functions = {name: FUNCTIONS[name]} if isinstance(name, str) and name in FUNCTIONS else {}
    if not functions and not _RECORDED:
        return spec
    return WorkerSetup(spec, functions, tuple(_RECORDED))
