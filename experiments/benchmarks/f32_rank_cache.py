"""TIES over float32 sources: the compact rank cache against sorted magnitudes and one-shot selection.

`CachedSparsifier` ranks a float32 delta by a histogram of 16-bit keys of its magnitudes (256 KiB
per tensor), exact after a scan of the bin that holds each candidate's threshold; before it kept
the magnitudes sorted (4 bytes per element). This measures, on one thread, `--tensors` tensors of
TinyLlama's MLP shape (2048 x 5632) with a base and three fine-tunes in memory:

- one magnitude mask per element (a threshold for a new density: the table lookup and the scan);
- a whole TIES candidate per parameter (new weights and densities, merged into resident outputs)
  with the compact tables, with sorted magnitudes (the table kind forced) and with one-shot
  selection; and the bytes each cache holds.

Seconds are process CPU time, the best of `--candidates` after the first (which builds the
tables); a loaded machine moves them.

    python experiments/benchmarks/f32_rank_cache.py [--tensors 4] [--candidates 4]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import evomerge.merge.sparsify as sparsify  # noqa: E402
from evomerge.merge.engine import single_threaded_torch  # noqa: E402
from evomerge.merge.methods import MergeContext, get_method  # noqa: E402
from evomerge.merge.methods.task_arithmetic import _Delta  # noqa: E402

SHAPE = (2048, 5632)


def best_cpu(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(SHAPE, generator=gen) * 0.02 for _ in range(args.tensors)]
    models = [[b + 0.002 * torch.randn(SHAPE, generator=gen) for _ in range(3)] for b in bases]
    outs = [torch.empty(SHAPE) for _ in range(args.tensors)]
    params = args.tensors * bases[0].numel()
    ties = get_method("ties")

    # one mask: the delta of one source (formed as the kernel forms it), a new density each time
    delta = _Delta(models[0][0], bases[0], torch.float32)
    n = delta.numel
    cached = sparsify.CachedSparsifier()
    cached.magnitude("k", delta, n, 0, n // 3)
    densities = (0.1, 0.3, 0.5, 0.7)

    def masks(sp) -> Callable[[], None]:
        return lambda: [sp.magnitude("k", delta, n, 0, int(n * d)) for d in densities]

    with single_threaded_torch():
        compact_mask = best_cpu(masks(cached), args.candidates) / len(densities) / n * 1e9
        one_shot_mask = best_cpu(masks(sparsify.OneShotSparsifier()), args.candidates) / len(densities) / n * 1e9
    print(f"one mask, {SHAPE[0]}x{SHAPE[1]} fp32: compact {compact_mask:.2f} ns/element, one-shot {one_shot_mask:.2f}; "
          f"table {cached.nbytes() / 2**10:.0f} KiB (sorted magnitudes: {4 * n / 2**20:.1f} MiB)", flush=True)

    def candidate(sp, rng: random.Random) -> None:
        values = [{"weight": rng.uniform(0.2, 1.2), "density": rng.uniform(0.1, 0.9)} for _ in range(3)]
        for t, (base, xs) in enumerate(zip(bases, models, strict=True)):
            keys = [(f"m{i}", f"t{t}", "base") for i in range(3)]
            ties.merge(base, xs, values, {}, MergeContext(f"t{t}", keys, sp, seed=0), out=outs[t])

    figures = {}
    for label, sp, kind in (("compact", sparsify.CachedSparsifier(), None), ("sorted", sparsify.CachedSparsifier(), "sorted"),
                            ("one_shot", sparsify.OneShotSparsifier(), None)):
        table_kind = sparsify._table_kind
        if kind is not None:
            sparsify._table_kind = lambda dtype, numel, kind=kind: kind
        rng = random.Random(0)
        try:
            with single_threaded_torch():
                seconds = best_cpu(lambda sp=sp, rng=rng: candidate(sp, rng), args.candidates)
        finally:
            sparsify._table_kind = table_kind
        held = sp.nbytes() if isinstance(sp, sparsify.CachedSparsifier) else 0
        figures[label] = seconds / params * 1e9
        print(f"TIES candidate, {label:<8}: {figures[label]:.2f} ns/parameter CPU; cache holds {held / 1e6:.1f} MB "
              f"for {params / 1e6:.1f}M parameters x 3 sources", flush=True)
    print()
    print(f"f32_mask_ns_per_element: {compact_mask:.2f}")
    print(f"f32_ties_candidate_ns_per_parameter: {figures['compact']:.2f}")


if __name__ == "__main__":
    main()
