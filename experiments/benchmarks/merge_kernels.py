"""In-memory merge candidates per parameter on a few layers of TinyLlama's shape (bfloat16).

A proxy for the scale benchmark's candidate figures that fits a shared machine: the models of
`llama_shapes.py` with ``--layers`` layers (default 2: 219M parameters, 0.44 GB per model),
sources resident, the engine's default sparsifier (`CachedSparsifier`), new densities and
weights per candidate, ``--threads`` torch threads (default 1, as a worker has). For each
method: seconds per candidate after the first, wall and CPU (CPU time is what a loaded machine
distorts least), both through `iter_merged` (a new tensor per output) and `merge_into` (into
resident targets, as a worker merges into its skeleton), per parameter and scaled to
TinyLlama-1.1B's 1,100,048,384 parameters.

    python experiments/benchmarks/merge_kernels.py [--layers 2] [--candidates 4] [--root DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evomerge.merge.engine import iter_merged, merge_into, plan_merge  # noqa: E402
from evomerge.merge.sources import SourcePool  # noqa: E402
from evomerge.merge.sparsify import CachedSparsifier  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from experiments.benchmarks.llama_shapes import LlamaSpec, build  # noqa: E402

TINYLLAMA_PARAMETERS = 1_100_048_384
METHODS = ("task_arithmetic", "ties", "dare_ties")


def recipe(method: str, rng: random.Random) -> Recipe:
    models = "".join(
        f"  - model: {m}\n    parameters: {{weight: {rng.uniform(0.2, 0.8):.4f}, density: {rng.uniform(0.2, 0.9):.4f}}}\n"
        for m in ("ft1", "ft2", "ft3")
    )
    return Recipe.from_string(f"merge_method: {method}\nbase_model: base\nmodels:\n{models}")


def candidates(method: str, pool: SourcePool, count: int, *, into: bool) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``count`` candidates of ``method`` (the first one included)."""
    rng = random.Random(1)
    sparsifier = CachedSparsifier()
    targets = None
    walls, cpus = [], []
    for _ in range(count):
        plan = plan_merge(recipe(method, rng), pool)
        if into and targets is None:
            targets = {t.name: torch.empty(pool.get("base").shape(t.name), dtype=torch.bfloat16) for t in plan.tasks}
        wall, cpu = time.perf_counter(), time.process_time()
        if into:
            for _name in merge_into(plan, pool, targets, sparsifier):
                pass
        else:
            for _name, tensor in iter_merged(plan, pool, sparsifier):
                del tensor
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = LlamaSpec(layers=args.layers)
    dirs = build(spec, args.root, log=False)
    pool = SourcePool(aliases={name: str(path) for name, path in dirs.items()}, resident=True)
    for name in dirs:
        pool.get(name).load_all()
    params = spec.parameters()
    print(f"proxy: {args.layers} layers, {params:,} parameters, bfloat16, {args.threads} thread(s)")
    figures = {}
    for method in METHODS:
        for into in (False, True):
            walls, cpus = candidates(method, pool, args.candidates, into=into)
            wall, cpu = min(walls[1:]), min(cpus[1:])
            path = "merge_into" if into else "iter_merged"
            print(f"{method} {path}: first {walls[0]:.2f} s; after it wall {wall:.3f} s, CPU {cpu:.3f} s per candidate "
                  f"({cpu / params * 1e9:.2f} ns CPU per parameter)")
            figures[f"{method}_{path}"] = cpu / params * TINYLLAMA_PARAMETERS
    for name, seconds in figures.items():
        print(f"proxy_{name}_cpu_seconds_at_1p1b: {seconds:.2f}")


if __name__ == "__main__":
    main()
