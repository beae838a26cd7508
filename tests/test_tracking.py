"""Experiment tracking (`tracking:`): what MLflow, TensorBoard and W&B hold after a run, read
back with each library's own reader, against the run's ledger; a tracker that raises mid-run
changes nothing of the run; the section's errors."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from evomerge.run.ledger import Ledger
from evomerge.run.stages import stage_best
from evomerge.tracking import TRACKERS, Tracker, TrackerOptions
from tests.run_helpers import cli, rows
from tests.test_run import experiment, write_exp

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")


def small(family: dict[str, Path], **changes) -> dict:
    exp = experiment(family, **changes)
    exp["stages"][0].update(optimizer={"name": "cmaes", "popsize": 3}, budget={"evaluations": 6}, holdout_top_k=1)
    return exp


def run(tmp_path: Path, exp: dict, name: str) -> tuple[Path, str]:
    """The run directory and what `evomerge run` printed."""
    run_dir = tmp_path / name
    code, out = cli("run", write_exp(tmp_path / f"{name}.yaml", exp), "--out", run_dir, "--local")
    assert code == 0, out
    return run_dir, out


def ledger_facts(run_dir: Path) -> tuple[list, float]:
    """The search rows and the stage's best search fitness, as the ledger has them."""
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        best = stage_best(ledger, "ps")
    assert best is not None
    return rows(run_dir, stage="ps", split="search"), best.score


def mlflow_read(run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "tracking" / "state.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'tracking' / 'mlflow.db'}")
    found = client.get_run(state["run_id"])
    return {
        "status": found.info.status,
        "params": found.data.params,
        "tags": found.data.tags,
        "fitness": [m.value for m in client.get_metric_history(state["run_id"], "ps/search/fitness")],
        "best": [m.value for m in client.get_metric_history(state["run_id"], "ps/search/best_fitness")],
        "artifacts": {a.path for a in client.list_artifacts(state["run_id"])},
        "card": client.download_artifacts(state["run_id"], "README.md", str(run_dir / "mlflow-download")),
    }


def tensorboard_read(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tracking" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {
        "fitness": [e.value for e in events.Scalars("ps/search/fitness")],
        "best": [e.value for e in events.Scalars("ps/search/best_fitness")],
        "steps": [e.step for e in events.Scalars("ps/search/fitness")],
        "texts": set(events.Tags()["tensors"]),
    }


def wandb_read(run_dir: Path) -> dict:
    """The history rows of the offline run's transaction logs (.wandb; one per session of the
    run, oldest first), its config and its files."""
    datastore = pytest.importorskip("wandb.sdk.internal.datastore", reason="wandb >= 0.30 has no Python reader of .wandb files")
    from wandb.proto import wandb_internal_pb2

    paths = sorted(glob.glob(str(run_dir / "tracking" / "wandb" / "offline-run-*" / "run-*.wandb")))
    history, config, files, ids = [], {}, set(), set()
    for path in paths:
        store = datastore.DataStore()
        store.open_for_scan(path)
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "run":
                ids.add(record.run.run_id)
        files |= {Path(f).name for f in glob.glob(str(Path(path).parent / "files" / "*"))}
    return {"history": history, "config": config, "files": files, "ids": ids, "sessions": len(paths)}


