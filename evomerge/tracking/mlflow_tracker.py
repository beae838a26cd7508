"""MLflow: a run in an MLflow tracking store (`tracking: {mlflow: {...}}`).

By default the store is a SQLite file in the run directory, `<run>/tracking/mlflow.db`, with the
artifacts beside it in `mlflow-artifacts/` (MLflow 3 refuses its older `./mlruns` file store
unless told otherwise; SQLite is the local store it supports). View it with
`mlflow ui --backend-store-uri sqlite:///RUN/tracking/mlflow.db` (the full `mlflow` package).
`tracking_uri` names another store (a server, or one SQLite file shared by several runs).
A resumed run logs to the same MLflow run; a setting changed on resume keeps its first value as
a parameter (MLflow forbids changing one) and the new one as the tag `changed.KEY`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from evomerge.tracking.base import Tracker, TrackerOptions

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_BATCH = 100  # MLflow's limit on params per log_batch call


class MlflowOptions(TrackerOptions):
    tracking_uri: str | None = None  # default: sqlite:///<run>/tracking/mlflow.db
    experiment: str | None = None  # default: the experiment's name
    run_name: str | None = None  # default: the run directory's name
    tags: dict[str, str] = {}


class MlflowTracker(Tracker):
    Options = MlflowOptions
    PACKAGE = EXTRA = "mlflow"  # import name, and pip extra

    def start(self, state: dict[str, Any]) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient  # the optional package: only when asked for

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        folder = self.run.tracking_dir
        uri = self.options.tracking_uri
        if uri is None:
            folder.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        if state.get("run_id") and state.get("tracking_uri") == uri:
            self.run_id = state["run_id"]
            client.update_run(self.run_id, status="RUNNING")
        else:
            name = self.options.experiment or self.run.name
            found = client.get_experiment_by_name(name)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                location = (folder / "mlflow-artifacts").resolve().as_uri() if self.options.tracking_uri is None else None
                experiment_id = client.create_experiment(name, artifact_location=location)
            tags = {"evomerge.run_dir": str(self.run.run_dir.resolve()), **self.options.tags}
            run = client.create_run(experiment_id, run_name=self.options.run_name or self.run.run_dir.name, tags=tags)
            self.run_id = run.info.run_id
        return {"run_id": self.run_id, "tracking_uri": uri}

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"changed.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
        for i in range(0, max(len(new), len(changed)), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH], tags=changed[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FINISHED"))
