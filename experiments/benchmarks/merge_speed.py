"""Merge speed: `evomerge merge` vs `mergekit-yaml`, and per-candidate merges in memory.

Three Llama fine-tunes of ~134M parameters each (hidden 768, 12 layers, vocab 32000, fp32: a
random base plus small perturbations) merged onto that base, one recipe each for task_arithmetic
and ties (weights 0.5/0.3/0.4, densities 0.5/0.7/0.4). Prints, from one run, side by side:
  - `evomerge merge` to disk (the CLI, end to end, in a fresh process) vs `mergekit-yaml` to disk
    (CPU, installed on first use into a cached venv, see mergekit_venv.py);
  - an in-memory candidate with the sources already resident and magnitude ranks precomputed
    (what every candidate of a search costs), with fresh densities each time;
  - how far evomerge's tensors are from mergekit's (largest difference, and how many elements
    fall outside rtol 1e-5: only magnitude ties at a TIES threshold, see compare_outputs);
  - CPU seconds beside every wall time, and the load average: the 2 cores are shared.
Ends with the headline lines `task_arithmetic_speedup_vs_mergekit`, `ties_speedup_vs_mergekit`,
`ties_in_memory_seconds`.

Fairness: per recipe, each tool first runs once untimed (a warm-up: both then read the four
checkpoints from the same warm page cache, and evomerge's source-hash cache is filled), then
each runs --runs times, alternating mergekit and evomerge so that a change of load hits both;
every run is printed with the 1-minute load average at its start, and the speed-up is the best
(minimum) mergekit wall time over the best evomerge wall time. The best of N is the figure least
disturbed by the other jobs on the shared cores; the table also gives the CPU seconds of those
runs. Outputs go to a folder beside the models (same disk for both tools).

    .venv/bin/python experiments/benchmarks/merge_speed.py [--skip-mergekit] [--runs 2] [--repeats 3]

`evomerge merge` runs task_arithmetic (and linear) on a torch-free numpy executor (see
evomerge/merge/fast.py) that produces the torch engine's tensors bit for bit; ties runs on the
torch engine. Both executors share one plan.

Measured 2026-11-23 on the shared 2-core machine (warm-up + best of N as above; 1-minute load
average at the start of the best runs; in each run both tools effectively had one core, wall ~
CPU, because of the other engineers' jobs):

    run (UTC)   runs  task_arithmetic mk / evo     ties mk / evo           ties in memory  load
    13:48-14:03  2    33.0s / 5.3s   6.21x      204.0s / 21.4s  9.53x   2.69s           6-8
    14:21-14:38  2    17.5s / 3.4s   5.20x      235.7s / 22.6s  10.43x  7.03s (2.2 CPU) 2.4-6.5
    14:39-14:50  3    16.6s / 2.1s   7.78x      103.6s / 11.0s  9.40x   1.50s           2.4-3.6

(Second run's ties evomerge run 2 and all of the third ran with the pipeline that starts the
embeddings and head first; the first run's best ties figure predates it.) CPU seconds,
third run: task_arithmetic 14.8 vs 2.1 (7.2x), ties 101.6 vs 10.9 (9.4x). Where evomerge's
task_arithmetic time goes (third run, one core): interpreter + imports 0.3 s (no torch), numpy
import and plan 0.14 s, reading (page faults of the memory-mapped sources, ~0.3 s CPU), the
merge itself (~0.7 s CPU: the exact FMA emulation in float64, see fast.py) and the write into
the page cache (~0.3-0.5 s CPU; copies run at ~2 GB/s on this VM). For ties, `import torch`
(2.0-2.8 s) plus the one-shot magnitude selection of evomerge/merge/sparsify.py (full-size
delta/|delta| temporaries per source tensor) are most of its 11 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evomerge.fsutil import cache_dir  # noqa: E402
from evomerge.merge.layout import llama_tensor_shapes  # noqa: E402

HIDDEN, LAYERS, VOCAB, INTERMEDIATE, HEADS = 768, 12, 32000, 2048, 12
WEIGHTS = (0.5, 0.3, 0.4)
DENSITIES = (0.5, 0.7, 0.4)


def llama_config() -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    return config


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    return llama_tensor_shapes(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, vocab=VOCAB)


def build_models(root: Path) -> dict[str, Path]:
    """base + three fine-tunes (base + 1% noise), cached across runs."""
    names = ["base", "ft1", "ft2", "ft3"]
    if all((root / n / "model.safetensors").is_file() for n in names):
        return {n: root / n for n in names}
    print(f"building 4 x 134M-parameter Llama checkpoints in {root} ...", flush=True)
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes()
    base = {k: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=gen)) for k, s in shapes.items()}
    config = llama_config()
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = base if name == "base" else {k: v + 0.002 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    n_params = sum(t.numel() for t in base.values())
    print(f"  {n_params / 1e6:.1f}M parameters each", flush=True)
    return {n: root / n for n in names}


def recipe_yaml(method: str, models: dict[str, Path]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {models['base']}", "models:"]
    for i, name in enumerate(["ft1", "ft2", "ft3"]):
        params = f"weight: {WEIGHTS[i]}" + (f", density: {DENSITIES[i]}" if method == "ties" else "")
        lines.append(f"  - model: {models[name]}\n    parameters: {{{params}}}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def load_average() -> str:
    """The 1-minute load average: the cores are shared, so every figure comes with it."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of a command run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def compare_outputs(a_dir: Path, b_dir: Path) -> tuple[float, int, int]:
    """(max |a - b|, elements outside rtol 1e-5 / atol 1e-7, elements) over every tensor.

    With 134M fp32 elements, task vectors have many exactly equal magnitudes; at a TIES
    density threshold mergekit keeps whichever its unstable sort puts first, evomerge the
    lower indices, so a handful of elements may differ (by a whole task-vector entry).
    """
    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    a_index, b_index = index(a_dir), index(b_dir)
    if set(a_index) != set(b_index):
        raise SystemExit(f"tensor names differ: {sorted(set(a_index) ^ set(b_index))[:5]}")
    worst, bad, total = 0.0, 0, 0
    for key, file in a_index.items():
        with safe_open(str(file), framework="pt") as ha, safe_open(str(b_index[key]), framework="pt") as hb:
            a, b = ha.get_tensor(key).float(), hb.get_tensor(key).float()
        diff = (a - b).abs()
        worst = max(worst, float(diff.max()))
        bad += int((diff > 1e-7 + 1e-5 * b.abs()).sum())
        total += diff.numel()
    return worst, bad, total


