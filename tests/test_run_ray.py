"""RayWorkerPool on the session's local Ray: results, faults, shared sources.

One pool of two one-CPU workers serves the whole module (starting actors costs seconds).
`ProbeEvaluator` scores a fixed batch with the merged model; the job's `subset` (opaque to the
pool) tells it to sleep, record its pid, raise, return NaN or kill its own process.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.evaluate.result import EvalResult
from evomerge.recipe import Recipe
from evomerge.run.jobs import MAX_ATTEMPTS, Job, JobOutcome, WorkerPool
from evomerge.run.worker_core import WorkerCore
from evomerge.run.workers import RayWorkerPool

from .conftest import write_llama

pytestmark = pytest.mark.timeout(600)


class ProbeEvaluator:
    """Deterministic score of a model; `subset` (a dict) steers sleeps and faults."""

    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}

    def evaluate(self, model, tokenizer, split, subset=None, shard=None) -> EvalResult:
        subset = subset or {}
        if "pid_file" in subset:
            Path(subset["pid_file"]).write_text(str(os.getpid()))
        time.sleep(subset.get("sleep", 0.0))
        if subset.get("exit"):
            os._exit(3)
        if "raise" in subset:
            raise ValueError(subset["raise"])
        offset = 0 if split == "search" else 1
        ids = (torch.arange(12).reshape(2, 6) + offset) % model.config.vocab_size
        score = float(model(ids).logits.double().mean())
        if subset.get("nan"):
            score = math.nan
        shard_index = -1 if shard is None else shard[0]
        return EvalResult(
            {"score": score},
            {"score": True},
            per_sample={"probe": np.array([score, shard_index, model.config.num_hidden_layers])},
        )


def _probe() -> ProbeEvaluator:
    return ProbeEvaluator()


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.7}\n  - model: b\n    parameters: {weight: 0.3}\ndtype: float32\n",
    "ties": "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.6, density: 0.5}\n  - model: b\n    parameters: {weight: 0.4, density: 0.7}\ndtype: float32\n",
    "dare": "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.5, density: 0.6}\n  - model: c\n    parameters: {weight: 0.5, density: 0.4}\ndtype: float32\nevomerge: {seed: 7}\n",
    "slerp": "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters: {t: 0.3}\ndtype: float32\n",
    # a DFS-like layer path: 4 layers out of 3-layer sources (a new skeleton architecture)
    "path": "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n  - sources: [{model: b, layer_range: [1, 3]}]\ndtype: float32\n",
}


@pytest.fixture(scope="module")
def sources(llama_family) -> dict[str, str]:
    return {name: str(path) for name, path in llama_family.items()}


@pytest.fixture(scope="module")
def pool(ray_session, sources):
    # register this module's classes by value: Ray workers need not import the tests package
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = RayWorkerPool(workers=2, num_cpus_per_worker=1)
    pool.start(sources, _probe, allow_pickle=False, dtype=None)
    yield pool
    pool.shutdown()


# ---- what only these tests look at inside a worker (run there by Ray's __ray_call__) --------------


def worker_pids(pool: RayWorkerPool) -> list[int]:
    return [s["pid"] for s in pool.worker_stats()]


def _source_views(worker, ref: str) -> dict:
    """How a worker actor holds a source: whether its tensors view read-only shared memory, and
    a checksum of its bytes (which reads every page of it)."""
    arrays = worker._shared[ref]
    return {
        "nbytes": sum(int(a.nbytes) for a in arrays),
        "shared_nbytes": sum(int(a.nbytes) for a in arrays if not a.flags.writeable and not a.flags.owndata),
        "checksum": sum(int(a.sum(dtype="uint64")) for a in arrays),
    }


def _restart_meter(worker) -> None:
    """Forget a worker actor's memory peaks so far (the base stays: it was taken after setup)."""
    worker._meter.set_base(worker._meter.base)


def restart_meters(pool: RayWorkerPool) -> None:
    import ray

    ray.get([actor.__ray_call__.remote(_restart_meter) for actor in pool.actors()])


def _collect(pool: RayWorkerPool, n: int, timeout: float = 240.0) -> dict[str, JobOutcome]:
    outcomes: dict[str, JobOutcome] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < n:
        assert time.monotonic() < deadline, f"only {len(outcomes)} of {n} jobs came back"
        for outcome in pool.wait(timeout=5.0):
            outcomes[outcome.job_id] = outcome
    return outcomes


