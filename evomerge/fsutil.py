"""Files that matter are written atomically: a temp file beside the target, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Root of evomerge's caches (zoo builds, source hashes, the mergekit venv of benchmarks)."""
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Read once at import: os.umask() can only be read by setting it, which is racy in threads.
UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result and move it over `path` in one step."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            write(tmp_path)
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            # mkstemp creates 0600; give the file the permissions a plain open() would have.
            os.chmod(tmp_path, 0o666 & ~UMASK)
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
    except OSError as exc:  # a full disk, permissions: the error names the file, not its temp file
        if exc.filename is None or Path(str(exc.filename)).name.startswith(f".{path.name}."):
            exc.filename = str(path)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
