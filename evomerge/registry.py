"""Name -> class tables whose entries are imported when first used (as lm-eval's registry and
Optuna's samplers): the built-ins are `"module:Class"` strings, so listing the names or checking
one imports nothing; a user adds their own from code (`register`), and a YAML `name:`/`kind:`
resolves through the same table. An unknown name is one line listing the valid ones.

A name not registered yet first makes the registry call its `on_miss` (the plugin loader,
`evomerge.plugins.load_plugins`: the modules of ``EVOMERGE_PLUGINS`` and the entry points),
so a plugin module that registers its classes at import serves the CLI and every worker."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from evomerge.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """`what` names the entries in errors ("optimizer"); every class is a subclass of `base`;
    `field` is where an unknown name is reported ("optimizer", "kind"); `on_miss` is called once
    per unknown name before it is refused (it may register more)."""

    def __init__(self, what: str, base: type, *, field: str, on_miss: Callable[[], None] | None = None) -> None:
        self.what = what
        self.base = base
        self.field = field
        self.on_miss = on_miss
        self._entries: dict[str, str | type[T]] = {}
        self._loaded: dict[str, type[T]] = {}

    def register(self, name: str, target: str | type[T], *, replace: bool = False) -> None:
        """Add `name` -> a class or a lazy `"package.module:Class"`; a name taken by another entry
        needs `replace=True`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name is a non-empty string, got {name!r}")
        if isinstance(target, str):
            module, sep, attr = target.partition(":")
            if not (sep and module and attr):
                raise ValueError(f"{self.what} '{name}': '{target}' is not 'package.module:Class'")
        elif not (isinstance(target, type) and issubclass(target, self.base)):
            raise TypeError(f"{self.what} '{name}': {target!r} is not a subclass of {self.base.__name__}")
        old = self._entries.get(name)
        if old is not None and old != target and not replace:
            raise ValueError(f"{self.what} '{name}' is already registered ({old}); pass replace=True to replace it")
        self._entries[name] = target
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def unknown(self, name: object) -> str:
        """The one-line message for a name that is not registered."""
        return f"unknown {self.what} '{name}'; valid: {', '.join(self._entries)}"

    def find(self, name: str, *, file: str | None = None, field: str | None = None) -> bool:
        """Whether `name` is registered, after the plugins are loaded when it is not (a plugin
        that fails to import is a ConfigError naming it)."""
        if isinstance(name, str) and name not in self._entries and self.on_miss is not None:
            try:
                self.on_miss()
            except ValueError as exc:  # the plugin loader's one-line error
                raise ConfigError(str(exc), file=file, field=field or self.field) from None
        return name in self._entries

    def get(self, name: str, *, file: str | None = None, field: str | None = None) -> type[T]:
        """The class registered as `name` (imported on first use); a ConfigError listing the valid
        names when there is none."""
        if not self.find(name, file=file, field=field):
            raise ConfigError(self.unknown(name), file=file, field=field or self.field)
        entry = self._entries[name]
        if name in self._loaded:
            return self._loaded[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(
                    f"{self.what} '{name}' ({entry}) cannot be imported: {' '.join(f'{type(exc).__name__}: {exc}'.split())}",
                    file=file,
                    field=field or self.field,
                ) from None
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise ConfigError(f"{self.what} '{name}' ({entry}) is not a subclass of {self.base.__name__}", file=file, field=field or self.field)
            entry = cls
        self._loaded[name] = entry
        return entry
