"""Checkpoints: `<run>/checkpoint/state.json`, written after every tell (temp file, fsync, rename).

The state holds the optimizer's `state_dict()` of the stage in progress, the ledger position it
corresponds to (`ledger_seq`: every search row up to it has been told), the scheduler's own
counters (failures in a row) and which stages are finished. Rows written after `ledger_seq` -
the driver was killed between writing a row and the next checkpoint - are replayed on resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.fsutil import atomic_write_text

FORMAT = "evomerge-run-checkpoint/1"
STATE_FILE = "state.json"


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint" / STATE_FILE


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write the state atomically; a reader sees the old file or the new one, never a mix."""
    data = {"format": FORMAT, **state}
    return atomic_write_text(checkpoint_path(run_dir), json.dumps(data, allow_nan=True))


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint, or None when the run never got to one."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"checkpoint is not valid JSON ({exc})", file=str(path)) from None
    if data.get("format") != FORMAT:
        raise ConfigError(f"unknown checkpoint format {data.get('format')!r}; expected {FORMAT}", file=str(path))
    return data
