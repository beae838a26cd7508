"""Plugins: modules that register merge methods, optimizers, evaluator kinds or model kinds
from outside the core. A registry loads them when it is asked for a name it does not know:
evomerge's own plugins (`BUILTIN_PLUGINS`: the zoo's model kinds), the modules named in the
environment variable `EVOMERGE_PLUGINS` (comma-separated module names or `.py` file paths; set it
for Ray workers too), then the entry points of the groups `evomerge.plugins` and
`evomerge.methods` (a package declares `[project.entry-points."evomerge.plugins"] name =
"package.module"`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLUGINS_ENV = "EVOMERGE_PLUGINS"
# Registering functions ("module:function") of the parts of evomerge the core does not import;
# called on every load (registering the same entries again is no change), so a registry's table
# that was replaced (a test's copy) is filled again.
BUILTIN_PLUGINS = ("evomerge.zoo.kinds:register",)
ENTRY_POINT_GROUPS = ("evomerge.plugins", "evomerge.methods")
_plugins_loaded: set[str] = set()


def load_plugins() -> None:
    """Register evomerge's own plugins (`BUILTIN_PLUGINS`), then import the plugin modules not
    imported yet: those of ``EVOMERGE_PLUGINS`` (module names or ``.py`` paths, comma-separated),
    then the entry points of ``ENTRY_POINT_GROUPS``. A plugin that fails to import is a
    ValueError naming it."""
    # importlib.metadata only when a name is not known (importing it and scanning cost time)
    from importlib.metadata import entry_points

    for ref in BUILTIN_PLUGINS:
        module, _, function = ref.partition(":")
        getattr(importlib.import_module(module), function)()
    for ref in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        _import_plugin(ref, lambda ref=ref: _import_module(ref))
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            _import_plugin(f"{ep.name} ({ep.value})", ep.load)


def _import_plugin(label: str, load: Callable[[], Any]) -> None:
    if label in _plugins_loaded:
        return
    _plugins_loaded.add(label)
    try:
        load()
    except Exception as exc:
        raise ValueError(f"plugin {label} failed to import: {type(exc).__name__}: {exc}") from exc


def _import_module(ref: str) -> Any:
    if not ref.endswith(".py"):
        return importlib.import_module(ref)
    path = Path(ref).expanduser().resolve()
    name = f"evomerge_plugin_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module