def test_two_workers_match_the_in_process_core(pool, sources):
    assert isinstance(pool, WorkerPool) and pool.size == 2 and pool.idle() == 2
    jobs = [Job(name, Recipe.from_string(text), "search", {"sleep": 0.2}) for name, text in RECIPES.items()]
    jobs.append(Job("ties-holdout-shard", Recipe.from_string(RECIPES["ties"]), "holdout", None, (1, 2)))
    for job in jobs:
        pool.submit(job)
    outcomes = _collect(pool, len(jobs))

    core = WorkerCore(sources, _probe)
    for job in jobs:
        outcome = outcomes[job.job_id]
        expected = core.run(job)
        assert outcome.result.error is None, outcome.result.error
        assert outcome.attempts == 1 and outcome.started <= outcome.finished
        # same tensors; the forward pass may sum in another order (one thread per worker)
        assert outcome.result.objectives["score"] == pytest.approx(expected.objectives["score"], rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(outcome.result.per_sample["probe"], expected.per_sample["probe"], rtol=1e-5, atol=1e-7)
    assert outcomes["path"].result.per_sample["probe"][2] == 4  # the slices built a 4-layer model
    assert outcomes["ties-holdout-shard"].result.per_sample["probe"][1] == 1  # shard reached the evaluator
    assert len({o.worker for o in outcomes.values()}) == 2  # both workers took jobs
    assert pool.idle() == 2

    # TIES's magnitude ranks (int32, one table per source tensor) are held once per node
    elements = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sources["a"]).state_dict().values())
    tables = sum(pool.store_bytes(tables=True).values()) - sum(pool.store_bytes().values())
    assert tables == 2 * elements * 4  # models a and b against the base, each table once
    # every table was computed once at least; the workers read the store's copies, none their own
    stats = pool.worker_stats()
    n_tables = 2 * len(AutoModelForCausalLM.from_pretrained(sources["a"]).state_dict())
    assert sum(s["sparsifier_ranks_computed"] for s in stats) >= n_tables
    assert all(s["sparsifier_own_tables"] == 0 for s in stats)
    assert all(s["jobs_metered"] >= 1 for s in stats)


def test_failing_candidates_come_back_failed_and_the_pool_goes_on(pool):
    recipe = Recipe.from_string(RECIPES["linear"])
    pool.submit(Job("raises", recipe, "search", {"raise": "boom"}))
    pool.submit(Job("nan", recipe, "search", {"nan": True}))
    pool.submit(Job("unknown-model", Recipe.from_string(RECIPES["linear"].replace("model: b", "model: nowhere")), "search"))
    pool.submit(Job("fine", recipe, "search"))
    outcomes = _collect(pool, 4)
    assert "boom" in outcomes["raises"].result.error
    assert "nan" in outcomes["nan"].result.error.lower()
    assert "nowhere" in outcomes["unknown-model"].result.error
    for name in ("raises", "nan", "unknown-model"):
        failed = outcomes[name].result
        assert failed.failed and failed.objectives == {"score": -math.inf} and outcomes[name].attempts == 1
    assert outcomes["fine"].result.error is None and math.isfinite(outcomes["fine"].result.objectives["score"])


def test_dead_workers_are_replaced_and_jobs_retried(pool, tmp_path):
    recipe = Recipe.from_string(RECIPES["ties"])
    replaced = pool.replacements
    pid_file = tmp_path / "pid"
    # one job is killed from outside once, mid-evaluation; another kills its worker every time
    pool.submit(Job("killed-once", recipe, "search", {"sleep": 3.0, "pid_file": str(pid_file)}))
    pool.submit(Job("always-dies", recipe, "search", {"exit": True}))
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the slow job never started"
        pool.wait(timeout=0.2)  # keeps the pool dispatching and replacing while we wait
    killed = int(pid_file.read_text())
    os.kill(killed, signal.SIGKILL)
    outcomes = _collect(pool, 2)

    retried = outcomes["killed-once"]
    assert retried.result.error is None and retried.attempts == 2
    assert int(retried.worker.rsplit(":", 1)[1]) != killed  # the retry ran on a fresh process
    dead = outcomes["always-dies"]
    assert dead.attempts == MAX_ATTEMPTS and "died 3 times" in dead.result.error
    assert dead.result.objectives == {"score": -math.inf}
    assert pool.replacements - replaced == 1 + MAX_ATTEMPTS

    # the pool is whole again: two live workers, both usable
    pool.submit(Job("after-1", recipe, "search", {"sleep": 0.5}))
    pool.submit(Job("after-2", recipe, "search", {"sleep": 0.5}))
    after = _collect(pool, 2)
    assert all(o.result.error is None for o in after.values())
    assert killed not in worker_pids(pool) and pool.idle() == 2