def in_memory_seconds(method: str, models: dict[str, Path], repeats: int) -> tuple[float, float, float]:
    """(first candidate incl. precomputation, mean wall and mean CPU seconds of later candidates
    with new densities), sources resident, on torch's default thread count."""
    from evomerge.merge.engine import iter_merged, plan_merge
    from evomerge.merge.sources import SourcePool
    from evomerge.merge.sparsify import CachedSparsifier
    from evomerge.recipe import Recipe

    pool = SourcePool(resident=True)
    for ref in models.values():
        pool.get(str(ref)).load_all()
    sparsifier = CachedSparsifier()
    gen = torch.Generator().manual_seed(1)
    times, cpus = [], []
    for i in range(repeats + 1):
        text = recipe_yaml(method, models)
        if i:
            for d in DENSITIES:  # a new candidate: new densities
                text = text.replace(f"density: {d}", f"density: {float(torch.rand(1, generator=gen)) * 0.8 + 0.1:.4f}", 1)
        recipe = Recipe.from_string(text)
        start, cpu = time.perf_counter(), time.process_time()
        plan = plan_merge(recipe, pool)
        for _name, _tensor in iter_merged(plan, pool, sparsifier):
            pass
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    later = max(1, len(times) - 1)
    return times[0], sum(times[1:]) / later, sum(cpus[1:]) / later


