"""GPU check: candidates of three 1.1B bf16 Llama fine-tunes merged in memory on the GPU, as a
GPU worker merges them, and compared with the CPU path.

Needs torch, transformers, safetensors and evomerge's own light dependencies (numpy, pydantic,
PyYAML): no Ray, no lm-eval, no network. On the machine it runs on it builds (or finds cached)
the models of llama_shapes.py, then for TIES, DARE-TIES and task_arithmetic merges
`--candidates` new parameter sets each (weights and densities drawn from a seeded generator)
with a `WorkerCore` on the device (`--device`, default cuda when there is one), the recipe seed
fixed as in a search (DARE's noise is drawn once, then kept within the cache): the sources
go to the GPU within its budget and each candidate is merged there straight into the
resident bf16 skeleton (evomerge.merge.engine.merge_into over DeviceSources). Seconds per
candidate are wall times with the device synchronized, after the method's first candidate
(which copies the sources over and builds its tables).

Then the streamed path, as a worker whose sources do not fit its GPU: TIES again with a small
GPU budget (`--streamed-budget`, default 1/4 of one model: 1/16 of the four), so most source
tensors are copied from pinned host memory for each candidate, the next ones on a side stream
while the current one merges (`DeviceSources` prefetch); same comparison with the CPU path. On a CPU run the
device is "cpu:0" for this part (the same bookkeeping, synchronous copies).

Each candidate is compared with the CPU path on a sample of tensors (a few fixed ones and
one that changes per candidate): the CPU engine (`iter_merged` with the one-shot sparsifier,
on the CPU copies of the sources) merges those tensors, and the device's tensors must be
bit-equal, or within the 16-bit rule of the mergekit parity tests (at most 2% of elements more
than 2 bf16 ulps apart; a DARE mask drawn differently would put ~25% of them out).

Prints `gpu_streamed_ties_candidate_seconds`, then ends with `gpu_ties_candidate_seconds`,
`gpu_ta_candidate_seconds`, `gpu_equal_to_cpu: true|false` (true only when the streamed
candidates are equal too).

    python experiments/benchmarks/gpu_check.py                      # on a GPU machine, < 8 min
    python experiments/benchmarks/gpu_check.py --device cpu --small --layers 2 --candidates 3   # smoke check on a CPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llama_shapes import NAMES, add_spec_args, build, spec_from_args  # noqa: E402

METHODS = ("ties", "dare_ties", "task_arithmetic")
MAX_OUT_OF_RULE = 0.02


class _NoEvaluator:
    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}

    def evaluate(self, *args, **kwargs):  # noqa: ANN002, ANN003 - never called
        raise RuntimeError("not evaluated")


def recipe_text(method: str, dirs: dict[str, Path], weights: list[float], densities: list[float], seed: int) -> str:
    lines = [f"merge_method: {method}", f"base_model: {dirs['base']}", "models:"]
    for i, name in enumerate(NAMES[1:]):
        params = f"weight: {weights[i]:.4f}" + (f", density: {densities[i]:.4f}" if method != "task_arithmetic" else "")
        lines.append(f"  - model: {dirs[name]}\n    parameters: {{{params}}}")
    lines += ["dtype: bfloat16", f"evomerge: {{seed: {seed}}}"]
    return "\n".join(lines) + "\n"


def sample_names(layers: int, candidate: int) -> list[str]:
    fixed = ["model.layers.0.self_attn.k_proj.weight", f"model.layers.{layers // 2}.mlp.down_proj.weight", "model.norm.weight"]
    moving = f"model.layers.{candidate % layers}.self_attn.q_proj.weight"
    return fixed + [moving] + (["lm_head.weight"] if candidate == 0 else [])


def compare(device_tensor, cpu_tensor) -> tuple[bool, float]:
    """(bit-equal, fraction of elements more than 2 ulps of the dtype apart)."""
    import torch

    a, b = device_tensor.cpu(), cpu_tensor
    if torch.equal(a, b):
        return True, 0.0
    af, bf = a.float(), b.float()
    eps = torch.finfo(a.dtype).eps if a.dtype.is_floating_point else 0.0
    beyond = (af - bf).abs() > 2 * eps * torch.maximum(af.abs(), bf.abs())
    return False, float(beyond.float().mean())


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(parser)
    parser.add_argument("--device", default=None, help="where to merge (default: cuda when available, else cpu)")
    parser.add_argument("--candidates", type=int, default=20, help="new parameter sets per method")
    parser.add_argument("--streamed-candidates", type=int, default=5, help="TIES candidates on the streamed path")
    parser.add_argument("--streamed-budget", type=float, default=0.25,
                        help="GPU budget of the streamed path, as a fraction of one model's bytes")
    args = parser.parse_args()

    import torch

    from evomerge.merge.device import DeviceSources
    from evomerge.merge.engine import iter_merged, plan_merge
    from evomerge.merge.sources import SourcePool
    from evomerge.merge.sparsify import OneShotSparsifier
    from evomerge.recipe import Recipe
    from evomerge.run.worker_core import WorkerCore

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"device: {device} ({where}); torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    spec = spec_from_args(args)
    dirs = build(spec, args.root)
    print(f"models ready in {time.perf_counter() - start:.0f} s ({spec.parameters() / 1e9:.2f}B parameters each)", flush=True)

    cpu_pool = SourcePool(resident=True)  # the CPU path's sources, read once
    for folder in dirs.values():
        cpu_pool.get(str(folder)).load_all()
    tensors = {str(d): {n: cpu_pool.get(str(d)).get(n) for n in cpu_pool.get(str(d)).names} for d in dirs.values()}
    core = WorkerCore({str(d): str(d) for d in dirs.values()}, _NoEvaluator, dtype="bfloat16", device=device, tensors=tensors)
    reference = OneShotSparsifier()
    rng = random.Random(0)
    seconds: dict[str, list[float]] = {}
    equal = True

    def check(method: str, worker: WorkerCore, candidates: int, label: str) -> list[float]:
        """Seconds per candidate after the first; compares each with the CPU path (sets `equal`)."""
        nonlocal equal
        times, exact, compared, worst = [], 0, 0, 0.0
        for i in range(candidates + 1):  # the first (untimed) copies the sources over
            weights = [rng.uniform(0.2, 1.2) for _ in range(3)]
            densities = [rng.uniform(0.1, 0.9) for _ in range(3)]
            recipe = Recipe.from_string(recipe_text(method, dirs, weights, densities, seed=0))
            synchronize(device)
            began = time.perf_counter()
            model, _ = worker.prepare(recipe)
            synchronize(device)
            if i:
                times.append(time.perf_counter() - began)
            params = dict(model.named_parameters())
            plan = plan_merge(recipe, cpu_pool)
            names = set(sample_names(spec.layers, i))
            plan.tasks = [task for task in plan.tasks if task.name in names]
            for name, cpu_tensor in iter_merged(plan, cpu_pool, reference):
                same, out_of_rule = compare(params[name].detach(), cpu_tensor.to(params[name].dtype))
                exact += same
                compared += 1
                worst = max(worst, out_of_rule)
                if out_of_rule > MAX_OUT_OF_RULE:
                    equal = False
                    print(f"  {label} candidate {i}: {name}: {out_of_rule:.2%} of elements beyond 2 ulps", flush=True)
        mean = sum(times) / max(1, len(times))
        print(f"{label:<16} {len(times)} candidates: mean {mean:.3f} s, min {min(times, default=0):.3f} s, "
              f"max {max(times, default=0):.3f} s; {exact}/{compared} sampled tensors bit-equal to the CPU path, "
              f"worst {worst:.3%} beyond 2 ulps", flush=True)
        return times

    for method in METHODS:
        seconds[method] = check(method, core, args.candidates, method)

    parts = core.memory_parts() if hasattr(core, "memory_parts") else {}
    print(f"memory parts (GB): {json.dumps({k: round(v / 1e9, 3) for k, v in parts.items()})}; "
          f"cache fallbacks {getattr(core.sparsifier, 'fallbacks', '-')}", flush=True)
    if device.startswith("cuda"):
        print(f"GPU peak allocated {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", flush=True)

    # the streamed path: sources beyond a small GPU budget, copied ahead on a side stream
    model_bytes = sum(t.numel() * t.element_size() for t in tensors[str(dirs["base"])].values())
    budget = int(args.streamed_budget * model_bytes)
    core = None  # its skeleton and the sources it kept leave the device
    streamed = WorkerCore({str(d): str(d) for d in dirs.values()}, _NoEvaluator, dtype="bfloat16", device=device,
                          tensors=tensors, gpu_budget=budget)
    if streamed.staging is None:  # a CPU run: "cpu:0" is another device to DeviceSources
        streamed.staging = DeviceSources("cpu:0", budget)
    seconds["streamed_ties"] = check("ties", streamed, args.streamed_candidates, "ties streamed")
    staging = streamed.staging
    print(f"streamed path: budget {budget / 1e9:.3f} GB ({staging.prefetch_bytes / 1e9:.3f} GB for copies ahead), "
          f"kept {staging.nbytes() / 1e9:.3f} GB, {staging.streamed} tensor copies per use, {staging.prefetched} "
          f"of them made ahead, peak in flight {staging.peak_in_flight_bytes / 1e9:.3f} GB", flush=True)
    if device.startswith("cuda"):
        print(f"GPU peak allocated {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    print()

    def mean(values: list[float]) -> float:
        return sum(values) / max(1, len(values))

    print(f"gpu_streamed_ties_candidate_seconds: {mean(seconds['streamed_ties']):.3f}")
    print(f"gpu_ties_candidate_seconds: {mean(seconds['ties']):.3f}")
    print(f"gpu_ta_candidate_seconds: {mean(seconds['task_arithmetic']):.3f}")
    print(f"gpu_equal_to_cpu: {'true' if equal else 'false'}")


if __name__ == "__main__":
    main()
