"""Model directories evomerge writes (`merge --out`, `export --out`, a run's stage best models,
`best/model`, M2N2 archive members, weights exports) never take away what evomerge did not write.

What happens to the target directory:

- missing, or an empty directory: the model is written there;
- a directory evomerge wrote before (its manifest `.evomerge-files.json` lists the files it
  wrote): those files are replaced, the ones the new model no longer has (old shards) are
  removed, and every other file stays;
- any other non-empty directory: refused (ConfigError), unless `force`: then the model's files
  are written into it, replacing files of the same names, and nothing else is removed;
- an existing file, or the directory of one of the merge's sources: refused.

The files are written into a staging directory first (`.NAME.evomerge-stage-XXXXXXXX` beside a
missing target, which is then renamed into place whole; `.evomerge-stage-XXXXXXXX` inside an
existing one, whose files are then moved in one by one under an exclusive lock on the target, so
two writers to one directory take turns). A failure while writing removes the staging directory
and leaves the target as it was. Each staging directory is held with `flock` by the process that
writes it; one that can be locked belongs to a dead process (kill -9) and is removed by the
next write to the same place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from evomerge.errors import ConfigError, EvomergeError, EvomergeWarning
from evomerge.fsutil import UMASK, atomic_write_text
from evomerge.resources import read_yaml

MANIFEST = ".evomerge-files.json"
STAGE = "evomerge-stage-"
_STAGE_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp appends
# Weight files of a directory that an evomerge from before the manifest wrote (found by its
# mergekit_config.yml or model card): the ones a new write removes when it does not write them.
_LEGACY_WEIGHTS = re.compile(r"model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors")
_PICKLE_WEIGHTS = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin(\.index\.json)?")


def check_target(target: str | Path, force: bool = False) -> None:
    """Raise ConfigError if a model may not be written to `target` (see the module docstring);
    nothing is written. Callers check before any work; `model_dir_writer` checks again."""
    _claim(Path(target), force)


def owned_files(target: str | Path) -> set[str] | None:
    """The files evomerge wrote in `target` (names), or None when it is not evomerge's."""
    target = Path(target)
    try:
        data = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError:
        return _legacy_files(target)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "evomerge" or not isinstance(data.get("files"), list):
        return None
    return {name for name in data["files"] if _plain_name(name)}


