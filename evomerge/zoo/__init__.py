"""The model zoo: tiny, deterministic models built on the spot (nothing is downloaded).

Presets (see :mod:`evomerge.zoo.presets` for the recipes):

* ``tiny``: a character-level Llama base (6 layers) and three experts fine-tuned from it on
  ``add``, ``reverse`` and ``sort`` (a few minutes on 2 CPU cores); the demo's models.
* ``test``: the same structure, much smaller and barely trained (seconds), for the tests.
* ``digits``: two MLPs on scikit-learn's 8x8 digits, ``low`` (0-4) and ``high`` (5-9).

A build is cached under ``$EVOMERGE_CACHE/zoo/<preset>-<hash12>``, where the hash covers
the preset's full spec and :data:`CODE_VERSION`; a changed recipe is a new directory. Each
build goes into a fresh temporary directory beside the target and is renamed into place
when complete, under a file lock, so a reader never sees half a zoo and two processes
building the same preset do the work once; what a killed build left there is removed by the
next build. ``zoo.json`` in the directory is the manifest:
preset, spec, hash, and per model its skill and measured holdout accuracy (plus, for LM
presets, the task-arithmetic figures of the experts).

Model references ``zoo:PRESET/NAME`` (e.g. ``zoo:tiny/add``) resolve through
:func:`resolve_zoo_ref`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, SourceError
from evomerge.fsutil import UMASK, atomic_write_text, cache_dir

# Bump when a code change alters what a build produces (training loop, tokenizer, data).
CODE_VERSION = 5
PRESETS: tuple[str, ...] = ("test", "tiny", "digits")
MANIFEST = "zoo.json"

__all__ = ["CODE_VERSION", "PRESETS", "build_zoo", "list_zoo_models", "resolve_zoo_ref", "zoo_hash"]


def _spec(preset: str) -> Any:
    from evomerge.zoo.presets import PRESET_SPECS

    if preset not in PRESETS:
        raise ConfigError(f"unknown zoo preset '{preset}'; valid: {', '.join(PRESETS)}", field="preset")
    return PRESET_SPECS[preset]


def zoo_hash(preset: str) -> str:
    """12 hex digits identifying a preset's build: its full spec and the code version."""
    from evomerge.zoo.presets import spec_dict

    payload = {"code_version": CODE_VERSION, "preset": preset, "spec": spec_dict(_spec(preset))}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def list_zoo_models(preset: str) -> list[str]:
    """The model names of a preset, e.g. ``["base", "add", "reverse", "sort"]`` for ``tiny``."""
    return list(_spec(preset).model_names())


def build_zoo(
    preset: str, out: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> Path:
    """Build `preset` (or reuse a complete earlier build) and return its directory.

    `out` defaults to ``cache_dir()/zoo/<preset>-<hash12>``. An `out` that holds a build of
    another spec is replaced; an `out` that is something else is refused.
    """
    spec = _spec(preset)
    digest = zoo_hash(preset)
    say = progress or (lambda _msg: None)
    target = Path(out) if out is not None else cache_dir() / "zoo" / f"{preset}-{digest}"
    target = target.expanduser().resolve()
    if _is_build(target, digest):
        say(f"zoo {preset}: reusing {target}")
        _complete_configs(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if _is_build(target, digest):  # another process finished it while we waited
            say(f"zoo {preset}: reusing {target}")
            return target
        if target.exists() and not (target / MANIFEST).is_file() and any(target.iterdir()):
            raise ConfigError(
                f"'{target}' exists and is not a zoo directory; give an empty or new --out",
                field="out",
            )
        _remove_leftovers(target)
        say(f"zoo {preset}: building into {target}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~UMASK)  # the mode a plain mkdir gives (mkdtemp makes 0700)
        try:
            started = time.perf_counter()
            measured = _build_into(preset, spec, tmp, say)
            manifest = {
                "preset": preset,
                "hash": digest,
                "code_version": CODE_VERSION,
                "spec": _spec_json(spec),
                **measured,
                "build_seconds": round(time.perf_counter() - started, 1),
            }
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            _replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    say(f"zoo {preset}: built in {manifest['build_seconds']} s -> {target}")
    return target


def resolve_zoo_ref(ref: str) -> Path:
    """``"tiny/add"`` -> the model directory, building the preset first if needed."""
    preset, _, name = ref.partition("/")
    if preset not in PRESETS:
        raise SourceError(f"unknown zoo preset in 'zoo:{ref}'; valid presets: {', '.join(PRESETS)}")
    names = list_zoo_models(preset)
    if name not in names:
        valid = ", ".join(f"zoo:{preset}/{n}" for n in names)
        raise SourceError(f"unknown zoo model 'zoo:{ref}'; valid: {valid}")
    return build_zoo(preset) / name


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The ``zoo.json`` of a built zoo directory."""
    return json.loads((Path(directory) / MANIFEST).read_text())


# ---- internals --------------------------------------------------------------------------------


def _spec_json(spec: Any) -> dict[str, Any]:
    from evomerge.zoo.presets import spec_dict

    return json.loads(json.dumps(spec_dict(spec)))


def _build_into(preset: str, spec: Any, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from evomerge.zoo import build

    if spec.kind == "digits":
        return build.build_digits(spec, tmp, say)
    return build.build_lm(spec, tmp, say)


def _complete_configs(target: Path) -> None:
    """A build made before config.json was completed (no `architectures`, no dtype) gets the
    missing fields in place: its weights, and so its hash and the results made with it, stay."""
    from evomerge.merge.hfconfig import complete_checkpoint

    for model in read_manifest(target).get("models", {}).values():
        with contextlib.suppress(OSError):  # a read-only cache: what evomerge writes from it is completed anyway
            complete_checkpoint(target / model["path"], missing_only=True)


def _is_build(path: Path, digest: str) -> bool:
    try:
        return read_manifest(path).get("hash") == digest
    except (OSError, ValueError):
        return False


def _remove_leftovers(target: Path) -> None:
    """Remove the temporary directories of builds of `target` that a killed process left
    (`.NAME.tmp-*`, `.NAME.old-*`); called under the build lock, which every builder holds
    while its own exist, so none of them is in use."""
    for prefix in (f".{target.name}.tmp-", f".{target.name}.old-"):
        for name in os.listdir(target.parent):
            leftover = target.parent / name
            if name.startswith(prefix) and len(name) == len(prefix) + 8 and leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def _replace(tmp: Path, target: Path) -> None:
    """Move a finished build into place; an older build there is moved aside, then removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "zoo")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (blocks until free; released on exit or process death)."""
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
