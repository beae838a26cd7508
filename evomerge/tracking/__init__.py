"""Experiment tracking: the `tracking:` section of an experiment (optional)::

    tracking:
      mlflow: {}                           # SQLite store in <run>/tracking/mlflow.db
      tensorboard: {}                      # event files in <run>/tracking/tensorboard
      wandb: {project: merges}             # offline: <run>/tracking/wandb
      # mlflow: {tracking_uri: http://host:5000, experiment: merges}

Each key names a tracker (`TRACKERS`: the built-ins, or one registered with `register_tracker`
or by a plugin), its value its options (`{}`, `true` or nothing for the defaults). Every
evaluation is logged as it is written to the ledger (`evomerge.tracking.metrics`), the settings
once, the best's recipe and model card at the end, from a thread of its own
(`evomerge.tracking.session`). `check_tracking` validates the section before a run starts: an
unknown tracker or option, or a tracker whose package is not installed, is one line naming the
field (and what to `pip install`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.errors import ConfigError, schema_error
from evomerge.plugins import load_plugins
from evomerge.registry import Registry
from evomerge.tracking.base import TrackedRun, Tracker, TrackerOptions
from evomerge.tracking.metrics import RowMetrics, experiment_params
from evomerge.tracking.session import TrackingSession

__all__ = ["TRACKERS", "TrackedRun", "Tracker", "TrackerOptions", "TrackingSession", "TrackingSpec", "check_tracking", "open_tracking", "register_tracker"]

TRACKERS: Registry[Tracker] = Registry("tracker", Tracker, field="tracking", on_miss=load_plugins)
TRACKERS.register("mlflow", "evomerge.tracking.mlflow_tracker:MlflowTracker")
TRACKERS.register("tensorboard", "evomerge.tracking.tensorboard_tracker:TensorBoardTracker")
TRACKERS.register("wandb", "evomerge.tracking.wandb_tracker:WandbTracker")


def register_tracker(name: str, target: str | type[Tracker], *, replace: bool = False) -> None:
    """Make `name` a tracker for `tracking:`: a `Tracker` subclass or a lazy `"package.module:Class"`."""
    TRACKERS.register(name, target, replace=replace)


class TrackingSpec(BaseModel):
    """`tracking:`: tracker name -> its options (checked by `check_tracking`)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, dict[str, Any]]

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """`name:`, `name: true` and `name: {}` are the defaults; `name: false` turns it off."""
        if data is None:
            return {}
        if isinstance(data, dict):
            return {k: ({} if v is None or v is True else v) for k, v in data.items() if v is not False}
        return data

    def trackers(self) -> dict[str, dict[str, Any]]:
        return dict(self.model_extra or {})


def check_tracking(spec: TrackingSpec, *, file: str | None = None) -> list[tuple[str, type[Tracker], TrackerOptions]]:
    """Each tracker of the section with its validated options; a one-line ConfigError naming the
    field for an unknown tracker or option, or a tracker whose package is missing."""
    out = []
    for name, options in spec.trackers().items():
        field = f"tracking.{name}"
        cls = TRACKERS.get(name, file=file, field=field)
        try:
            parsed = cls.Options.model_validate(options)
        except ValidationError as exc:
            raise schema_error(exc, file=file, prefix=f"{field}.", model=cls.Options) from None
        if cls.PACKAGE and importlib.util.find_spec(cls.PACKAGE) is None:
            install = f"pip install 'evomerge[{cls.EXTRA}]'" if cls.EXTRA else f"pip install {cls.PACKAGE}"
            raise ConfigError(f"the {name} tracker needs the '{cls.PACKAGE}' package, which is not installed: {install}", file=file, field=field)
        out.append((name, cls, parsed))
    return out


def open_tracking(exp: Any, run_dir: str | Path, ledger: Any = None) -> TrackingSession:
    """The session of the experiment's trackers for a run in `run_dir` (none: a session that does
    nothing and starts no thread). With `ledger`, it is hooked to it (`ledger.observer`) and
    starts each stage's best and row counts from its rows (a resumed run)."""
    checked = check_tracking(exp.tracking)
    run = TrackedRun(name=exp.name, run_dir=Path(run_dir))
    best: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    if checked and ledger is not None:
        counts = ledger.counts()
        for stage in exp.stages:
            top = ledger.top(stage.name, 1)
            if top:
                best[stage.name] = float(top[0].fitness)
    trackers = [(name, cls(options, run)) for name, cls, options in checked]
    session = TrackingSession(trackers, run, experiment_params(exp) if checked else {}, RowMetrics(best, counts))
    if ledger is not None and session.active:
        ledger.observer = session.observe
    return session