@contextlib.contextmanager
def model_dir_writer(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without an error its files become
    the model in `target` as the module docstring says, otherwise it is removed and `target`
    stays as it was. Stale staging directories of dead writers are removed first."""
    target = Path(target)
    _claim(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fs_error(exc, target.parent) from None
    remove_stale_staging(target)
    inside = target.is_dir()
    stage, fd = _new_stage(target if inside else target.parent, f".{STAGE}" if inside else f".{target.name}.{STAGE}")
    try:
        yield stage
        _install(stage, target, force)
    finally:
        try:
            if os.path.lexists(stage):
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)


def remove_stale_staging(target: str | Path) -> list[Path]:
    """Remove the staging directories of `target` whose writer is gone (their lock can be
    taken); returns them. A live writer's (locked) and anything not named like one are kept."""
    target = Path(target)
    places = [(target.parent, f".{target.name}.{STAGE}")]
    if target.is_dir():
        places.append((target, f".{STAGE}"))
    removed = []
    for place, prefix in places:
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(prefix) and _STAGE_SUFFIX.fullmatch(entry.name[len(prefix) :]):
                if entry.is_dir(follow_symlinks=False) and _remove_if_abandoned(Path(entry.path)):
                    removed.append(Path(entry.path))
    return removed


# ---- internals --------------------------------------------------------------------------------


def _claim(target: Path, force: bool) -> set[str]:
    """The files of an earlier evomerge write that a new one may replace or remove (empty for a
    new, empty or --force'd directory); raises ConfigError when the target is refused."""
    if target.exists() and not target.is_dir():
        raise ConfigError("exists and is not a directory; give a directory for the model (a new or empty one)", file=str(target))
    if not target.exists():
        above = next((p for p in target.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ConfigError(f"'{above}' is a file, not a directory; give a directory for the model", file=str(target))
        return set()
    try:
        entries = [name for name in os.listdir(target) if not name.startswith(f".{STAGE}")]
    except OSError as exc:
        raise _fs_error(exc, target) from None
    if not entries:
        return set()
    owned = owned_files(target)
    if owned is not None:
        return owned
    if force:
        return set()
    raise ConfigError(
        "the directory is not empty and evomerge did not write it; pass --force to write the model into it "
        "(files of the same names are replaced, nothing is removed) or choose an empty or new directory",
        file=str(target),
    )


def _legacy_files(target: Path) -> set[str] | None:
    """A model directory written before the manifest existed: found by evomerge's block in its
    mergekit_config.yml or by its model card; its weight files are evomerge's."""
    try:
        config = read_yaml(target / "mergekit_config.yml")
        ours = isinstance(config, dict) and "evomerge" in config
    except (OSError, EvomergeError):
        ours = False
    if not ours:
        try:
            with open(target / "README.md", encoding="utf-8", errors="replace") as handle:
                head = handle.read(400)
        except OSError:
            return None
        ours = head.startswith("---\n") and ("tags: [merge, evomerge" in head or "tags: [evomerge" in head)
    if not ours:
        return None
    return {name for name in os.listdir(target) if _LEGACY_WEIGHTS.fullmatch(name) and (target / name).is_file()}


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name and "\0" not in name


def _install(stage: Path, target: Path, force: bool) -> None:
    """Make the staged files the model in `target`: rename the whole directory into a missing
    target; otherwise move the files in one by one under the target's lock."""
    files = sorted(os.listdir(stage))
    for name in files:
        if not (stage / name).is_file() or not _plain_name(name):
            raise RuntimeError(f"a model directory holds files only, not '{name}'")
    if not target.exists():
        _write_manifest(stage, files)
        try:
            os.rename(stage, target)  # also replaces a directory that appeared empty meanwhile
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise _fs_error(exc, target) from None
            (stage / MANIFEST).unlink()  # the target appeared meanwhile: treat it as existing
    with _locked(target):
        old = _claim(target, force)
        for name in files:
            if (target / name).is_dir() and not (target / name).is_symlink():
                raise ConfigError(f"holds a directory named '{name}', a file of the model; move it away", file=str(target))
        try:
            _write_manifest(target, sorted(old | set(files)))  # a crash from here on leaves all of them listed
            for name in files:
                os.replace(stage / name, target / name)
            for name in sorted(old - set(files)):
                path = target / name
                if path.is_symlink() or path.is_file():
                    path.unlink()
            _write_manifest(target, files)
        except OSError as exc:
            raise _fs_error(exc, target) from None
        _warn_foreign_weights(target, files)


def _warn_foreign_weights(target: Path, files: list[str]) -> None:
    """After a --force write: weight files of another layout that stay beside the model (a
    loader may pick them instead, e.g. the user's model.safetensors over our shards)."""
    others = sorted(
        name for name in os.listdir(target)
        if name not in files and (_LEGACY_WEIGHTS.fullmatch(name) or _PICKLE_WEIGHTS.fullmatch(name))
    )
    if others:
        warnings.warn(
            f"{target}: weight files evomerge did not write stay beside the model ({', '.join(others)}); "
            "a loader may read them instead: move them away",
            EvomergeWarning,
            stacklevel=2,
        )


def _write_manifest(directory: Path, files: list[str]) -> None:
    text = json.dumps({"written_by": "evomerge", "files": files}, indent=2) + "\n"
    atomic_write_text(directory / MANIFEST, text)


def _new_stage(place: Path, prefix: str) -> tuple[Path, int]:
    """A fresh staging directory in `place`, with the mode a plain mkdir gives, locked by this
    process: (path, descriptor holding the lock)."""
    while True:
        try:
            stage = Path(tempfile.mkdtemp(prefix=prefix, dir=place))
            fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # removed by another writer's clean-up before we locked it
            continue
        except OSError as exc:
            raise _fs_error(exc, place) from None
        _flock(fd, blocking=True)
        try:
            same = os.stat(stage, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.chmod(stage, 0o777 & ~UMASK)  # mkdtemp makes 0700
            return stage, fd
        os.close(fd)


def _remove_if_abandoned(stage: Path) -> bool:
    """Remove a staging directory when its lock can be taken (its writer is gone)."""
    try:
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.getuid() or not _flock(fd, blocking=False):
            return False
        if os.stat(stage, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        shutil.rmtree(stage, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _flock(fd: int, *, blocking: bool) -> bool:
    """Take an exclusive flock; False when it is held elsewhere or the file system has none
    (a staging directory that cannot be locked is never taken for abandoned)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on an existing directory (waits for another writer to finish)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _fs_error(exc, directory) from None
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)


def _fs_error(exc: OSError, path: Path) -> ConfigError:
    return ConfigError(f"cannot write the model there: {exc.strerror or exc}", file=str(path))
