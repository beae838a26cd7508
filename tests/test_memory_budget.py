"""The `memory:` section (evomerge/memory.py): sizes, defaults from the machine, one-line errors,
and what a run's status and report say each part holds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from evomerge.config import parse_experiment
from evomerge.errors import ConfigError
from evomerge.memory import (
    MemorySpec,
    NodeMemory,
    WorkerMemory,
    held_report,
    memory_lines,
    parse_size,
    resolve_memory,
    worker_budget,
)
from evomerge.run.status import format_status, run_status
from tests.run_helpers import cli
from tests.test_run import experiment, score, write_exp

GB = 10**9


def test_sizes_are_bytes_units_or_percentages() -> None:
    assert parse_size(123) == 123
    assert parse_size("12GB") == 12 * GB
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size("50%", 10 * GB) == 5 * GB
    assert parse_size("auto") is None and parse_size(None) is None
    for bad in ("12XB", "-1GB", "150%", True, -5, "lots"):
        with pytest.raises(ValueError):
            parse_size(bad, GB)


def test_defaults_come_from_the_available_memory() -> None:
    budget = resolve_memory(None, sources=4 * GB, skeleton=GB, workers=2, ray=True, available=20 * GB)
    assert budget.limit == 17 * GB  # 85% of what is available
    # what the limit leaves after the sources, two skeletons and three processes' state (2 workers + driver)
    assert budget.caches == 17 * GB - 4 * GB - 2 * GB - 3 * GB
    assert budget.planned == budget.limit
    assert budget.object_store >= budget.sources + budget.caches
    local = resolve_memory(None, sources=4 * GB, skeleton=GB, workers=1, ray=False, available=20 * GB)
    assert local.object_store is None and local.caches == 17 * GB - 4 * GB - GB - GB
    assert budget.gpu_budget(free_gpu_bytes=80 * GB, skeleton_bytes=14 * GB) == int(0.9 * 80 * GB) - 14 * GB
    fixed = resolve_memory(MemorySpec(worker=WorkerMemory(gpu="40GB")), sources=GB, skeleton=GB, workers=1, ray=False, available=20 * GB)
    assert fixed.gpu_budget(free_gpu_bytes=30 * GB, skeleton_bytes=GB) == 29 * GB  # never more than is free


@pytest.mark.parametrize(
    "spec, field, words",
    [
        (MemorySpec(node=NodeMemory(limit="5GB")), "memory.node.limit", "need 6.00 GB, more than the limit of 5.00 GB"),
        (MemorySpec(node=NodeMemory(limit="10%")), "memory.node.limit", "10% of 40.00 GB available"),
        (MemorySpec(node=NodeMemory(caches="30GB")), "memory.node.caches", "30.00 GB of caches do not fit"),
        (MemorySpec(node=NodeMemory(object_store="3GB")), "memory.node.object_store", "less than the sources (4.00 GB)"),
    ],
)
def test_budgets_that_cannot_hold_the_run_name_their_field(spec: MemorySpec, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_memory(spec, sources=4 * GB, skeleton=GB, workers=2, ray=True, available=40 * GB, file="e.yaml")
    assert info.value.field == field and words in info.value.message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "memory, message",
    [
        ({"node": {"limit": "12XB"}}, "memory.node.limit: must be bytes, a size such as '8GB'"),
        ({"node": {"limts": "12GB"}}, "memory.node.limts: unknown field; valid: limit, caches, object_store"),
        ({"worker": {"gpu": "120%"}}, "memory.worker.gpu: a percentage must be at most 100%"),
        ({"swap": 1}, "memory.swap: unknown field; valid: node, worker"),
    ],
)
def test_schema_errors_are_one_line(memory: dict, message: str) -> None:
    data = {"name": "t", "models": {"sources": ["a"]}, "memory": memory,
            "stages": [{"name": "ps", "space": "ps_ties", "evaluator": "zoo_add", "optimizer": "random", "budget": {"evaluations": 2}}]}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_experiment(data, file="e.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_run_that_cannot_fit_fails_before_anything_starts(llama_family: dict[str, Path], tmp_path: Path) -> None:
    exp = experiment(llama_family, memory={"node": {"limit": "10kB"}})
    exp_file = write_exp(tmp_path / "tight.yaml", exp)
    code, out = cli("run", exp_file, "--out", tmp_path / "run", "--local")
    assert code == 2, out
    assert out.count("\n") == 1 and "memory.node.limit:" in out and str(exp_file) in out, out
    assert not (tmp_path / "run").exists()


def test_status_and_report_show_the_budget_and_what_each_part_holds(llama_family: dict[str, Path], tmp_path: Path) -> None:
    exp = experiment(llama_family, memory={"node": {"limit": "4GB", "caches": "1MB"}})
    exp["stages"][0]["budget"] = {"evaluations": 2}
    exp["stages"][0]["holdout_top_k"] = 0
    run_dir = tmp_path / "run"
    code, out = cli("run", write_exp(tmp_path / "e.yaml", exp), "--out", run_dir, "--local")
    assert code == 0, out
    report = json.loads((run_dir / "memory.json").read_text())
    assert report["budget"]["limit"] == 4 * GB and report["budget"]["caches"] == 10**6
    held = report["held"]
    assert held["node"]["sources"] > 0
    assert held["workers"][0]["skeleton"] > 0
    code, out = cli("status", run_dir)
    assert code == 0 and "memory: node limit 4.00 GB" in out and "caches 0.00 GB" in out and "worker local-0: skeleton" in out, out
    code, out = cli("status", run_dir, "--json")
    assert code == 0 and json.loads(out)["memory"]["budget"]["limit"] == 4 * GB
    lines = memory_lines(report)
    assert lines and lines[0].startswith("memory: node limit 4.00 GB")
    code, out = cli("resume", run_dir, "--set", "memory.node.caches=2MB")
    assert code == 0, out


def test_held_report_reads_what_the_nodes_and_workers_say() -> None:
    stats = {"pid": 7, "memory_parts": {"skeleton": 5, "sources_on_device": 2, "caches": 1}, "private_base": 3,
             "merge_peak": 4, "evaluate_peak": 6, "cache_fallbacks": 9, "merge_seconds": [0.5, 0.25]}  # fmt: skip
    held = held_report([{"node": "a", "sources": 10, "tables": 1}, {"node": "b", "sources": 10, "tables": 0}], [stats], object_store_used=21)
    assert held["node"] == {"sources": 20, "caches": 1, "object_store_used": 21}
    worker = held["workers"][0]
    assert worker["name"] == "w0:7" and worker["skeleton"] == 5 and worker["sources_on_device"] == 2
    assert worker["cache_fallbacks"] == 9 and worker["merge_seconds"] == [0.5, 0.25]
    line = memory_lines({"budget": None, "held": held})[-1]
    assert line.startswith("  worker w0:7: skeleton 0.00 GB") and "9 tensors by one-shot selection" in line
    budget = resolve_memory(None, sources=GB, skeleton=GB, workers=1, ray=False, available=20 * GB)
    assert worker_budget(budget, "cpu") == {"cache_budget": budget.caches, "gpu_budget": None}
    assert worker_budget(None, "cpu") == {}


def watch(model, tokenizer, split, subset=None, shard=None):
    """`tests.test_run:score`, and from its second call on, until it has seen it: what
    `evomerge status` says of the run in EVOMERGE_TEST_RUN_DIR while its pool is open (the
    figures of a worker that holds its skeleton, which it did not when the pool started)."""
    watch.calls = getattr(watch, "calls", 0) + 1
    run_dir = Path(os.environ["EVOMERGE_TEST_RUN_DIR"])
    deadline = time.monotonic() + 10
    while watch.calls >= 2 and not getattr(watch, "seen", None) and time.monotonic() < deadline:
        status = run_status(run_dir)
        workers = ((status.get("memory") or {}).get("held") or {}).get("workers") or []
        if workers and workers[0].get("skeleton", 0) > 0:
            watch.seen = (status["memory"], format_status(status))
        time.sleep(0.05)
    return score(model, tokenizer, split, subset, shard)


def test_status_shows_memory_figures_while_the_run_goes_on(llama_family: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    exp = experiment(llama_family, memory={"node": {"limit": "4GB"}})
    stage = exp["stages"][0]
    stage["evaluator"] = {"kind": "python", "callable": "tests.test_memory_budget:watch", "objectives": {"acc": True}}
    stage.update(optimizer={"name": "random"}, budget={"evaluations": 4}, holdout_top_k=0)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("EVOMERGE_TEST_RUN_DIR", str(run_dir))
    watch.calls, watch.seen = 0, None
    code, out = cli("run", write_exp(tmp_path / "e.yaml", exp), "--out", run_dir, "--local")
    assert code == 0, out
    assert watch.seen, "memory.json was not refreshed while the run went on"
    report, text = watch.seen
    assert report["held"]["workers"][0]["skeleton"] > 0 and report["at"] > 0
    assert "memory: node limit 4.00 GB" in text and "node holds (at " in text and "worker local-0: skeleton" in text, text
