"""Scale: three 1.1B-parameter bf16 Llama fine-tunes (TinyLlama's shape) on this machine.

The models (a base and three fine-tunes, 2.2 GB each, 1 GB shards, a local tokenizer) come from
llama_shapes.py, built tensor by tensor on first use and cached. Then, from one run:

1. To disk, page cache warm for both tools (every source file is read once first, and
   evomerge's source-hash cache filled): `evomerge merge` task_arithmetic and TIES, and
   `mergekit-yaml` task_arithmetic (TIES too with --mergekit-ties: ~10 minutes), each a fresh
   process, a first untimed round and then `--repeats` timed ones (medians; see `to_disk`);
   wall and CPU seconds and peak anonymous memory (RssAnon of the process tree,
   sampled every 20 ms: memory-mapped source pages are page cache and do not count), and how
   far evomerge's task_arithmetic tensors are from mergekit's (a sample of tensors).
2. In memory, one thread, as a Ray worker merges: a `WorkerCore` over the sources (zero-copy
   read-only views of the page cache, as a worker's are views of the object store) merges
   candidates with new weights and densities each into its resident skeleton; seconds per
   candidate after the first, and the process's anonymous memory (the skeleton, the merge's
   temporaries, the caches within their budget).
3. A search: `evomerge run` of a PS TIES stage (random search, 8 evaluations) with 2 Ray
   workers of one CPU, on a cheap lm-eval loglikelihood task of 16 documents
   (scale_task/scale_words.yaml), with `memory: {node: {limit: 2.0 x the sources}}` (which
   also sizes Ray's object store for the sources). Node peak memory is the largest sum, over
   the samples (every 100 ms), of the RssAnon of the driver and every process it started (Ray's
   servers and workers) plus the growth of the machine's shared memory (Shmem: the object
   store's pages, counted once however many workers map them); divided by the sources' bytes.
   Per-candidate merge seconds are the workers' own (MemoryMeter: job start to evaluator call).

Ends with `scale_ta_candidate_seconds`, `scale_ties_candidate_seconds`,
`scale_merge_speedup_vs_mergekit`, `scale_merge_peak_gb`, `scale_search_node_peak_over_sources`.

    .venv/bin/python experiments/benchmarks/scale.py [--skip-mergekit] [--mergekit-ties]
        [--candidates 3] [--evaluations 8] [--repeats 3] [--skip-disk] [--skip-memory] [--skip-search]
        [--layers N] [--small]

mergekit-yaml is $EVOMERGE_MERGEKIT_YAML, else the repository's venv (`make mergekit`:
.venv-mergekit), else the cached venv of mergekit_venv.py (installed on first use). Heavy: the search holds ~2x the sources (17.6 GB at 1.1B) at its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llama_shapes import NAMES, add_spec_args, build, spec_from_args  # noqa: E402

WEIGHTS = (0.5, 0.3, 0.4)
DENSITIES = (0.5, 0.7, 0.4)
TASK_DIR = HERE / "scale_task"
GB = 1e9


# ---- memory of a process tree ------------------------------------------------------------------


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in out:
                    out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _children() -> dict[int, list[int]]:
    """ppid -> pids, for every process of the machine."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                text = handle.read()
            ppid = int(text.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree(root: int) -> list[int]:
    tree = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def _shmem() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        text = b" ".join(argv).decode(errors="replace")
    except OSError:
        return "?"
    for key in ("raylet", "gcs_server", "_WorkerActor", "_StoreActor", "ray::IDLE", "log_monitor", "dashboard"):
        if key in text:
            return key
    return "ray::" + text.split("ray::", 1)[1].split()[0] if "ray::" in text else Path(argv[0].decode(errors="replace")).name


class TreeSampler(threading.Thread):
    """Samples the RssAnon of a process and its descendants (and, with `shm`, the growth of the
    machine's Shmem) every `interval` seconds; `peak` is the largest sum seen."""

    def __init__(self, root: int, interval: float = 0.02, shm: bool = False):
        super().__init__(daemon=True)
        self.root, self.interval, self.shm = root, interval, shm
        self.shm_base = _shmem() if shm else 0
        self.peak = self.peak_anon = self.peak_shm = 0
        self.at_peak: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        pids = _tree(self.root)
        anon = {pid: _status_kb(pid, ("RssAnon",))["RssAnon"] for pid in pids}
        total_anon = sum(anon.values())
        shm = max(0, _shmem() - self.shm_base) if self.shm else 0
        self.peak_anon = max(self.peak_anon, total_anon)
        self.peak_shm = max(self.peak_shm, shm)
        if total_anon + shm > self.peak:
            self.peak = total_anon + shm
            parts: dict[str, int] = {"shared memory (object store)": shm} if self.shm else {}
            for pid, value in anon.items():
                if value:
                    key = _name(pid)
                    parts[key] = parts.get(key, 0) + value
            self.at_peak = parts

    def stop(self) -> TreeSampler:
        self._halt.set()
        self.join()
        return self


def measured(cmd: list[str], *, env: dict | None = None, interval: float = 0.02, shm: bool = False,
             cwd: str | None = None) -> dict:
    """Run `cmd` to completion: wall and CPU seconds, the sampler's peaks, its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    sampler = TreeSampler(proc.pid, interval, shm)
    sampler.start()
    output = proc.communicate()[0]
    sampler.stop()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall": wall, "cpu": cpu, "peak": sampler.peak, "peak_anon": sampler.peak_anon,
            "peak_shm": sampler.peak_shm, "at_peak": sampler.at_peak, "output": output}


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def free_gb() -> str:
    import psutil

    return f"{psutil.virtual_memory().available / GB:.1f}"


# ---- recipes -------------------------------------------------------------------------------------


def recipe_text(method: str, dirs: dict[str, Path], weights=WEIGHTS, densities=DENSITIES) -> str:
    lines = [f"merge_method: {method}", f"base_model: {dirs['base']}", "models:"]
    for i, name in enumerate(NAMES[1:]):
        params = f"weight: {weights[i]:.4f}" + (f", density: {densities[i]:.4f}" if method != "task_arithmetic" else "")
        lines.append(f"  - model: {dirs[name]}\n    parameters: {{{params}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def warm_page_cache(dirs: dict[str, Path]) -> float:
    """Read every file of the models once (the page cache then holds them, as for a search)."""
    start = time.perf_counter()
    for folder in dirs.values():
        for file in sorted(folder.iterdir()):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass
    return time.perf_counter() - start


def fill_hash_cache(dirs: dict[str, Path]) -> None:
    """evomerge caches each source's content hash (by file size and mtime); fill it untimed."""
    from evomerge.merge.sources import SourcePool

    pool = SourcePool()
    for folder in dirs.values():
        pool.get(str(folder)).content_hash()


def mergekit_yaml() -> Path | None:
    """$EVOMERGE_MERGEKIT_YAML, else the repository's venv (`make mergekit`), else the cached one."""
    for local in (os.environ.get("EVOMERGE_MERGEKIT_YAML"), ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"):
        if local and Path(local).exists():
            return Path(local)
    try:
        from mergekit_venv import ensure_mergekit

        return ensure_mergekit()
    except Exception as exc:  # noqa: BLE001 - no network, no pip: the rest still runs
        print(f"mergekit unavailable ({exc}); skipping it", flush=True)
        return None


def compare(a_dir: Path, b_dir: Path, names: list[str]) -> dict:
    """Over a sample of tensors: elements bit-equal, elements more than 2 bf16 ulps apart (the
    16-bit rule of the mergekit parity tests), largest difference."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        return dict.fromkeys(names, folder / "model.safetensors")

    a_map, b_map = where(a_dir), where(b_dir)
    equal = beyond = total = 0
    worst = 0.0
    for name in names:
        with safe_open(str(a_map[name]), "pt") as ha, safe_open(str(b_map[name]), "pt") as hb:
            a, b = ha.get_tensor(name), hb.get_tensor(name)
        equal += int((a == b).sum())
        af, bf = a.float(), b.float()
        diff = (af - bf).abs()
        worst = max(worst, float(diff.max()))
        two_ulps = 2 * torch.finfo(torch.bfloat16).eps * torch.maximum(af.abs(), bf.abs())
        beyond += int((diff > two_ulps).sum())
        total += a.numel()
    return {"equal_fraction": equal / total, "beyond_2ulps": beyond, "elements": total, "max_abs_diff": worst}


def sample_names(layers: int) -> list[str]:
    last = layers - 1
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last // 2}.mlp.up_proj.weight",
            f"model.layers.{last}.input_layernorm.weight", "model.norm.weight", "lm_head.weight"]


def to_disk(dirs: dict[str, Path], work: Path, args: argparse.Namespace, layers: int) -> dict:
    """Each tool's merge to disk, in rounds: a first, untimed round, then `--repeats` timed ones,
    the tools taking turns within a round and every output removed before its next run. A
    figure is the median of the timed runs (peak memory: the largest).

    Why a first round: on this VM, memory that has been free for a while is handed back to the
    host, and touching it again costs ~3 s per GB (`dd` of 2.2 GB to a new file: 7.7 s the first
    time, 0.9 s right after). Whichever tool ran first on such memory would pay seconds that
    belong to neither tool; after a round, both write into memory that is warm. Before each run
    the page cache's dirty pages are written out (`sync`), so that no run pays for the disk
    writes of the output before it."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    mk = None if args.skip_mergekit else mergekit_yaml()
    results: dict[str, dict] = {}
    for method in ("task_arithmetic", "ties"):
        recipe = work / f"{method}.yaml"
        recipe.write_text(recipe_text(method, dirs))
        outs = {"evomerge": work / f"evo-{method}", "mergekit": work / f"mk-{method}"}
        commands = {"evomerge": [sys.executable, "-m", "evomerge.cli", "merge", str(recipe), "--out", str(outs["evomerge"])]}
        if mk is not None and (method == "task_arithmetic" or args.mergekit_ties):
            commands["mergekit"] = [str(mk), str(recipe), str(outs["mergekit"]), "--lazy-unpickle", "--quiet"]
        runs: dict[str, list[dict]] = {tool: [] for tool in commands}
        for round_ in range(1 + args.repeats):
            order = list(commands) if round_ % 2 == 0 else list(reversed(commands))
            for tool in order:
                shutil.rmtree(outs[tool], ignore_errors=True)
                os.sync()  # the other tool's output goes to disk now, not during this run
                load = load_average()
                run = measured(commands[tool], env=env)
                run["load"] = load
                what = "first, untimed" if round_ == 0 else f"timed {round_}/{args.repeats}"
                print(f"  to disk {method:<16} {tool:<9} {run['wall']:6.1f} s wall, {run['cpu']:6.1f} s CPU, peak anon "
                      f"{run['peak_anon'] / GB:.2f} GB (load {load}, {free_gb()} GB available; {what})", flush=True)
                if round_ > 0:
                    runs[tool].append(run)
        for tool, timed in runs.items():
            results[f"{tool}_{method}"] = {
                "wall": statistics.median(r["wall"] for r in timed),
                "cpu": statistics.median(r["cpu"] for r in timed),
                "peak_anon": max(r["peak_anon"] for r in timed),
                "walls": [r["wall"] for r in timed],
            }
        if "mergekit" in commands:
            results[f"diff_{method}"] = compare(outs["evomerge"], outs["mergekit"], sample_names(layers))
            print(f"  {method} evomerge vs mergekit on {len(sample_names(layers))} tensors: {results[f'diff_{method}']}", flush=True)
        for tool in commands:
            shutil.rmtree(outs[tool], ignore_errors=True)
    return results


# ---- in-memory candidates (a child process: its own memory) -----------------------------------------


class _NoEvaluator:
    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}

    def evaluate(self, *args, **kwargs):  # noqa: ANN002, ANN003 - never called
        raise RuntimeError("not evaluated")


def mapped_sources(folder: Path) -> dict:
    """Every tensor of a checkpoint as a zero-copy, read-only view of its file (page cache)."""
    import numpy as np
    import torch

    from evomerge.merge.stfile import read_header

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, entry in read_header(file).items():
            raw = np.memmap(file, dtype=np.uint8, mode="r", offset=entry.begin, shape=(entry.end - entry.begin,))
            tensors[name] = torch.from_numpy(raw).view(getattr(torch, entry.dtype)).reshape(entry.shape)
    return tensors


def candidates_child(spec_args: argparse.Namespace, method: str, count: int, cache_bytes: int | None) -> None:
    import inspect
    import warnings

    import torch

    from evomerge.recipe import Recipe
    from evomerge.run.worker_core import WorkerCore

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # read-only views, on purpose
    dirs = build(spec_from_args(spec_args), spec_args.root, log=False)
    sampler = TreeSampler(os.getpid(), 0.02)
    base_anon = _status_kb(os.getpid(), ("RssAnon",))["RssAnon"]
    tensors = {str(d): mapped_sources(d) for d in dirs.values()}
    kwargs = {}
    if "cache_budget" in inspect.signature(WorkerCore.__init__).parameters:
        kwargs["cache_budget"] = cache_bytes
    core = WorkerCore({str(d): str(d) for d in dirs.values()}, _NoEvaluator, dtype="bfloat16", device="cpu",
                      tensors=tensors, **kwargs)
    rng = random.Random(7)
    times, cpus = [], []
    sampler.start()
    held_after_first = 0
    for i in range(count + 1):
        weights = [rng.uniform(0.2, 1.0) for _ in range(3)]
        densities = [rng.uniform(0.1, 0.9) for _ in range(3)]
        recipe = Recipe.from_string(recipe_text(method, dirs, weights, densities))
        start, cpu = time.perf_counter(), time.process_time()
        core.prepare(recipe)
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        if i == 0:
            held_after_first = _status_kb(os.getpid(), ("RssAnon",))["RssAnon"]
            sampler.peak_anon = held_after_first  # the later candidates' peak from here on
    sampler.stop()
    parts = core.memory_parts() if hasattr(core, "memory_parts") else {"skeleton": core.model_bytes()}
    fallbacks = getattr(core.sparsifier, "fallbacks", None)
    print(json.dumps({
        "method": method, "first": times[0], "later": times[1:], "later_cpu": cpus[1:], "base_anon": base_anon,
        "held_after_first": held_after_first, "peak_anon_later": sampler.peak_anon, "parts": parts,
        "cache_bytes": cache_bytes, "sparsifier": type(core.sparsifier).__name__,
        "sparsifier_bytes": core.sparsifier.nbytes(), "fallbacks": fallbacks,
    }))  # fmt: skip


def in_memory(args: argparse.Namespace, cache_bytes: int | None) -> dict:
    out = {}
    for method in ("task_arithmetic", "ties"):
        cmd = [sys.executable, __file__, "--child-candidates", method, "--candidates", str(args.candidates)]
        cmd += _spec_argv(args) + ([] if cache_bytes is None else ["--cache-bytes", str(cache_bytes)])
        load = load_average()
        run = measured(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
        row = json.loads(run["output"].strip().splitlines()[-1])
        row["process_peak_anon"], row["load"] = run["peak_anon"], load
        out[method] = row
        later = row["later"]
        print(f"  in memory {method:<16} first {row['first']:.1f} s, later {', '.join(f'{t:.2f}' for t in later)} s "
              f"(CPU {', '.join(f'{t:.2f}' for t in row['later_cpu'])}); anon: base {row['base_anon'] / GB:.2f} GB, "
              f"after the first {row['held_after_first'] / GB:.2f} GB, peak later {row['peak_anon_later'] / GB:.2f} GB; "
              f"parts {json.dumps({k: round(v / GB, 3) for k, v in row['parts'].items()})} GB; {row['sparsifier']} "
              f"holds {row['sparsifier_bytes'] / GB:.2f} GB (budget {'-' if cache_bytes is None else f'{cache_bytes / GB:.2f}'} GB, "
              f"one-shot fallbacks {row['fallbacks']}); load {load}", flush=True)
    return out


def _spec_argv(args: argparse.Namespace) -> list[str]:
    argv = [] if args.layers is None else ["--layers", str(args.layers)]
    argv += ["--small"] if args.small else []
    return argv + ([] if args.root is None else ["--root", str(args.root)])


# ---- the search ------------------------------------------------------------------------------------


def experiment_yaml(dirs: dict[str, Path], args: argparse.Namespace, limit: int) -> str:
    exp = {
        "name": "scale_search",
        "seed": 0,
        "dtype": "bfloat16",
        "models": {"base": str(dirs["base"]), "sources": [str(dirs[n]) for n in NAMES[1:]]},
        "stages": [{
            "name": "ps",
            "space": "ps_ties",
            "evaluator": {"kind": "lm_eval", "tasks": [{"task": "scale_words"}], "include_path": str(TASK_DIR),
                          "batch_size": 16},
            "optimizer": {"name": "random"},
            "budget": {"evaluations": args.evaluations},
            "holdout_top_k": 0,
        }],
        "ray": {"workers": args.workers, "num_cpus_per_worker": 1},
        "memory": {"node": {"limit": limit}},
    }  # fmt: skip
    return json.dumps(exp, indent=1)


def search(dirs: dict[str, Path], work: Path, args: argparse.Namespace, sources: int) -> dict:
    from evomerge.memory import read_memory_report
    from evomerge.run.ledger import Ledger
    from evomerge.run.rundir import RunDir

    limit = int(args.limit_over_sources * sources)
    exp = work / "scale_search.yaml"
    exp.write_text(experiment_yaml(dirs, args, limit))
    run_dir = work / "run"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    load = load_average()
    print(f"  search: {args.workers} Ray workers, {args.evaluations} evaluations, memory.node.limit {limit / GB:.2f} GB "
          f"({args.limit_over_sources} x sources); load {load}, {free_gb()} GB available", flush=True)
    run = measured([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--out", str(run_dir)], env=env, interval=0.1, shm=True)
    report = read_memory_report(run_dir) or {}
    with Ledger.open(RunDir(run_dir).ledger, readonly=True) as ledger:
        rows = ledger.rows(stage="ps", split="search")
    failed = [r for r in rows if not r.ok]
    merge_seconds = [s for w in (report.get("held") or {}).get("workers", []) for s in (w.get("merge_seconds") or [])]
    out = {"wall": run["wall"], "peak": run["peak"], "peak_anon": run["peak_anon"], "peak_shm": run["peak_shm"],
           "at_peak": run["at_peak"], "rows": len(rows), "failed": len(failed), "merge_seconds": merge_seconds,
           "memory": report, "load": load, "errors": [r.error for r in failed][:3]}
    print(f"  search: {len(rows)} evaluations ({len(failed)} failed{': ' + str(out['errors']) if failed else ''}) in "
          f"{run['wall']:.0f} s; node peak {run['peak'] / GB:.2f} GB = {run['peak'] / sources:.2f} x sources "
          f"(anon peak {run['peak_anon'] / GB:.2f} GB, shared memory peak {run['peak_shm'] / GB:.2f} GB)", flush=True)
    print("  at the peak: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in sorted(run["at_peak"].items(), key=lambda kv: -kv[1])), flush=True)
    if merge_seconds:
        print(f"  search merge seconds per candidate (workers' own): {', '.join(f'{s:.1f}' for s in merge_seconds)}", flush=True)
    from evomerge.memory import memory_lines

    for line in memory_lines(report):
        print("  " + line, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(parser)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--mergekit-ties", action="store_true", help="also time mergekit's TIES to disk (~10 min at 1.1B)")
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tool to disk, after a first untimed round")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--candidates", type=int, default=3, help="in-memory candidates timed after the first")
    parser.add_argument("--evaluations", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-over-sources", type=float, default=2.0, help="the search's memory.node.limit over the sources' bytes")
    parser.add_argument("--cache-bytes", type=int, default=None, help="in-memory candidates' cache budget (default: the search's)")
    parser.add_argument("--child-candidates", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_candidates:
        candidates_child(args, args.child_candidates, args.candidates, args.cache_bytes)
        return

    spec = spec_from_args(args)
    print(f"load {load_average()}, {free_gb()} GB available, {os.cpu_count()} CPUs", flush=True)
    dirs = build(spec, args.root)
    sources = 4 * spec.model_bytes()
    print(f"models: 4 x {spec.parameters() / 1e9:.3f}B parameters bf16 = {sources / GB:.2f} GB of sources ({dirs['base'].parent})", flush=True)
    print(f"page cache warmed in {warm_page_cache(dirs):.1f} s", flush=True)
    fill_hash_cache(dirs)
    from evomerge.memory import MemorySpec, NodeMemory, resolve_memory

    limit = int(args.limit_over_sources * sources)
    search_budget = resolve_memory(MemorySpec(node=NodeMemory(limit=limit)), sources=sources, skeleton=spec.model_bytes(),
                                   workers=args.workers, ray=True)
    cache_bytes = args.cache_bytes if args.cache_bytes is not None else search_budget.caches
    print(f"search budget: {search_budget}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=dirs["base"].parent.parent))
    disk = mem = found = None
    try:
        if not args.skip_disk:
            disk = to_disk(dirs, work, args, spec.layers)
        if not args.skip_memory:
            mem = in_memory(args, cache_bytes)
        if not args.skip_search:
            found = search(dirs, work, args, sources)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load at end {load_average()}")
    if disk and "mergekit_task_arithmetic" in disk:
        mk, evo = disk["mergekit_task_arithmetic"], disk["evomerge_task_arithmetic"]
        print(f"to disk, task_arithmetic, median of {args.repeats} (walls: mergekit {mk['walls']}, evomerge {evo['walls']}): mergekit-yaml {mk['wall']:.1f} s wall / {mk['cpu']:.1f} s CPU, peak anon "
              f"{mk['peak_anon'] / GB:.2f} GB; evomerge merge {evo['wall']:.1f} s / {evo['cpu']:.1f} s CPU, "
              f"{evo['peak_anon'] / GB:.2f} GB: {mk['wall'] / evo['wall']:.2f}x wall, {mk['cpu'] / evo['cpu']:.2f}x CPU")
    if mem:
        for method, row in mem.items():
            later, cpu = row["later"], row["later_cpu"]
            print(f"in memory, {method}: {sum(later) / max(1, len(later)):.2f} s wall, {sum(cpu) / max(1, len(cpu)):.2f} s CPU "
                  f"per candidate after the first; anon held {row['peak_anon_later'] / GB:.2f} GB")
    print()
    if mem:
        print(f"scale_ta_candidate_seconds: {sum(mem['task_arithmetic']['later']) / max(1, len(mem['task_arithmetic']['later'])):.2f}")
        print(f"scale_ties_candidate_seconds: {sum(mem['ties']['later']) / max(1, len(mem['ties']['later'])):.2f}")
    if disk and "mergekit_task_arithmetic" in disk:
        print(f"scale_merge_speedup_vs_mergekit: {disk['mergekit_task_arithmetic']['wall'] / disk['evomerge_task_arithmetic']['wall']:.2f}")
    if disk:
        print(f"scale_merge_peak_gb: {disk['evomerge_task_arithmetic']['peak_anon'] / GB:.2f}")
    if found:
        print(f"scale_search_node_peak_over_sources: {found['peak'] / sources:.2f}")


if __name__ == "__main__":
    main()