def startup_seconds() -> tuple[float, float]:
    """(python -c pass, python -c 'import torch') wall seconds: context for the to-disk times."""
    bare, _ = timed([sys.executable, "-c", "pass"])
    torch_import, _ = timed([sys.executable, "-c", "import torch"])
    return bare, torch_import


def timed_runs(label: str, commands: dict[str, list[str]], runs: int, env: dict) -> dict[str, list[tuple[float, float, float]]]:
    """One untimed warm-up per tool, then ``runs`` timed runs per tool, alternating tools;
    returns per tool [(wall, cpu, load at start)], printing each run as it ends."""
    for tool, cmd in commands.items():
        start = time.perf_counter()
        timed(cmd, env=env)
        print(f"  {label} {tool}: warm-up {time.perf_counter() - start:.1f}s (untimed)", flush=True)
    results: dict[str, list[tuple[float, float, float]]] = {tool: [] for tool in commands}
    for i in range(runs):
        order = list(commands) if i % 2 == 0 else list(commands)[::-1]
        for tool in order:
            load = load_average()
            wall, cpu = timed(commands[tool], env=env)
            results[tool].append((wall, cpu, float(load) if load != "n/a" else float("nan")))
            print(f"  {label} {tool}: run {i + 1}: {wall:.2f}s wall, {cpu:.2f}s CPU, load {load}", flush=True)
    return results


def best(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return min(runs, key=lambda r: r[0])


def executor_of(recipe_path: Path) -> str:
    """Which executor `evomerge merge` uses for a recipe (numpy or torch)."""
    from evomerge.merge import fast
    from evomerge.merge.plan import plan_merge
    from evomerge.merge.sources import SourcePool
    from evomerge.recipe import Recipe

    pool = SourcePool()
    reason = fast.unsupported_reason(plan_merge(Recipe.from_yaml(recipe_path), pool), pool)
    return "numpy" if reason is None else f"torch ({reason})"


_PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import evomerge.cli  # noqa: F401  (what `evomerge merge` imports before it runs)
from evomerge.merge import writer
from evomerge.merge.sources import SourcePool
from evomerge.recipe import Recipe
t1 = time.perf_counter()
recipe = Recipe.from_yaml(sys.argv[1])
t2 = time.perf_counter()
pool = SourcePool()
plan = writer.plan_merge(recipe, pool)
tensors = writer._executor(plan, pool, None, numpy=writer._numpy_covers(plan, pool, "auto"))
t3 = time.perf_counter()
hashes = {ref: pool.get(ref).content_hash() for ref in recipe.model_refs()}
t4 = time.perf_counter()
out = writer.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
writer._write_weights(plan, tensors, out, writer.DEFAULT_SHARD_BYTES, None)
t5 = time.perf_counter()
writer._write_config(plan, pool, out)
writer._copy_tokenizer(recipe, plan, pool, out)
(out / "README.md").write_text(writer.model_card(recipe.with_evomerge(source_hashes=hashes), hashes))
t6 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "parse": t2 - t1, "plan+executor choice (numpy import)": t3 - t2, "hash (cached)": t4 - t3,
                  "read+merge+write weights": t5 - t4, "config+tokenizer+card": t6 - t5,
                  "torch imported": "torch" in sys.modules}))