def test_each_tracker_holds_every_evaluation_and_the_ledgers_best(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """A run with MLflow and W&B, resumed with a raised budget and TensorBoard added: MLflow and
    W&B carry on in the same run, TensorBoard starts at the resumed rows with the best so far."""
    exp = small(llama_family, tracking={"mlflow": {}, "wandb": {"project": "evomerge-test"}})
    exp["stages"][0]["budget"] = {"evaluations": 3}
    run_dir, out = run(tmp_path, exp, "tracked")
    assert "warning" not in out
    first = len(rows(run_dir))
    code, out = cli("resume", run_dir, "--local", "--set", "stages.ps.budget.evaluations=6", "--set", "tracking.tensorboard=true")
    assert code == 0 and "warning" not in out, out
    search, best = ledger_facts(run_dir)
    fitness = [r.fitness for r in search]
    assert len(search) == 6

    ml = mlflow_read(run_dir)
    assert ml["status"] == "FINISHED"
    assert ml["fitness"] == pytest.approx(fitness) and max(ml["best"]) == pytest.approx(best) and ml["best"][-1] == pytest.approx(best)
    assert ml["params"]["stages.ps.optimizer.name"] == "cmaes" and ml["params"]["stages.ps.budget.evaluations"] == "3"
    assert ml["tags"]["changed.stages.ps.budget.evaluations"] == "6"  # MLflow keeps a parameter's first value
    assert ml["artifacts"] == {"README.md", "recipe.yaml"}
    assert "base_model:" in Path(ml["card"]).read_text()

    resumed = [r for r in search if r.seq > first]
    tb = tensorboard_read(run_dir)
    assert tb["steps"] == [r.seq for r in resumed]  # one point per evaluation, at its ledger seq
    assert tb["fitness"] == pytest.approx([r.fitness for r in resumed], rel=1e-6) and tb["best"][-1] == pytest.approx(best, rel=1e-6)
    assert {"params/text_summary", "artifacts/README.md/text_summary", "artifacts/recipe.yaml/text_summary"} <= tb["texts"]

    wb = wandb_read(run_dir)
    assert wb["sessions"] == 2 and len(wb["ids"]) == 1  # the resumed session logs to the same W&B run
    logged = [h for h in wb["history"] if "ps/search/fitness" in h]
    assert [h["seq"] for h in logged] == [r.seq for r in search]
    assert [h["ps/search/fitness"] for h in logged] == pytest.approx(fitness)
    assert logged[-1]["ps/search/best_fitness"] == pytest.approx(best)
    assert wb["config"]["stages.ps.optimizer.name"] == "cmaes"
    assert {"README.md", "recipe.yaml"} <= wb["files"]


class Flaky(Tracker):
    """Raises on the third row it is sent (registered by the test below)."""

    Options = TrackerOptions
    seen = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        Flaky.seen += 1
        if Flaky.seen == 3:
            raise RuntimeError("the tracking server went away")


def test_a_tracker_that_raises_mid_run_changes_nothing(llama_family: dict[str, Path], tmp_path: Path) -> None:
    TRACKERS.register("flaky", Flaky, replace=True)
    plain, _ = run(tmp_path, small(llama_family), "plain")
    tracked, out = run(tmp_path, small(llama_family, tracking={"flaky": {}, "tensorboard": {}}), "flaky")
    lines = [line for line in out.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: tracking: flaky failed (RuntimeError: the tracking server went away); it is off for the rest of the run"]
    assert [r.comparable() for r in rows(tracked)] == [r.comparable() for r in rows(plain)]
    assert json.loads((tracked / "best" / "scores.json").read_text()) == json.loads((plain / "best" / "scores.json").read_text())
    assert tensorboard_read(tracked)["fitness"] == pytest.approx([r.fitness for r in rows(plain, stage="ps", split="search")], rel=1e-6)


class NeedsPackage(Tracker):
    PACKAGE = "evomerge_no_such_package"
    EXTRA = "nosuch"


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ({"mlfow": {}}, "tracking.mlfow: unknown tracker 'mlfow'; valid: mlflow, tensorboard, wandb"),
        ({"mlflow": {"uri": "x"}}, "tracking.mlflow.uri: unknown field; valid: tracking_uri, experiment, run_name, tags"),
        ({"wandb": {"mode": "online2"}}, "tracking.wandb.mode: must be 'offline' or 'online', got 'online2'"),
        ({"mlflow": "yes"}, "tracking.mlflow: must be a valid dictionary"),
        ({"needs": {}}, "tracking.needs: the needs tracker needs the 'evomerge_no_such_package' package, which is not installed: pip install 'evomerge[nosuch]'"),
    ],
)
def test_tracking_errors_are_one_line_before_anything_starts(llama_family: dict[str, Path], tmp_path: Path, tracking: dict, message: str) -> None:
    TRACKERS.register("needs", NeedsPackage, replace=True)
    run_dir = tmp_path / "run"
    code, out = cli("run", write_exp(tmp_path / "exp.yaml", small(llama_family, tracking=tracking)), "--out", run_dir, "--local")
    assert code == 2 and out.count("\n") == 1 and message in out, out
    assert not run_dir.exists()


def test_tracking_from_the_python_api(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """`evomerge.run(..., tracking=...)` and a `tracking:` key in an experiment dict: the same
    section, validated the same way (one-line errors)."""
    import evomerge as em

    exp = small(llama_family)
    exp["stages"][0]["budget"] = {"evaluations": 3}
    with pytest.raises(em.ConfigError, match=r"^tracking\.mlfow: unknown tracker 'mlfow'; valid: mlflow, tensorboard, wandb"):
        em.Experiment({**exp, "tracking": {"mlfow": {}}}).validate()
    done = em.run(exp, out=tmp_path / "api", local=True, tracking={"tensorboard": {}}, echo=None)
    ledger = done.ledger()
    search = ledger[(ledger["stage"] == "ps") & (ledger["split"] == "search")]
    tb = tensorboard_read(done.run_dir)
    assert tb["steps"] == list(search["seq"]) and tb["fitness"] == pytest.approx(list(search["fitness"]), rel=1e-6)
    assert tb["best"][-1] == pytest.approx(done.best().score, rel=1e-6)
