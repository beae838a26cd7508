"""Cheap fitness: score each candidate on fewer search documents (`fidelity:` of a stage).

A strategy is one module with a `Strategy` subclass (`evomerge.fidelity.base`: the interface),
registered by name here or with `register_strategy`::

    fidelity: full                                    # every document (default)
    fidelity: {strategy: racing, eta: 0.33, first: 0.11}
    fidelity: {strategy: sequential, chunk: 0.1, delta: 0.05}

`check_fidelity` validates a stage's `fidelity:` (one line naming the field); `build_strategy`
makes the strategy for a stage once its documents are known.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from evomerge.errors import ConfigError, pydantic_message
from evomerge.fidelity.base import Member, StageInfo, Strategy, StrategyOptions
from evomerge.plugins import load_plugins
from evomerge.registry import Registry

STRATEGIES: Registry[Strategy] = Registry("fidelity strategy", Strategy, field="fidelity.strategy", on_miss=load_plugins)
STRATEGIES.register("full", "evomerge.fidelity.strategies:Full")
STRATEGIES.register("racing", "evomerge.fidelity.strategies:Racing")
STRATEGIES.register("sequential", "evomerge.fidelity.sequential:Sequential")
STRATEGIES.register("irt", "evomerge.fidelity.irt_strategy:IrtStrategy")

DEFAULT = "full"


def register_strategy(name: str, target: str | type[Strategy], *, replace: bool = False) -> None:
    """Make `name` a fidelity strategy: a `Strategy` subclass or a lazy `"package.module:Class"`."""
    STRATEGIES.register(name, target, replace=replace)


def split_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """(strategy name, options) of a `fidelity:` value: a name, or a mapping with `strategy:`."""
    if spec is None:
        return DEFAULT, {}
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("strategy", DEFAULT)
        return name, options
    raise ConfigError(f"give a strategy name or a mapping with 'strategy:', got {spec!r}", field="fidelity")


def check_fidelity(spec: Any, *, file: str | None = None, where: str = "fidelity") -> tuple[type[Strategy], StrategyOptions]:
    """The strategy class and its validated options; a one-line ConfigError naming the field."""
    try:
        name, options = split_spec(spec)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=file, field=where) from None
    if not isinstance(name, str):
        raise ConfigError(f"strategy must be a name, got {name!r}", file=file, field=f"{where}.strategy")
    cls = STRATEGIES.get(name, file=file, field=f"{where}.strategy")
    try:
        parsed = cls.Options.model_validate(options)
    except ConfigError as exc:  # a nested strategy's options (racing's on_options)
        raise ConfigError(exc.message, file=file, field=f"{where}.{exc.field}" if exc.field else where) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        message = pydantic_message(err)
        if err["type"] == "extra_forbidden":
            valid = ", ".join(cls.Options.model_fields) or "none"
            message = f"unknown option of strategy '{name}'; valid: {valid}"
        raise ConfigError(message, file=file, field=f"{where}.{loc}" if loc else where) from None
    return cls, parsed


def is_full(spec: Any) -> bool:
    """Whether a `fidelity:` value scores every document (today's behaviour)."""
    name, _ = split_spec(spec)
    return STRATEGIES.get(name).FULL


def build_strategy(spec: Any, info: StageInfo) -> Strategy:
    cls, options = check_fidelity(spec)
    return cls(options, info)


__all__ = ["STRATEGIES", "Member", "StageInfo", "Strategy", "StrategyOptions", "build_strategy", "check_fidelity", "is_full", "register_strategy", "split_spec"]