def test_jobs_held_behind_a_running_one_are_not_lost_when_its_worker_dies(pool, tmp_path):
    """With more jobs than workers each busy worker holds its next job; a worker killed then
    gives its held job back unstarted (no attempt spent) and every job comes back once."""
    recipe = Recipe.from_string(RECIPES["linear"])
    pid_file = tmp_path / "pid"
    pool.submit(Job("slow", recipe, "search", {"sleep": 3.0, "pid_file": str(pid_file)}))
    quick = [f"quick-{i}" for i in range(5)]
    for name in quick:
        pool.submit(Job(name, recipe, "search", {"sleep": 0.3}))
    assert pool.pending() == 6
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the slow job never started"
        pool.wait(timeout=0.2)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    outcomes = _collect(pool, 6)
    assert outcomes["slow"].result.error is None and outcomes["slow"].attempts == 2
    for name in quick:
        assert outcomes[name].result.error is None and outcomes[name].attempts == 1
    assert pool.pending() == 0 and pool.idle() == 2


def test_sources_are_shared_through_the_object_store(pool, ray_session, tmp_path):
    """Each source is held once per node: workers map the store's copy read-only, and reading
    all of it adds (almost) nothing to their private memory."""
    big = write_llama(tmp_path / "big", seed=5, layers=1, hidden=256, intermediate=64, vocab=16384)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    before = {s["pid"]: s for s in pool.worker_stats()}
    pool.add_source("stage:big", str(big))
    views = ray_session.get([actor.__ray_call__.remote(_source_views, "stage:big") for actor in pool.actors()])
    after = {s["pid"]: s for s in pool.worker_stats()}

    assert len({v["checksum"] for v in views}) == 1  # both read the whole source, and the same bytes
    for view in views:
        assert view["nbytes"] >= 0.95 * size
        assert view["shared_nbytes"] >= 0.95 * view["nbytes"]  # read-only views of shared memory
    for pid, stats in after.items():
        assert stats["rss"] - before[pid]["rss"] > 0.5 * size  # the pages are mapped in...
        assert stats["uss"] - before[pid]["uss"] < 0.25 * size  # ...but shared, not private
    assert sum(pool.store_bytes().values()) >= size  # one store, one copy

    # and the new source merges like any other
    recipe = Recipe.from_string(
        "merge_method: linear\nmodels:\n  - model: stage:big\n    parameters: {weight: 1.0}\ndtype: float32\n"
    )
    restart_meters(pool)
    pool.submit(Job("big", recipe, "search"))
    outcome = _collect(pool, 1)["big"]
    assert outcome.result.error is None
    ran = next(s for s in pool.worker_stats() if s["pid"] == int(outcome.worker.rsplit(":", 1)[1]))
    model_bytes = ran["model_bytes"]
    assert model_bytes >= 0.95 * size
    # materialized into one resident skeleton, tensor by tensor: holding and merging the
    # candidate costs the model plus one tensor's temporaries (the embedding here), never a
    # second full state dict
    largest = 16384 * 256 * 4
    assert ran["resident"] >= 0.9 * model_bytes
    assert ran["merge_peak"] <= model_bytes + largest + 8 * 2**20

    # a source that cannot be loaded fails the jobs that use it, with the reason
    pool.add_source("stage:gone", str(tmp_path / "gone"))
    pool.submit(Job("gone", Recipe.from_string(RECIPES["linear"].replace("model: b", "model: stage:gone")), "search"))
    gone = _collect(pool, 1)["gone"]
    assert "stage:gone" in gone.result.error and "could not be loaded" in gone.result.error


def test_a_pool_the_cluster_cannot_hold_fails_at_once(ray_session, sources):
    from evomerge.errors import ConfigError

    started = time.monotonic()
    with pytest.raises(ConfigError, match="num_gpus_per_worker"):
        RayWorkerPool(workers=2, num_gpus_per_worker=1).start(sources, _probe, allow_pickle=False, dtype=None)
    assert time.monotonic() - started < 30
    assert ray_session.is_initialized()  # the session's Ray is not this pool's to stop


def test_an_evaluator_that_cannot_be_built_fails_start_with_its_error(ray_session, sources, pool):
    from evomerge.errors import ConfigError

    # the module's pool holds both CPUs: give the doomed pool's worker none, it only has to start
    doomed = RayWorkerPool(workers=1, num_cpus_per_worker=0)
    with pytest.raises(ConfigError, match="no_such_evaluator"):
        doomed.start(sources, "no_such_evaluator", allow_pickle=False, dtype=None)
    assert pool.idle() == 2  # the other pool is untouched
