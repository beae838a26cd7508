"""Exact save/restore for every optimizer: the state saved after k tells, loaded by a FRESH
process, gives the same next asks as the run that went on without interruption.

The driver interleaves asks and tells irregularly (partial generations, candidates in flight at
the checkpoint). The parent runs the whole script and records every ask; one child process
(`python -m tests.test_optim_resume`) loads each checkpoint, re-tells what was in flight and
replays the rest of the script. For Optuna both storages are tried: a snapshot taken at the
checkpoint, and the parent's own storage that already holds the later trials (a crashed run).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evomerge.evaluate.result import EvalResult
from evomerge.optim import make_optimizer
from evomerge.optim.state import load_state, save_state

DIM = 4
NAMES = [
    "model.embed_tokens.weight",
    *[f"model.layers.{i}.{part}" for i in range(3) for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight")],
    "model.norm.weight",
    "lm_head.weight",
]

# (op, n): ask n (None: natural batch) / tell the n oldest candidates in flight.
SCRIPT = [("ask", 3), ("ask", 3), ("tell", 2), ("ask", 2), ("tell", 4), ("ask", None), ("tell", 3),
          ("ask", 4), ("tell", 5), ("ask", 3), ("ask", 2), ("tell", 1)]  # fmt: skip
CHECKPOINT_AT = len(SCRIPT)  # the state is saved after the first pass over the script
REPEATS = 2  # the script runs twice; asks of the second pass are compared


class RecordingPort:
    """Model mode's archive port: records what would be persisted."""

    def __init__(self) -> None:
        self.persisted: list[int] = []

    def persist(self, member_id: int, candidate: Any) -> None:
        self.persisted.append(member_id)


def cases(storage_dir: Path) -> dict[str, tuple[str, dict]]:
    bounds = ([-2.0] * DIM, [3.0] * DIM)
    return {
        "random": ("random", {"popsize": 4}),
        "grid": ("grid", {"points": 3}),
        "cmaes": ("cmaes", {"popsize": 4, "sigma0": 0.5}),
        "cmaes_diag_ipop": ("cmaes", {"popsize": 4, "diagonal": True, "restarts": 2, "cma_options": {"tolfun": 1e-1, "tolx": 1e-1}}),
        "optuna_tpe": ("optuna", {"sampler": "tpe", "sampler_options": {"n_startup_trials": 4}, "storage": f"sqlite:///{storage_dir}/tpe.db"}),
        "optuna_cmaes": ("optuna", {"sampler": "cmaes", "popsize": 4, "storage": f"sqlite:///{storage_dir}/cmaes.db"}),
        "optuna_nsgaii": ("optuna", {"sampler": "nsgaii", "popsize": 4, "multi_objective": True, "storage": f"sqlite:///{storage_dir}/nsgaii.db"}),
        "optuna_random": ("optuna", {"sampler": "random", "storage": f"sqlite:///{storage_dir}/random.db"}),
        "m2n2": ("m2n2", {"archive_size": 4, "mutation_sigma": 0.1, "init_sigma": 0.5}),
        "m2n2_ga": ("m2n2", {"archive_size": 4, "alpha": 0.0, "attraction": False, "mutation_sigma": 0.1, "initial": [[0.0] * DIM, [1.0] * DIM, [2.0] * DIM]}),
        "m2n2_model": ("m2n2", {"mode": "model", "archive_size": 3, "initial_models": ["a", "b", "c"], "tensor_names": NAMES}),
    }, bounds


def build(case: str, storage_dir: Path):
    table, bounds = cases(storage_dir)
    name, options = table[case]
    options = dict(options)
    if options.get("mode") == "model":
        options["archive_port"] = RecordingPort()
    return make_optimizer(name, dim=DIM, bounds=bounds, x0=[0.5] * DIM, seed=7, objectives={"f": False, "g": True}, **options)


