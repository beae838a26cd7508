"""Checkpoints: `<run>/checkpoint/state.json` (temp file, fsync, rename), and when to write one.

When (`CheckpointPacer`): after every tell, unless writing it costs more than 1/`CHECKPOINT_RATIO`
of the time since the last one (an M2N2 archive of 20 raw-weight genomes is MBs of state, an
evaluation ms): then the next tells wait. Nothing is lost either way: a resume replays the
ledger's rows after the checkpoint instead of evaluating them.

The state holds the optimizer's `state_dict()` of the stage in progress, the ledger position it
corresponds to (`ledger_seq`: every search row up to it has been told), the scheduler's own
counters (failures in a row) and which stages are finished. Rows written after `ledger_seq` -
the driver was killed between writing a row and the next checkpoint - are replayed on resume.
`ledger_rows` ({stage: {split: rows}}) counts the ledger's rows when the checkpoint was written:
with `ledger_seq` it lets `evomerge.run.integrity` prove that no counted row went missing since.

A checkpoint that cannot be read (damaged, not JSON, not a checkpoint) raises one line naming
the file and the two ways on: restore it, or rebuild the run's state from its ledger
(`evomerge resume RUN --rebuild`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.faults import os_fault
from evomerge.fsutil import atomic_write_text
from evomerge.run.rundir import RunDir

FORMAT = "evomerge-run-checkpoint/1"
STATE_FILE = "state.json"
CHECKPOINT_RATIO = 20  # writing checkpoints takes at most 1/20 of the search's time


class CheckpointPacer:
    """Decides whether a checkpoint is written now (see the module docstring). State: when the
    last one was written and what it cost, by `clock` (seconds)."""

    def __init__(self, ratio: float = CHECKPOINT_RATIO, clock: Callable[[], float] = time.perf_counter):
        self.ratio = ratio
        self.clock = clock
        self.last_written = -math.inf
        self.last_cost = 0.0

    def maybe_write(self, write: Callable[[], object]) -> bool:
        """Call `write` (which writes a checkpoint) when one is due; whether it was."""
        start = self.clock()
        if start - self.last_written < self.ratio * self.last_cost:
            return False
        write()
        self.last_written = self.clock()
        self.last_cost = self.last_written - start
        return True


def checkpoint_path(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoint / STATE_FILE


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write the state atomically; a reader sees the old file or the new one, never a mix."""
    data = {"format": FORMAT, **state}
    return atomic_write_text(checkpoint_path(run_dir), json.dumps(data, allow_nan=True))


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint, or None when the run never got to one."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    if not path.is_file():
        raise damaged(path, "it is a directory, not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise os_fault(exc, path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(path, f"it is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise damaged(path, f"it holds a JSON {type(data).__name__}, not a checkpoint")
    if data.get("format") != FORMAT:
        raise damaged(path, f"unknown checkpoint format {data.get('format')!r}; expected {FORMAT}")
    return data


def damaged(path: Path, what: str) -> ConfigError:
    run_dir = path.parent.parent
    return ConfigError(
        f"the checkpoint cannot be read: {what}; restore it from a copy, or rebuild the run's state from its "
        f"ledger with `evomerge resume {run_dir} --rebuild`",
        file=str(path),
    )
