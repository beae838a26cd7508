"""What tracking costs a search: the same run with `tracking:` off and with MLflow, TensorBoard
and W&B (offline) on, alternated `--repeats` times.

The run: a PS TIES stage over the `test` zoo (base + add + reverse), the lm-eval evaluator
`zoo_all` on `--limit` documents per task, CMA-ES (popsize 4) for `--evaluations`, in-process
workers (`--local`). Per run, the search's wall time is read from its ledger (the first search
row's start to the last one's finish: what the scheduler spends, without the start-up and the
final wait for the trackers to drain), and the whole `start_run` is timed too. The figures are
medians over the repeats (the machine is shared). Ends with `search_seconds_off`,
`search_seconds_on`, `search_slowdown` (on / off), `run_seconds_off`, `run_seconds_on` and
`ledgers_equal` (every row but timings and worker names, tracked vs untracked).

    .venv/bin/python experiments/benchmarks/tracking_overhead.py [--repeats 3] [--evaluations 12] [--limit 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml  # noqa: E402

TRACKING = {"mlflow": {}, "tensorboard": {}, "wandb": {"project": "evomerge-bench"}}


def experiment(evaluations: int, limit: int, tracked: bool) -> dict:
    return {
        "name": "tracking_overhead",
        "seed": 0,
        "models": {"base": "zoo:test/base", "sources": ["zoo:test/add", "zoo:test/reverse"]},
        "stages": [
            {
                "name": "ps",
                "space": "ps_ties",
                "evaluator": "zoo_all",
                "evaluator_overrides": {"limit": limit, "holdout_limit": limit},
                "optimizer": {"name": "cmaes", "popsize": 4},
                "budget": {"evaluations": evaluations},
                "holdout_top_k": 1,
            }
        ],
        "ray": {"workers": 0},
        "tracking": TRACKING if tracked else {},
    }


def one_run(root: Path, name: str, exp: dict) -> tuple[float, float, list]:
    from evomerge.run.driver import start_run
    from evomerge.run.ledger import Ledger

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    start = time.perf_counter()
    start_run(path, out=root / name, local=True, echo=lambda line: None)
    total = time.perf_counter() - start
    with Ledger.open(root / name / "ledger.sqlite", readonly=True) as ledger:
        rows = ledger.rows()
    search = [r for r in rows if r.split == "search"]
    return max(r.finished for r in search) - min(r.started for r in search), total, [r.comparable() for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=12)
    parser.add_argument("--limit", type=int, default=16)
    args = parser.parse_args()

    from evomerge.zoo import build_zoo

    build_zoo("test")
    search: dict[bool, list[float]] = {False: [], True: []}
    total: dict[bool, list[float]] = {False: [], True: []}
    ledgers: dict[bool, list] = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-tracking-bench-") as tmp:
        for i in range(args.repeats):
            for tracked in (False, True):
                name = f"{'on' if tracked else 'off'}-{i}"
                seconds, wall, rows = one_run(Path(tmp), name, experiment(args.evaluations, args.limit, tracked))
                search[tracked].append(seconds)
                total[tracked].append(wall)
                ledgers.setdefault(tracked, rows)
                print(f"{name}: search {seconds:.2f} s, run {wall:.2f} s", flush=True)
    off, on = statistics.median(search[False]), statistics.median(search[True])
    print(f"search_seconds_off: {off:.2f}")
    print(f"search_seconds_on: {on:.2f}")
    print(f"search_slowdown: {on / off:.3f}")
    print(f"run_seconds_off: {statistics.median(total[False]):.2f}")
    print(f"run_seconds_on: {statistics.median(total[True]):.2f}")
    print(f"ledgers_equal: {str(ledgers[False] == ledgers[True]).lower()}")


if __name__ == "__main__":
    main()
