"""A two-node Ray cluster on this machine: `ray start --head` plus `ray start --address` with a
resource of its own, joined with `address: auto` from a separate driver process (the session's
local Ray may already run in this one).

Ray (2.60) will not run a multi-node cluster on 127.0.0.1: it maps loopback to the host's own
address and aborts worker nodes in its loopback-only mode. So both nodes use the host's address
(nothing leaves the machine), with token authentication on, an isolated temp dir and free
ports. `ray stop` would stop every Ray on the machine, other users' included: the nodes are
started with `--block` in their own sessions and stopped by signalling those processes only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from evomerge.recipe import Recipe
from evomerge.run.jobs import Job
from evomerge.run.worker_core import WorkerCore

pytestmark = pytest.mark.timeout(900)

RAY = str(Path(sys.executable).with_name("ray"))

PROBE = '''
import numpy as np
import torch

from evomerge.evaluate.result import EvalResult


def score(model, tokenizer, split, subset=None, shard=None):
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    value = float(model(ids).logits.double().mean())
    return EvalResult({"score": value}, {"score": True}, per_sample={"probe": np.array([value])})


class Probe:
    def objective_directions(self):
        return {"score": True}

    def evaluate(self, model, tokenizer, split, subset=None, shard=None):
        import time

        time.sleep(0.3)  # long enough that both workers take jobs
        return score(model, tokenizer, split)
'''

POOL_DRIVER = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import ray
from probe import Probe
from evomerge.recipe import Recipe
from evomerge.run.jobs import Job
from evomerge.run.workers import RayWorkerPool

ray.cloudpickle.register_pickle_by_value(sys.modules["probe"])
sources = json.loads(sys.argv[2])
recipes = json.loads(sys.argv[3])
pool = RayWorkerPool(address="auto", workers=2, num_cpus_per_worker=1)
pool.start(sources, Probe, allow_pickle=False, dtype=None)
for name, text in recipes.items():
    pool.submit(Job(name, Recipe.from_string(text), "search"))
outcomes = []
while len(outcomes) < len(recipes):
    outcomes += pool.wait()
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
report = {
    "outcomes": {o.job_id: {"worker": o.worker, "error": o.result.error, "score": o.result.objectives["score"]} for o in outcomes},
    "workers": [{"node_id": s["node_id"], "node2": "node2" in nodes[s["node_id"]]} for s in pool.worker_stats()],
    "stores": pool.store_bytes(),
}
pool.shutdown()
print("REPORT " + json.dumps(report))
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_args() -> list[str]:
    return [
        "--num-cpus=1",
        "--block",
        "--disable-usage-stats",
        "--object-store-memory=200000000",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]


def _ray_processes(temp_dir: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if temp_dir in line and "ps -eo" not in line]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to a `ray start --block` makes it drain and stop the node's processes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="evr", dir="/tmp")  # short: Ray's socket paths have a length limit
    logs = tmp_path_factory.mktemp("ray-cluster-logs")
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}",
         f"--temp-dir={temp_dir}", *_node_args()],
        env=env, start_new_session=True, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not any("session_latest" in p.name for p in Path(temp_dir).iterdir()):
            assert head.poll() is None and time.monotonic() < deadline, (logs / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # the GCS listens a moment after the session directory appears
        node = subprocess.Popen(
            [RAY, "start", f"--address={address}", '--resources={"node2": 1}', *_node_args()],
            env=env, start_new_session=True, stdout=open(logs / "node.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(node)
        yield {"address": address, "env": env, "temp_dir": temp_dir, "logs": logs}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        deadline = time.monotonic() + 60
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the session this fixture started, nothing else
                proc.wait()
        while _ray_processes(temp_dir) and time.monotonic() < deadline + 30:
            time.sleep(1)
        leftovers = _ray_processes(temp_dir)
        assert not leftovers, leftovers


def _driver_env(cluster) -> dict[str, str]:
    return dict(cluster["env"], RAY_ADDRESS=cluster["address"], PYTHONUNBUFFERED="1")


RECIPES = {
    f"linear-{w}": f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {w}}}\n  - model: b\n    parameters: {{weight: {1 - w:.2f}}}\ndtype: float32\n"
    for w in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
}


def test_pool_spreads_over_two_nodes_with_a_store_on_each(cluster, llama_family, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    sources = {name: str(path) for name, path in llama_family.items()}
    proc = subprocess.run(
        [sys.executable, "-c", POOL_DRIVER, str(tmp_path), json.dumps(sources), json.dumps(RECIPES)],
        env=_driver_env(cluster), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(lines[0][len("REPORT ") :])

    # one worker per node (each node has one CPU), and each node loaded the sources once
    assert sorted(w["node2"] for w in report["workers"]) == [False, True]
    node_ids = {w["node_id"] for w in report["workers"]}
    assert set(report["stores"]) == node_ids
    size = sum(f.stat().st_size for path in llama_family.values() for f in path.glob("*.safetensors"))
    for stored in report["stores"].values():
        assert 0.9 * size <= stored <= 1.1 * size

    sys.path.insert(0, str(tmp_path))
    try:
        from probe import score
    finally:
        sys.path.remove(str(tmp_path))

    class Direct:
        def objective_directions(self):
            return {"score": True}

        def evaluate(self, model, tokenizer, split, subset=None, shard=None):
            return score(model, tokenizer, split)

    core = WorkerCore(sources, Direct)
    used = set()
    for name, text in RECIPES.items():
        outcome = report["outcomes"][name]
        assert outcome["error"] is None, outcome["error"]
        expected = core.run(Job(name, Recipe.from_string(text), "search")).objectives["score"]
        assert outcome["score"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        used.add(outcome["worker"].split("@")[1].split(":")[0])
    assert used == {n[:8] for n in node_ids}  # both nodes evaluated candidates


def test_search_across_both_nodes(cluster, llama_family, tmp_path):
    """`evomerge run` with `ray: {address: auto, workers: 2}`: a small random search whose
    evaluations the ledger shows on both nodes."""
    (tmp_path / "probe.py").write_text(PROBE)
    experiment = {
        "name": "two_nodes",
        "seed": 3,
        "models": {"base": str(llama_family["base"]), "sources": [str(llama_family["a"]), str(llama_family["b"])]},
        "stages": [
            {
                "name": "ps",
                "space": "ps_linear",
                "evaluator": {"kind": "python", "callable": f"{tmp_path / 'probe.py'}:score", "objectives": {"score": True}},
                "optimizer": {"name": "random", "popsize": 4},
                "budget": {"evaluations": 8},
                "holdout_top_k": 1,
            }
        ],
        "ray": {"address": "auto", "workers": 2, "num_cpus_per_worker": 1},
    }
    exp_file = tmp_path / "two_nodes.yaml"
    exp_file.write_text(json.dumps(experiment))  # JSON is YAML
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("evomerge")), "run", str(exp_file), "--out", str(run_dir)],
        env=_driver_env(cluster), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with sqlite3.connect(run_dir / "ledger.sqlite") as conn:
        rows = conn.execute("SELECT worker, status, split FROM evaluations").fetchall()
    search = [r for r in rows if r[2] == "search"]
    assert len(search) >= 8 and all(r[1] == "ok" for r in rows), rows
    nodes = {worker.split("@")[1].split(":")[0] for worker, _, _ in rows if "@" in worker}
    assert len(nodes) == 2, rows
