"""Scheduler + Ray workers: busy fraction, 1 vs 2 worker throughput, memory of a second worker.

Four Llama checkpoints (a random base and three perturbed fine-tunes; hidden 256, 4 layers,
vocab 4096, fp32, ~5.4M parameters each) are merged with TIES (by default) under CMA-ES
(generations of 6; at a generation's end the scheduler splits a candidate across idle workers
by document shards) or random search over the `ps_ties` space, driven by the real `Scheduler`
and `RayWorkerPool` on a local Ray instance with workers of one CPU each. Candidates have
uneven evaluation times: the evaluator runs 1 to 4 forward passes over 16 fixed sequences, the
number derived from the merged weights. As in `evomerge run`, every result goes to a SQLite
ledger before the optimizer is told, and a checkpoint is written after each tell. Each
configuration starts its own Ray (num_cpus = workers).

Figures:
  - worker_busy_fraction (2 workers): the sum of the workers' job times (materialize +
    evaluate, timed by the workers) over workers x the wall time from the first job's start
    to the last job's end, i.e. after the sources are loaded. Goal >= 0.9.
  - speedup_2_workers: evaluations per second with 2 workers over 1, each over that same
    window, so each worker's first job (it computes or maps the TIES rank tables, builds its
    skeleton) counts. Goal >= 1.6. Printed beside it: the cores the workers actually got
    (their CPU seconds / wall seconds), which bounds the speedup on a shared machine, and
    speedup_2_workers_after_warmup, the same ratio from the moment every worker has finished
    its first job (a job straddling that moment counts for its part inside the window).
  - second_worker_extra_bytes: what a second worker adds to the node at its peak: the growth
    of the object store (sources and rank tables are held once per node, so 0 when nothing is
    copied per worker) plus the second worker's private memory growth over its own base
    (interpreter, libraries, evaluator, measured after setup) while it holds and materializes
    a candidate: the resident skeleton plus the merge's temporaries, the peak of every job's
    merge phase (private = peak resident size less file-backed and shared pages; the workers
    restart the peak at each job and again where the evaluator is called). "Second" is the
    2-worker run's worker that grew most. Goal: at most merged_model_bytes (one merged model).
  - Not counted in it, printed apart (second_worker_eval_working_set_bytes): the evaluator's
    working set (activations, logits of a batch of 8 x 64 tokens, the allocator's slack)
    above what is resident when the evaluator starts. Any worker that evaluates pays it,
    whatever the merge machinery does; it scales with the evaluator's batch size. The
    total peak (max of the merge peak and resident + working set) is printed too.
  - second_worker_bytes_per_merged_byte and second_worker_fixed_bytes: the same memory figure
    measured again on sources of `--scaling-hidden` (default 512: a 71 MB model, 1 and 2
    workers, `--scaling-evaluations` each); the line through the two points is what a second
    worker adds as a function of the merged model's size: its slope (1.0 = one merged model
    per merged model) and what is left at size 0 (the per-process state a worker keeps after
    its first job, whatever the model).
Each configuration starts its own Ray; after one untimed warm-up session (the first Ray session
of a process runs slower), the configurations alternate `--runs` times and each keeps its fastest
run (its memory figures come from that run). The machine's load (`uptime`) is printed beside
each run: the cores are shared.

    .venv/bin/python experiments/benchmarks/scheduler.py [--evaluations 24] [--runs 2] [--method ties] [--optimizer cmaes]
        [--scaling-hidden 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evomerge.evaluate.result import EvalResult

HIDDEN, LAYERS, VOCAB, INTERMEDIATE, HEADS = 256, 4, 4096, 768, 4
DOCS, BATCH, SEQ = 16, 8, 64


class UnevenForward:
    """Scores DOCS fixed sequences with 1-4 forward passes each (the count a function of the
    merged weights, so candidates take uneven times); shards are contiguous blocks of docs."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (DOCS, SEQ), generator=gen)

    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}

    def evaluate(self, model, tokenizer, split, subset=None, shard=None) -> EvalResult:
        start = time.perf_counter()
        i, n = shard or (0, 1)
        docs = list(range(DOCS * i // n, DOCS * (i + 1) // n))
        probe = model.get_input_embeddings().weight[0, :8].double().abs().sum().item()
        passes = 1 + int(probe * 1e4) % 4
        scores = []
        for lo in range(0, len(docs), BATCH):
            batch = self.ids[docs[lo : lo + BATCH]]
            for _ in range(passes):
                logits = model(batch).logits
            scores += logits[:, -1].log_softmax(-1)[:, 0].tolist()
        per_doc = np.asarray(scores, dtype=np.float64)
        return EvalResult(
            {"score": float(per_doc.mean())}, {"score": True},
            per_sample={"probe": per_doc}, doc_ids={"probe": docs}, counts={"probe": len(docs)},
            seconds=time.perf_counter() - start,
            task_scores={"probe": float(per_doc.mean())}, objective_weights={"score": {"probe": 1.0}},
        )  # fmt: skip


def build_sources(root: Path, hidden: int = HIDDEN) -> dict[str, str]:
    """base + a, b, c (seeded; intermediate size 3 x `hidden`); written once into `root`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=INTERMEDIATE * hidden // HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
        max_position_embeddings=SEQ, tie_word_embeddings=False,
    )  # fmt: skip
    paths = {}
    base_state = None
    for i, name in enumerate(("base", "a", "b", "c")):
        path = root / name
        paths[name] = str(path)
        if (path / "model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(i)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=gen)
                param.copy_(0.02 * noise if base_state is None else base_state[pname] + 0.005 * noise)
        if base_state is None:
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.save_pretrained(path)
    return paths


class RecordingPool:
    """Passes everything to the pool and keeps each outcome's worker-side timings."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.spans: list[tuple[str, float, float]] = []

    def __getattr__(self, name: str):
        return getattr(self.pool, name)

    @property
    def size(self) -> int:
        return self.pool.size

    def wait(self, timeout: float | None = None):
        outcomes = self.pool.wait(timeout)
        # (worker, started, finished, parts): a shard job is 1/parts of an evaluation
        self.spans += [(o.worker, o.started, o.finished, _parts(o.job_id)) for o in outcomes]
        return outcomes


def _parts(job_id: str) -> int:
    """How many shards the job's evaluation was split into (the scheduler's job ids end in
    `|i/n|counter`)."""
    try:
        return int(job_id.rsplit("|", 2)[1].split("/")[1])
    except (IndexError, ValueError):
        return 1


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_config(
    workers: int, sources: dict[str, str], method: str, optimizer_name: str, evaluations: int, work: Path
) -> dict:
    """One search on `workers` one-CPU Ray workers; returns timings and memory figures."""
    from evomerge.merge.sources import SourcePool
    from evomerge.optim import make_optimizer
    from evomerge.run.checkpoint import save_checkpoint
    from evomerge.run.ledger import Ledger
    from evomerge.run.scheduler import Scheduler
    from evomerge.run.workers import RayWorkerPool
    from evomerge.spaces import build_space

    space = build_space(f"ps_{method}", models=["a", "b", "c"], base="base", pool=SourcePool(aliases=sources))
    options = {"popsize": 6} if optimizer_name == "cmaes" else {}
    optimizer = make_optimizer(
        optimizer_name, dim=space.dim, bounds=space.bounds, x0=space.x0, seed=0,
        objectives={"score": True}, max_evals=evaluations, **options,
    )  # fmt: skip
    load = uptime()
    pool = RayWorkerPool(workers=workers, num_cpus_per_worker=1)
    t0 = time.perf_counter()
    pool.start(sources, UnevenForward, allow_pickle=False, dtype=None)
    start_seconds = time.perf_counter() - t0
    ledger_path = work / f"ledger-{workers}.sqlite"
    ledger_path.unlink(missing_ok=True)
    ledger = Ledger.open(ledger_path)
    recording = RecordingPool(pool)
    run_dir = work / f"run-{workers}"

    def checkpoint(counters: dict) -> None:
        """What the driver does after each tell: ledger rows on disk, then the optimizer's state
        written atomically (temp file, fsync, rename)."""
        ledger.sync()
        save_checkpoint(run_dir, {"optimizer": optimizer.state_dict(), "ledger_seq": ledger.last_seq(), **counters})

    try:
        cpu_before = sum(s["cpu_seconds"] for s in pool.worker_stats())
        scheduler = Scheduler(
            stage="bench", optimizer=optimizer, pool=recording, ledger=ledger,
            decode=lambda cand: space.decode(cand.genome), subset_for=lambda gen: (None, "all"),
            fitness=lambda r: None if r.failed else r.objectives["score"], on_tell=checkpoint,
            shardable=True,
        )  # fmt: skip
        scheduler.run()
        stats = pool.worker_stats()
        cpu = sum(s["cpu_seconds"] for s in stats) - cpu_before
        stores = pool.store_bytes(tables=True)
    finally:
        ledger.close()
        pool.shutdown()
    with sqlite3.connect(ledger_path) as conn:
        statuses = [r[0] for r in conn.execute("SELECT status FROM evaluations WHERE split = 'search'")]
    assert statuses == ["ok"] * evaluations, statuses
    spans = recording.spans
    first, last = min(s[1] for s in spans), max(s[2] for s in spans)
    wall = last - first
    busy = sum(s[2] - s[1] for s in spans)
    # after warm-up: from the moment every worker has finished its first job (rank tables,
    # skeleton, lazy imports) to the end, counting the part of each job inside that window
    warm = max(min(s[2] for s in spans if s[0] == w) for w in {s[0] for s in spans})
    warm_done = sum(
        max(0.0, min(s[2], last) - max(s[1], warm)) / (s[2] - s[1]) / s[3] for s in spans if s[2] > s[1]
    )
    # a worker's idle time between two of its jobs: mostly the round trip through the driver
    gaps = []
    for w in {s[0] for s in spans}:
        mine = sorted((s[1], s[2]) for s in spans if s[0] == w)
        gaps += [b[0] - a[1] for a, b in zip(mine, mine[1:], strict=False)]
    memory_keys = ("merge_peak", "resident", "evaluate_peak", "eval_working_set", "after_job", "first_job_merge_peak")
    memory = [{k: s[k] for k in memory_keys} for s in stats]
    return {
        "workers": workers,
        "load": load,
        "start_seconds": start_seconds,
        "wall_seconds": wall,
        "evaluations": len(statuses),
        "jobs": len(spans),  # more than evaluations when candidates were split into shards
        "per_second": len(statuses) / wall,
        "per_second_after_warmup": warm_done / (last - warm),
        "busy_fraction": busy / (workers * wall),
        "idle_between_jobs_ms": {
            "mean": 1e3 * float(np.mean(gaps)) if gaps else 0.0,
            "median": 1e3 * float(np.median(gaps)) if gaps else 0.0,
            "sum": 1e3 * float(np.sum(gaps)) if gaps else 0.0,
        },
        "cpu_share": cpu / wall,  # cores the workers actually got (the machine is shared)
        "jobs_per_worker": {w: sum(1 for s in spans if s[0] == w) for w in sorted({s[0] for s in spans})},
        "store_bytes": sum(stores.values()),
        "memory": memory,
        "merged_model_bytes": max(s["model_bytes"] for s in stats),
        "sparsifier_bytes": [s["sparsifier_bytes"] for s in stats],
        # CPU seconds of each worker's first job, and the mean over its later jobs
        "first_job_cpu": [s["job_cpu_seconds"][0] for s in stats if s["job_cpu_seconds"]],
        "later_job_cpu": float(np.mean([c for s in stats for c in s["job_cpu_seconds"][1:]])),
        "worker_uss": [s["uss"] for s in stats],
    }


def second_worker(two: dict) -> dict:
    """The memory figures of the 2-worker run's worker that grew most while holding and merging
    (both are "a second worker")."""
    return max(two["memory"], key=lambda m: m["merge_peak"])


def second_worker_bytes(one: dict, two: dict) -> tuple[int, int]:
    """(what the second worker adds to the node, merged_model_bytes) from a 1-worker and a
    2-worker run: the object store's growth plus that worker's merge-phase peak."""
    return two["store_bytes"] - one["store_bytes"] + second_worker(two)["merge_peak"], two["merged_model_bytes"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--method", default="ties", choices=["ties", "linear", "task_arithmetic", "dare_ties"])
    parser.add_argument("--optimizer", default="cmaes", choices=["cmaes", "random"], help="cmaes: generations of 6")
    parser.add_argument("--work", type=Path, default=None, help="where sources and ledgers go (default: a temp dir)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="the sources' hidden size (memory scaling checks)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per configuration, alternating (best kept)")
    parser.add_argument("--scaling-hidden", type=int, default=512,
                        help="also measure a second worker's memory on sources of this hidden size (0: skip)")
    parser.add_argument("--scaling-evaluations", type=int, default=12, help="evaluations per run at --scaling-hidden")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="evomerge-bench-scheduler-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / ("sources" if args.hidden == HIDDEN else f"sources-h{args.hidden}")
    sources = build_sources(folder, args.hidden)
    print(f"sources: {folder} (4 x {args.hidden}-hidden {LAYERS}-layer Llama), method {args.method}, "
          f"optimizer {args.optimizer}, {args.evaluations} evaluations per configuration")  # fmt: skip
    # The first Ray session of a process runs slower (measured: 0.72 s CPU per later job against
    # 0.51-0.59 s in the sessions after it), which would favour whichever configuration comes
    # second: one untimed warm-up session, then the configurations alternate and each keeps its
    # fastest run, as merge_speed.py does.
    run_config(1, sources, args.method, args.optimizer, min(args.evaluations, 6), work)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.runs):
        for workers in (1, 2):
            result = run_config(workers, sources, args.method, args.optimizer, args.evaluations, work)
            runs[workers].append(result)
            print(json.dumps(result, indent=1, default=str))
    for workers, done in runs.items():
        print(f"{workers} worker(s): evaluations/s per run {[round(r['per_second'], 2) for r in done]}")
    one, two = (max(runs[w], key=lambda r: r["per_second"]) for w in (1, 2))
    speedup = two["per_second"] / one["per_second"]
    warm_speedup = two["per_second_after_warmup"] / one["per_second_after_warmup"]
    extra, merged = second_worker_bytes(one, two)
    second = second_worker(two)
    working_set = second["eval_working_set"]
    total_peak = max(second["merge_peak"], second["evaluate_peak"])
    print(f"load during the runs: 1 worker [{one['load']}], 2 workers [{two['load']}]")
    print(f"evaluations/s: 1 worker {one['per_second']:.2f}, 2 workers {two['per_second']:.2f}; "
          f"cores the workers got: {one['cpu_share']:.2f} vs {two['cpu_share']:.2f} "
          f"(per core: {one['per_second'] / one['cpu_share']:.2f} vs {two['per_second'] / two['cpu_share']:.2f})")  # fmt: skip
    print(f"CPU seconds per job: first job of each worker {[round(c, 2) for c in one['first_job_cpu']]} vs "
          f"{[round(c, 2) for c in two['first_job_cpu']]}, later jobs {one['later_job_cpu']:.3f} vs {two['later_job_cpu']:.3f}")  # fmt: skip
    print(f"after warm-up (every worker past its first job): evaluations/s {one['per_second_after_warmup']:.2f} vs "
          f"{two['per_second_after_warmup']:.2f}, speedup {warm_speedup:.2f}")  # fmt: skip
    print(f"object store (sources + shared rank tables, once per node): 1 worker {one['store_bytes']}, "
          f"2 workers {two['store_bytes']} bytes")  # fmt: skip
    for run in (one, two):
        for i, m in enumerate(run["memory"]):
            print(f"{run['workers']} worker(s), worker {i}: private growth over its base: holding + merging "
                  f"{m['merge_peak']} (first job {m['first_job_merge_peak']}), resident at evaluation "
                  f"{m['resident']}, evaluating {m['evaluate_peak']} (evaluator working set "
                  f"{m['eval_working_set']}), after the last job {m['after_job']}")  # fmt: skip
    print(f"second worker: peak private growth {total_peak} bytes in all; holding and merging a candidate "
          f"{second['merge_peak']} (counted in second_worker_extra_bytes); while evaluating, what stays resident "
          f"{second['resident']} plus the evaluator's working set at batch {BATCH}, {working_set} "
          f"(any worker pays it: printed apart, not counted)")  # fmt: skip
    print(f"second worker beyond one merged model: {extra - merged} bytes")
    if args.scaling_hidden and args.scaling_hidden != args.hidden:
        # The same 2-worker memory figures on sources of another size: a line through the two
        # points splits what a second worker adds into bytes per merged-model byte (the slope)
        # and a part that does not grow with the model (per-process state after a first job).
        big_sources = build_sources(work / f"sources-h{args.scaling_hidden}", args.scaling_hidden)
        big = {w: run_config(w, big_sources, args.method, args.optimizer, args.scaling_evaluations, work) for w in (1, 2)}
        big_extra, big_merged = second_worker_bytes(big[1], big[2])
        slope = (big_extra - extra) / (big_merged - merged)
        print(f"hidden {args.scaling_hidden}: second_worker_extra_bytes {big_extra} against merged_model_bytes "
              f"{big_merged} ({big_extra - big_merged} beyond one merged model), load [{big[2]['load']}]")  # fmt: skip
        print(f"second_worker_bytes_per_merged_byte: {slope:.3f}")
        print(f"second_worker_fixed_bytes: {extra - slope * merged:.0f}")
    print(f"second_worker_eval_working_set_bytes: {working_set}")
    print(f"speedup_2_workers_after_warmup: {warm_speedup:.2f}")
    print(f"worker_busy_fraction: {two['busy_fraction']:.3f}")
    print(f"speedup_2_workers: {speedup:.2f}")
    print(f"second_worker_extra_bytes: {extra}")
    print(f"merged_model_bytes: {merged}")

if __name__ == "__main__":
    sys.exit(main())
