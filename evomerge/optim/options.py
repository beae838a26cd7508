"""Optimizer options: each optimizer declares its options once (default and valid values) as
`Option`s; `check_option` turns a given value into the one the optimizer uses, or refuses it with
one line naming the option and what would be valid. `evomerge.optim.check_options` runs these
checks without building anything (a run checks its stages' options before it loads a model)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from evomerge.errors import ConfigError

Kind = Literal["int", "number", "bool", "str", "path", "mapping", "list", "ints", "any"]


@dataclass(frozen=True)
class Option:
    """One option: its default and what values it takes.

    kind: "int" (an integer; a float with an integer value is read as one), "number" (a finite
    int or float), "bool", "str" (`choices`: the valid strings), "path" (a string or os.PathLike),
    "mapping", "list", "ints" (an int or a list of ints), "any" (objects passed in code).
    low: the smallest valid number (`low_open`: low itself excluded). None is valid where the
    default is None (the option unset)."""

    default: Any = None
    kind: Kind = "any"
    low: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    label: str = ""  # how an unknown choice is named: "unknown {label} 'x'"

    def valid(self) -> str:
        """What a valid value is, in words."""
        words = {
            "int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
            "path": "a path", "mapping": "a mapping", "list": "a list", "ints": "an integer or a list of integers",
            "any": "any value",
        }[self.kind]  # fmt: skip
        if self.choices:
            words = f"one of: {', '.join(self.choices)}"
        if self.low is not None:
            words += f" {'>' if self.low_open else '>='} {_num(self.low)}"
        return words + (" (or null)" if self.default is None and self.kind != "any" else "")


def _num(value: float) -> str:
    return f"{value:g}"


def check_option(name: str, option: Option, value: Any) -> Any:
    """`value` as the optimizer uses it; raises ConfigError(field=name) naming what is valid."""

    def refuse(message: str | None = None) -> ConfigError:
        return ConfigError(message or f"{name} must be {option.valid()}, got {value!r}", field=name)

    if value is None:
        if option.default is None:
            return None
        raise refuse()
    kind = option.kind
    if kind == "any":
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise refuse()
        return value
    if kind in ("str", "path"):
        if kind == "path" and isinstance(value, os.PathLike):
            return value
        if not isinstance(value, str):
            raise refuse()
        if option.choices and value not in option.choices:
            raise refuse(f"unknown {option.label or name} '{value}'; valid: {', '.join(option.choices)}")
        return value
    if kind == "mapping":
        if not isinstance(value, dict):
            raise refuse()
        return value
    if kind == "list":
        if not isinstance(value, list | tuple):
            raise refuse()
        return value
    if kind == "ints":
        if isinstance(value, list | tuple):
            return [check_option(f"{name}[{i}]", Option(1, "int", low=option.low), v) for i, v in enumerate(value)]
        return check_option(name, Option(1, "int", low=option.low), value)
    # numbers
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise refuse()
    if kind == "int":
        if value != int(value):
            raise refuse()
        value = int(value)
    if option.low is not None and (value <= option.low if option.low_open else value < option.low):
        if option.low_open:
            raise refuse(f"{name} must be > {_num(option.low)}, got {value!r}")
        raise refuse(f"{name} must be at least {_num(option.low)}, got {value!r}" if kind == "int" else f"{name} must be >= {_num(option.low)}, got {value!r}")
    return value


def check_all(declared: dict[str, Option], given: dict[str, Any], *, owner: str) -> dict[str, Any]:
    """Every declared option with its default, overridden by the given values, checked; an
    undeclared one is refused naming the valid ones (`owner`: "optimizer 'cmaes'")."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(f"{owner} has no option '{unknown[0]}'; valid: {', '.join(sorted(declared))}", field=unknown[0])
    out = {name: option.default for name, option in declared.items()}
    for name, value in given.items():
        out[name] = check_option(name, declared[name], value)
    return out
