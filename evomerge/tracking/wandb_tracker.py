"""Weights & Biases: a W&B run, offline by default (`mode: offline`: everything stays in
`<run>/tracking/wandb/`, nothing is sent; `wandb sync` uploads it later), or `mode: online`.
Metrics are logged with the row's ledger seq as `seq` (W&B's own step only grows, and a rebuilt
ledger fills earlier seqs); the parameters go to the run's config, the best's recipe and model
card into the run's files. A resumed run continues the same W&B run (its id is kept)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

from evomerge.tracking.base import Tracker, TrackerOptions


class WandbOptions(TrackerOptions):
    project: str = "evomerge"
    entity: str | None = None
    mode: Literal["offline", "online"] = "offline"
    dir: str | None = None  # default: <run>/tracking (W&B writes a wandb/ folder there)
    run_name: str | None = None  # default: the run directory's name
    group: str | None = None
    tags: list[str] = []


class WandbTracker(Tracker):
    Options = WandbOptions
    PACKAGE = EXTRA = "wandb"  # import name, and pip extra

    def start(self, state: dict[str, Any]) -> dict[str, Any]:
        import wandb  # the optional package: only when asked for

        folder = Path(self.options.dir) if self.options.dir else self.run.tracking_dir
        folder.mkdir(parents=True, exist_ok=True)
        run_id = state.get("id") or uuid.uuid4().hex[:12]
        settings = wandb.Settings(silent=True, console="off", disable_git=True, disable_code=True, x_disable_stats=True)
        self.wb = wandb.init(
            project=self.options.project, entity=self.options.entity, mode=self.options.mode, dir=str(folder),
            name=self.options.run_name or self.run.run_dir.name, group=self.options.group, tags=self.options.tags,
            id=run_id, reinit="create_new", settings=settings,
            **({"resume": "allow"} if self.options.mode == "online" else {}),  # offline: W&B warns and ignores it
        )  # fmt: skip
        self.wb.define_metric("*", step_metric="seq")
        return {"id": run_id}

    def log_params(self, params: dict[str, str]) -> None:
        self.wb.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.wb.log({**metrics, "seq": step})

    def log_artifact(self, name: str, text: str) -> None:
        path = Path(self.wb.dir) / name  # files in the run's folder are part of the run (synced with it)
        path.write_text(text)
        self.wb.save(str(path), base_path=self.wb.dir, policy="now")

    def close(self, status: str) -> None:
        self.wb.finish(exit_code=0 if status == "finished" else 1)