"""


def evomerge_phases(recipe: Path, out: Path) -> dict:
    """Wall seconds of each phase of an `evomerge merge`, in a fresh process (after the warm-ups)."""
    result = subprocess.run([sys.executable, "-c", _PHASES, str(recipe), str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"phase timing failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-mergekit", action="store_true", help="only time evomerge (no speed-up lines)")
    parser.add_argument("--runs", type=int, default=2, help="timed to-disk runs per tool after the warm-up (best is reported)")
    parser.add_argument("--repeats", type=int, default=3, help="in-memory candidates timed after the first")
    args = parser.parse_args()

    root = cache_dir() / "bench" / "merge_speed"
    models = build_models(root / "models")
    evomerge_bin = [sys.executable, "-m", "evomerge.cli"]
    mergekit_bin = None
    if not args.skip_mergekit:
        from mergekit_venv import ensure_mergekit

        mergekit_bin = ensure_mergekit()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    print(f"load average at start: {load_average()} (2 cores shared; wall times stretch with it, CPU times much less)", flush=True)
    bare, torch_import = startup_seconds()
    print(f"python start-up {bare:.2f}s, python + import torch {torch_import:.2f}s (load {load_average()})", flush=True)
    print(f"to disk: one untimed warm-up per tool, then {args.runs} timed runs per tool (alternating); best wall time counts", flush=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_path = Path(tmp)
        for method in ("task_arithmetic", "ties"):
            recipe = tmp_path / f"{method}.yaml"
            recipe.write_text(recipe_yaml(method, models))
            print(f"{method}: evomerge executor: {executor_of(recipe)}", flush=True)
            commands = {"evomerge": [*evomerge_bin, "merge", str(recipe), "--out", str(tmp_path / f"evo-{method}")]}
            if mergekit_bin:
                commands["mergekit"] = [str(mergekit_bin), str(recipe), str(tmp_path / f"mk-{method}"), "--lazy-unpickle", "--quiet"]
            runs = timed_runs(method, commands, args.runs, env)
            phases = evomerge_phases(recipe, tmp_path / f"phases-{method}")
            print(f"  {method} evomerge phases (s, load {load_average()}): "
                  + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in phases.items()), flush=True)
            row: dict[str, float] = {}
            row["evomerge"], row["evomerge_cpu"], row["load_evomerge"] = best(runs["evomerge"])
            if mergekit_bin:
                row["mergekit"], row["mergekit_cpu"], row["load_mergekit"] = best(runs["mergekit"])
                row["max_abs_diff"], mismatched, total = compare_outputs(tmp_path / f"evo-{method}", tmp_path / f"mk-{method}")
                row["mismatched"], row["elements"] = float(mismatched), float(total)
            first, later, later_cpu = in_memory_seconds(method, models, args.repeats)
            row["in_memory_first"], row["in_memory"], row["in_memory_cpu"] = first, later, later_cpu
            results[method] = row
            print(f"{method}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()), flush=True)

    print()
    print(f"best of {args.runs} timed runs per tool, after one untimed warm-up each:")
    print(f"{'method':<16} {'mergekit-yaml':>14} {'evomerge merge':>15} {'speed-up':>9} {'in-memory':>10} {'max abs diff':>13} {'mismatched':>11}")
    for method, row in results.items():
        mk = row.get("mergekit")
        print(
            f"{method:<16} {mk if mk else float('nan'):>13.1f}s {row['evomerge']:>14.1f}s "
            f"{(mk / row['evomerge']) if mk else float('nan'):>8.1f}x {row['in_memory']:>9.2f}s "
            f"{row.get('max_abs_diff', float('nan')):>13.2e} {int(row.get('mismatched', -1)):>11d}"
        )
        print(
            f"{'  CPU seconds':<16} {row.get('mergekit_cpu', float('nan')):>13.1f}s {row['evomerge_cpu']:>14.1f}s "
            f"{(row['mergekit_cpu'] / row['evomerge_cpu']) if mk else float('nan'):>8.1f}x {row['in_memory_cpu']:>9.2f}s"
        )
        print(f"{'  load at start':<16} {row.get('load_mergekit', float('nan')):>14.1f} {row['load_evomerge']:>15.1f}")
    print("(in-memory: a candidate with new densities, sources resident, magnitudes presorted; "
          f"the first candidate, which presorts, took {results['ties']['in_memory_first']:.1f} s for ties; "
          f"mismatched: elements outside rtol 1e-5 of mergekit's, of {int(results['ties'].get('elements', 0))})")
    print(f"load average at end: {load_average()}")
    print()
    if mergekit_bin:
        for method in ("task_arithmetic", "ties"):
            print(f"{method}_speedup_vs_mergekit: {results[method]['mergekit'] / results[method]['evomerge']:.2f}")
    print(f"ties_in_memory_seconds: {results['ties']['in_memory']:.2f}")


if __name__ == "__main__":
    main()
