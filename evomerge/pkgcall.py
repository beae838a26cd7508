"""Packages that are also API functions: `evomerge.run` and `evomerge.merge` are packages, and once
one of their submodules is imported, Python binds the package to its name in `evomerge`'s
namespace, the place of the API's `run` and `merge` functions (`evomerge.api`). So each of these
packages, called, is that function (`callable_package`); as a package it is unchanged."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class _CallablePackage(ModuleType):
    _call_target = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, attr = self._call_target.partition(":")
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)


def callable_package(name: str, target: str) -> None:
    """Make the imported package `name` callable as `target` (``"package.module:function"``,
    imported when first called)."""
    package = sys.modules[name]
    package.__class__ = _CallablePackage
    package._call_target = target  # type: ignore[attr-defined]
