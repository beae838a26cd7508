"""A run directory: its layout, what makes a directory a run, its lock, and reading it safely.

Layout (`RunDir` names every path)::

    experiment.yaml           the resolved experiment, frozen when the run starts
    ledger.sqlite             one row per evaluation (`evomerge.run.ledger`)
    checkpoint/state.json     the last checkpoint (`evomerge.run.checkpoint`)
    stages/NAME/best_model    stage NAME's best, when a later stage uses it (`stage:NAME`)
    archive/STAGE/ID          M2N2 model-mode archive members (`archive:ID`)
    best/                     recipe.yaml, scores.json (and model/ for a weights-space best)
    report/                   `evomerge report`
    .lock                     held by the driver while the run executes; holds its pid

A directory is a run when it holds both `experiment.yaml` and `ledger.sqlite` (`evomerge run`
writes both before anything runs; one with only an experiment.yaml holds an experiment).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Any

from evomerge.errors import ConfigError
from evomerge.faults import os_fault
from evomerge.resources import read_yaml

EXPERIMENT_FILE = "experiment.yaml"
LEDGER_FILE = "ledger.sqlite"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
STAGES_DIR = "stages"
ARCHIVE_DIR = "archive"
REPORT_DIR = "report"
STAGE_MODEL = "best_model"


class RunDir:
    """The paths of a run directory (nothing is read or created)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.experiment = self.root / EXPERIMENT_FILE
        self.ledger = self.root / LEDGER_FILE
        self.lock = self.root / LOCK_FILE
        self.checkpoint = self.root / CHECKPOINT_DIR
        self.best = self.root / BEST_DIR
        self.report = self.root / REPORT_DIR

    def stage_model(self, stage: str) -> Path:
        """Where stage `stage`'s best model is written when a later stage uses it."""
        return self.root / STAGES_DIR / stage / STAGE_MODEL

    def archive(self, stage: str) -> Path:
        """M2N2 model mode: stage `stage`'s archive members, one directory per member id."""
        return self.root / ARCHIVE_DIR / stage


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` holds a run: its experiment.yaml and its ledger, both files."""
    run = RunDir(path)
    return run.experiment.is_file() and run.ledger.is_file()


def require_run_dir(run_dir: str | Path) -> Path:
    """`run_dir`, or one line: not a run directory, or (a run whose experiment.yaml or ledger is
    not a file) naming the file that is wrong."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        files = [RunDir(run_dir).experiment, RunDir(run_dir).ledger]
        odd = [p for p in files if p.exists() and not p.is_file()]
        if odd and any(p.is_file() for p in files):
            raise ConfigError("is a directory, not a file of the run; restore the file from a copy", file=str(odd[0]))
        raise ConfigError(f"not a run directory (it needs {EXPERIMENT_FILE} and {LEDGER_FILE})", file=str(run_dir))
    return run_dir


def experiment_data(run_dir: str | Path) -> dict[str, Any]:
    """The run's `experiment.yaml` as a mapping (its schema unchecked); one line when damaged."""
    path = RunDir(run_dir).experiment
    if not path.is_file():
        raise ConfigError(f"not a run directory (no {EXPERIMENT_FILE})", file=str(run_dir))
    restore = "restore it from a copy (it is the experiment the run was started with)"
    try:
        data = read_yaml(path)
    except OSError as exc:
        raise os_fault(exc, path) from None
    except ConfigError as exc:  # not text, not YAML
        raise ConfigError(f"the run's experiment is damaged, {exc.message}; {restore}", file=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"the run's experiment is damaged: it holds a YAML {type(data).__name__}, not an experiment; {restore}", file=str(path))
    return data


# ---- the lock ----------------------------------------------------------------------------------


def acquire_lock(run_dir: str | Path) -> IO[str]:
    """Hold `<run>/.lock` (with this process's pid in it) until the returned handle is closed: a
    second driver on the same directory (a resume while the run still goes on) is refused. The OS
    drops the lock when the process dies, even by kill -9; `lock_holder` tells a live run from a
    dead one by it."""
    path = RunDir(run_dir).lock
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held until the caller closes it
    except OSError as exc:
        raise os_fault(exc, path) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"the run is going on in another process (pid {holder}); wait for it or stop it first", file=str(run_dir)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def lock_holder(run_dir: str | Path) -> int | None:
    """The pid of the driver that holds the run (0 when it has not written its pid yet), or None
    when no process holds it: the run is stopped (finished, or ended by an error, Ctrl-C or a
    kill) or was never started. Tries the lock without waiting and lets it go at once."""
    try:
        handle = open(RunDir(run_dir).lock)  # noqa: SIM115 - closed below
    except OSError:  # no lock file: no driver ever held it (or it cannot be read: none to ask)
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else 0
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None
