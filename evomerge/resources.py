"""Built-in YAML instances (search spaces, evaluators, experiments) looked up by name.

They ship inside the package, in `evomerge/_builtin/` (found with `importlib.resources`, so from
any working directory, editable install or wheel); the repository's top-level folders are their
source. A name is a file stem (`ps_ties`), a path is used as given: a path first, then the
built-ins.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError

KINDS = ("search_spaces", "evaluators", "experiments")


def builtin_dir(kind: str) -> Path:
    """The folder of built-in `kind` files inside the installed package (pip installs a wheel
    unpacked, so it is a real folder that lm-eval can read task folders from)."""
    return Path(str(files("evomerge._builtin") / kind))


def builtin_names(kind: str) -> list[str]:
    folder = builtin_dir(kind)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_yaml(kind: str, name_or_path: str | Path, *, field: str | None = None, file: str | None = None) -> Path:
    """A built-in name or a path to a YAML file; a clear error listing the built-ins otherwise."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in text:
        if path.is_file():
            return path
        raise ConfigError(f"file '{text}' does not exist", file=file, field=field)
    candidate = builtin_dir(kind) / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(builtin_names(kind)) or "none"
    raise ConfigError(f"no built-in {kind.replace('_', ' ')} named '{text}'; built-in: {names}", file=file, field=field)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a file that is not UTF-8 text or not valid YAML is one line naming it
    (the recipe, experiment and search-space readers share this)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a text file (byte {exc.start} is not UTF-8); expected YAML", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc.__class__.__name__}: {' '.join(str(exc).split())})", file=str(path)) from None
