"""One error path for file faults: a damaged, unreadable or unwritable file becomes an
`EvomergeError` naming the file, saying what is wrong and what to do (the CLI prints it as one
line, exit code 2).

The place that reads or writes a file converts its fault here when it can say more (the ledger
names itself, a run names its resume command); the CLI converts whatever reaches it as the last
line of defence (`os_fault` with the file the OSError names).
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from evomerge.errors import EvomergeError

# What to do, by errno (what is wrong comes from the OS's own message).
_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space",
    errno.EFBIG: "the file is too large for this file system or the file size limit (ulimit -f)",
    errno.EACCES: "check the permissions of the file and its directory",
    errno.EPERM: "check the permissions of the file and its directory",
    errno.EROFS: "the file system is read-only: pick a writable place",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory where a file is expected",
    errno.EIO: "input/output error: the disk or the network file system may be failing",
}


def os_fault(exc: OSError, file: str | Path | None = None, *, resume: str | Path | None = None) -> EvomergeError:
    """`exc` as one line: `FILE: what is wrong (errno name); what to do`. `file` names the file
    when the OSError does not; `resume` adds how a run goes on once the fault is fixed."""
    name = exc.filename if exc.filename is not None else file
    what = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno or -1)
    message = f"{what}" + (f" ({code})" if code else "")
    hint = _HINTS.get(exc.errno or -1)
    if hint:
        message += f"; {hint}"
    if resume is not None:
        message += f"; then carry on with `evomerge resume {resume}`"
    return EvomergeError(message, file=None if name is None else str(name))


def sqlite_fault(exc: sqlite3.Error, file: str | Path) -> EvomergeError:
    """A SQLite error of the ledger (or another evomerge database) as one line naming it."""
    text = str(exc)
    low = text.lower()
    if "disk is full" in low or "disk i/o" in low:
        hint = "the disk may be full: free some space (or check the disk)"
    elif "readonly" in low or "read-only" in low or "unable to open" in low:
        hint = "check the permissions of the file and its directory"
    elif "not a database" in low or "malformed" in low or "no such table" in low or "no such column" in low:
        hint = (
            "the file is damaged or not an evomerge ledger; restore it from a copy (with its -wal file), "
            "or check it with `sqlite3 FILE 'PRAGMA integrity_check'`"
        )
    elif "locked" in low or "busy" in low:
        hint = "another process holds it; wait for it and try again"
    else:
        hint = "check the file (sqlite3 FILE 'PRAGMA integrity_check') and try again"
    return EvomergeError(f"cannot use the database ({text}); {hint}", file=str(file))
