"""Built-in YAML instances (search spaces, evaluators, experiments) looked up by name.

They live in the repository's top-level folders; an installed wheel carries them under
`<prefix>/share/evomerge/`. A name is a file stem (`ps_ties`), a path is used as given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from evomerge.errors import ConfigError

KINDS = ("search_spaces", "evaluators", "experiments")


def builtin_dir(kind: str) -> Path:
    repo = Path(__file__).resolve().parents[1] / kind
    if repo.is_dir():
        return repo
    return Path(sys.prefix) / "share" / "evomerge" / kind


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
