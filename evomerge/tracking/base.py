"""What a tracker is: a backend that a run's evaluations, parameters and artifacts are sent to.

A tracker is one class (a `Tracker` subclass) that declares its options (`Options`, a pydantic
model: the mapping under its name in `tracking:`), the module it needs (`PACKAGE`) and the pip
extra that installs it (`EXTRA`). The tracking thread (`evomerge.tracking.session`) calls it, in
this order: `start` once, `log_params` once, `log_metrics` after each ledger row, `log_artifact`
for the best's recipe and model card at the end, `close` once. None of these is called on the
scheduler's thread; an exception from any of them turns that tracker off for the rest of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class TrackerOptions(BaseModel):
    """A tracker's options (no unknown keys, finite numbers)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class TrackedRun:
    """The run a tracker logs: the experiment's name and the run directory (trackers keep their
    local files under `tracking_dir`)."""

    name: str
    run_dir: Path

    @property
    def tracking_dir(self) -> Path:
        return self.run_dir / "tracking"


class Tracker:
    """One tracking backend (module docstring)."""

    Options: ClassVar[type[TrackerOptions]] = TrackerOptions
    PACKAGE: ClassVar[str | None] = None  # the import name that must be installed
    EXTRA: ClassVar[str | None] = None  # `pip install evomerge[EXTRA]` installs it

    def __init__(self, options: TrackerOptions, run: TrackedRun) -> None:
        self.options = options
        self.run = run

    def start(self, state: dict[str, Any]) -> dict[str, Any]:
        """Open the backend's run; `state` is what this method returned in an earlier session of
        the same run (e.g. the MLflow run id: a resumed run logs to the same run), kept in
        `<run>/tracking/state.json`. Returns what to keep."""
        return {}

    def log_params(self, params: dict[str, str]) -> None:
        """The run's and each stage's settings, flattened to `dotted.key: text`."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One ledger row's figures (`evomerge.tracking.metrics`); `step` is its ledger seq."""

    def log_artifact(self, name: str, text: str) -> None:
        """A text file of the run (`recipe.yaml`, `README.md`: the model card)."""

    def close(self, status: str) -> None:
        """`status`: "finished", "failed" or "killed" (stopped before its end)."""