def evaluate(cand: Any) -> EvalResult:
    """A deterministic analytic result with per-sample scores, from the genome or the recipe."""
    if cand.genome is not None:
        x = np.asarray(cand.genome)
    else:
        m2n2 = cand.recipe.evomerge.model_extra.get("m2n2", {})
        seed = int(1e6 * m2n2.get("w", 0.0)) + sum(map(ord, m2n2.get("init", "")))
        x = np.random.default_rng(seed).uniform(-2, 3, DIM)
    f = float(np.sum((x - 1.0) ** 2))
    g = float(np.sum(np.cos(x)))
    per_sample = (x[np.arange(12) % DIM] > np.linspace(-1.5, 2.5, 12)).astype(np.float64)
    if cand.id % 11 == 5:  # some candidates fail
        return EvalResult.failure("boom", {"f": False, "g": True})
    return EvalResult({"f": f, "g": g}, {"f": False, "g": True}, per_sample={"task": per_sample}, doc_ids={"task": list(range(12))})


def record(cands: list) -> list:
    return [[c.id, c.genome.tolist() if c.genome is not None else c.recipe.to_dict()] for c in cands]


def run_script(opt: Any, ops: list, log: list) -> None:
    for op, n in ops:
        if op == "ask":
            log.append(record(opt.ask(n)))
        else:
            told = opt.in_flight()[:n]
            opt.tell(told, [evaluate(c) for c in told])


def resume_and_continue(case: str, state_path: str, storage_dir: str) -> list:
    opt = build(case, Path(storage_dir))
    opt.load_state_dict(load_state(state_path))
    log: list = []
    run_script(opt, SCRIPT * (REPEATS - 1), log)
    return log


OPTUNA = ("optuna_tpe", "optuna_cmaes", "optuna_nsgaii", "optuna_random")


def test_resume_in_fresh_process_gives_identical_asks(tmp_path: Path) -> None:
    pytest.importorskip("cmaes")  # optuna's CmaEsSampler
    live, snap = tmp_path / "live", tmp_path / "snap"
    live.mkdir(), snap.mkdir()
    expected: dict[str, list] = {}
    jobs = []
    for case in cases(live)[0]:
        opt = build(case, live)
        log: list = []
        run_script(opt, SCRIPT, log)
        assert opt.in_flight(), "the checkpoint should have candidates in flight"
        state_path = tmp_path / f"{case}.json"
        save_state(state_path, opt.state_dict())
        json.loads(state_path.read_text())  # plain JSON
        if case in OPTUNA:  # a consistent copy of the storage at the checkpoint (WAL included)
            db = live / f"{case.split('_')[1]}.db"
            with sqlite3.connect(db) as src, sqlite3.connect(snap / db.name) as dst:
                src.backup(dst)
        tail: list = []
        run_script(opt, SCRIPT * (REPEATS - 1), tail)
        assert any(tail), f"{case}: nothing asked after the checkpoint"
        expected[case] = tail
        jobs.append([case, str(state_path), str(live)])
        if case in OPTUNA:
            jobs.append([case, str(state_path), str(snap)])
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    out = tmp_path / "out.json"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "tests.test_optim_resume", str(spec), str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for (case, _, storage), got in zip(jobs, results, strict=True):
        assert got == expected[case], f"{case} resumed from {Path(storage).name} storage asks differently"


def test_optuna_resume_keeps_dashboard_study(tmp_path: Path) -> None:
    """Resuming over a storage with later trials opens a copy `evomerge.r1` beside the original."""
    import optuna

    opt = build("optuna_random", tmp_path)
    run_script(opt, SCRIPT, [])
    state = opt.state_dict()
    run_script(opt, SCRIPT, [])
    fresh = build("optuna_random", tmp_path)
    fresh.load_state_dict(state)
    names = optuna.get_all_study_names(storage=fresh.storage)
    assert sorted(names) == ["evomerge", "evomerge.r1"]
    assert fresh.study.study_name == "evomerge.r1"
    assert len(fresh.study.trials) == state["impl"]["n_trials"]


def test_checkpoint_of_other_optimizer_is_refused(tmp_path: Path) -> None:
    from evomerge.errors import ConfigError

    state = build("random", tmp_path).state_dict()
    with pytest.raises(ConfigError, match="optimizer 'random'"):
        build("grid", tmp_path).load_state_dict(state)


def _child(spec: str, out: str) -> None:
    jobs = json.loads(Path(spec).read_text())
    results = []
    for case, state_path, storage in jobs:
        results.append(resume_and_continue(case, state_path, storage))
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
