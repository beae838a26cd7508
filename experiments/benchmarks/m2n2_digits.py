"""M2N2 on scikit-learn digits against the natural_niches reference (a benchmark, not a test).

The setting of SakanaAI/natural_niches (Abrantes, Lange, Tang 2025), driven through evomerge's own
optimizers (`make_optimizer("m2n2" | "cmaes" | "grid")`) in this process:

- data: `evomerge.zoo.digits.load_split` - 1,437 training and 360 test images of 8x8 digits,
  a stratified random split, pixels in [0, 1]. The reference trains on the first 80% of the
  file and tests on the last 20% (other writers: a harder test set), raw pixels 0..16:
  `--data reference` uses exactly that split, with experts trained the reference's way
  (`--experts reference`: 10 full-batch Adam steps, far weaker than the zoo's experts), for a
  like-for-like comparison with the reference's figures;
- model: the zoo's `DigitsMLP` 64-256-10 (ReLU), 19,210 parameters as one flat genome in
  state-dict order (layers.0.weight [256, 64], layers.0.bias, layers.1.weight [10, 256],
  layers.1.bias); the split point of M2N2's crossover runs over that vector;
- from scratch: two initial members N(0, 0.01^2), archive 20, child mutation N(0, 0.01^2),
  budget 50,000 forward passes; from the two pre-trained experts (`low`: digits 0-4, `high`:
  5-9): no mutation, budget 10,000;
- methods: M2N2 (alpha 1, attraction, split-point SLERP), M2N2 without attraction (second parent
  drawn like the first), GA (alpha 0, no attraction, as the reference's `--method ga`), CMA-ES
  from scratch (popsize 20, sigma0 0.01, x0 N(0, 0.01^2); SEPARABLE - pycma's `CMA_diagonal` -
  where the reference ran full covariance, which needs ~7 h per seed and > 8.7 GiB at 19,210
  genes; pycma's stop criteria are off, as in the reference, which never asks `stop()`), the
  same with the covariance frozen (`cmaes_csa`: pycma `CMA_on: 0`, step-size adaptation only -
  what full-covariance CMA-ES amounts to at this size, its learning rates being ~1e-8; measured:
  separable CMA-ES's faster diagonal learning shrinks the search on the plateaus of quantized
  accuracy and stalls near 60% train accuracy by ~3,000 passes, the frozen one keeps climbing), and
  from pre-trained the brute-force SLERP baseline (evomerge's `grid` optimizer over the SLERP
  weight, 10,000 points, the best on train scored on test).

A forward pass is one candidate scored on the whole training split, counted as the reference
counts them: the budget bounds every candidate asked, the two initial members included (the
reference adds its 2 initial passes on top of 50,000 children). The test-set score of the best
archive member (best training accuracy, first on ties: the reference's choice) is taken once at
the end and not counted; the reference scores it after every step, also uncounted.

Each pass runs alone: on these 2 shared CPU cores one 1,437 x 64 x 256 forward takes ~1 ms and
stacking a 20-member CMA-ES generation into batched matmuls was slower per pass (~2 ms), so
nothing is gained by vectorizing over the population here. torch and numpy's BLAS use
`--threads` threads (1 by default: the cores are shared, and a threaded OpenBLAS spins on busy
cores - pycma's dot products took milliseconds each under load before this limit).

    .venv/bin/python experiments/benchmarks/m2n2_digits.py [--seeds 42 43 44] [--quick]

Prints one line per run, then mean +- std over seeds side by side with the reference figures,
and ends with the lines `m2n2_scratch_test_acc`, `cmaes_scratch_test_acc`,
`m2n2_pretrained_test_acc`, `m2n2_scratch_seconds` (fractions; means over seeds).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from evomerge.errors import EvomergeError
from evomerge.evaluate.result import EvalResult
from evomerge.optim import make_optimizer
from evomerge.optim.m2n2 import slerp
from evomerge.zoo.digits import EXPERT_CLASSES, SIZES, DigitsMLP, load_split, train_expert

OBJECTIVES = {"train_acc": True}
# Read off the natural_niches result figure (test accuracy) and timed on these machines.
REFERENCE = {
    ("scratch", "m2n2"): 0.867,
    ("scratch", "cmaes"): 0.86,
    ("scratch", "ga"): 0.68,
    ("pretrained", "m2n2"): 0.685,
    ("pretrained", "m2n2_no_attraction"): 0.66,
    ("pretrained", "slerp"): 0.577,
}
REFERENCE_SECONDS = {"scratch": 591.0, "pretrained": 99.0}
LABELS = {
    "m2n2": "M2N2",
    "m2n2_no_attraction": "M2N2 without attraction",
    "ga": "GA (alpha=0, no attraction)",
    "cmaes": "CMA-ES separable (pycma CMA_diagonal)",
    "cmaes_csa": "CMA-ES, covariance frozen (CSA-ES)",
    "slerp": "brute-force SLERP (grid, 1 gene)",
}
PRIORITY = [
    ("scratch", "m2n2"), ("scratch", "cmaes"), ("pretrained", "m2n2"), ("scratch", "m2n2_no_attraction"),
    ("scratch", "ga"), ("pretrained", "m2n2_no_attraction"), ("pretrained", "ga"), ("pretrained", "slerp"),
    ("scratch", "cmaes_csa"),
]  # fmt: skip
M2N2_VARIANTS = {
    "m2n2": {"alpha": 1.0, "attraction": True},
    "m2n2_no_attraction": {"alpha": 1.0, "attraction": False},
    "ga": {"alpha": 0.0, "attraction": False},
}


def zoo_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The zoo's fixed stratified split, pixels in [0, 1] (what evomerge's digits models use)."""
    return {split: load_split(split) for split in ("train", "test")}


def reference_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The reference's split, for a like-for-like check: the first 80% of scikit-learn's digits
    in file order for training, the last 20% for testing (no shuffling: the test images come from
    other writers), raw pixels 0..16."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = int(len(x) * 0.8)
    x = x.astype(np.float32)
    return {"train": (x[:n], y[:n].astype(np.int64)), "test": (x[n:], y[n:].astype(np.int64))}


class DigitsScorer:
    """Per-image correctness of flat MLP genomes on the digits splits, counting training passes."""

    def __init__(self, pixel_scale: float = 1.0, data: str = "zoo"):
        self.data = {}
        for split, (x, y) in (zoo_splits() if data == "zoo" else reference_splits()).items():
            self.data[split] = (torch.from_numpy(x * np.float32(pixel_scale)), torch.from_numpy(y.copy()))
        shapes = [(b, a) for a, b in zip(SIZES[:-1], SIZES[1:], strict=True)]
        self.slices: list[tuple[slice, slice, tuple[int, int]]] = []
        start = 0
        for out_f, in_f in shapes:
            w = slice(start, start + out_f * in_f)
            b = slice(w.stop, w.stop + out_f)
            self.slices.append((w, b, (out_f, in_f)))
            start = b.stop
        self.dim = start
        self.passes = 0

    def correct(self, genome: np.ndarray, split: str = "train") -> np.ndarray:
        """1.0/0.0 per image of `split`: is the argmax of the MLP with these weights the label?"""
        if split == "train":
            self.passes += 1
        x, y = self.data[split]
        params = torch.from_numpy(np.asarray(genome, dtype=np.float32))
        with torch.no_grad():
            h = x
            for i, (w, b, shape) in enumerate(self.slices):
                h = torch.addmm(params[b], h, params[w].view(shape).T)
                if i < len(self.slices) - 1:
                    h = torch.relu_(h)
            return (h.argmax(1) == y).numpy().astype(np.float64)


def flatten(model: DigitsMLP) -> np.ndarray:
    """A DigitsMLP's parameters as one float64 genome, in state-dict order."""
    return np.concatenate([t.detach().reshape(-1).double().numpy() for t in model.state_dict().values()])


def load_experts() -> tuple[dict[str, np.ndarray], str]:
    """The zoo's `low` and `high` digit experts as genomes, and where they came from."""
    try:
        from evomerge.zoo import resolve_zoo_ref

        paths = {name: resolve_zoo_ref(f"digits/{name}") for name in EXPERT_CLASSES}
        return {n: flatten(DigitsMLP.from_pretrained(p)) for n, p in paths.items()}, f"zoo:digits/{{low,high}} from {paths['low'].parent}"
    except (ImportError, EvomergeError) as exc:  # the zoo's digits preset is not there yet
        reason = type(exc).__name__
    experts = {name: flatten(train_expert(classes, seed=0)) for name, classes in EXPERT_CLASSES.items()}
    return experts, f"train_expert(classes, seed=0) (zoo preset unavailable: {reason})"


def reference_style_experts(scorer: DigitsScorer, seed: int = 42) -> tuple[dict[str, np.ndarray], str]:
    """Experts trained the way the reference trains its own: from N(0, 0.01^2), 10 full-batch
    Adam steps (lr 0.003) on the training images of their classes - far weaker than the zoo's
    (40 epochs of minibatch Adam), for a like-for-like comparison with the reference's figure."""
    import torch.nn.functional as F

    x, y = scorer.data["train"]
    gen = torch.Generator().manual_seed(seed)
    experts = {}
    for name, classes in EXPERT_CLASSES.items():
        mask = torch.isin(y, torch.tensor(classes))
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
            model = DigitsMLP(SIZES)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        adam = torch.optim.Adam(model.parameters(), lr=0.003)
        for _ in range(10):
            loss = F.cross_entropy(model(x[mask]), y[mask])
            adam.zero_grad()
            loss.backward()
            adam.step()
        experts[name] = flatten(model)
    return experts, f"reference-style: N(0, 0.01^2) + 10 full-batch Adam steps, lr 0.003, seed {seed}"


@dataclass
class Run:
    method: str
    seed: int
    test_acc: float
    train_acc: float
    seconds: float
    passes: int
    note: str = ""
    cpu_seconds: float = math.nan  # CPU time of the process that ran it: what load does not inflate


def _result(hits: np.ndarray) -> EvalResult:
    return EvalResult({"train_acc": float(hits.mean())}, dict(OBJECTIVES), per_sample={"train": hits})


def run_m2n2(scorer: DigitsScorer, variant: str, seed: int, budget: int, args: argparse.Namespace, experts: dict | None) -> Run:
    options = dict(M2N2_VARIANTS[variant], archive_size=args.archive, max_evals=budget)
    if experts is None:  # from scratch
        options.update(n_init=2, init_sigma=args.init_std, mutation_sigma=args.mutation)
        x0 = np.zeros(scorer.dim)
    else:
        options.update(initial=[experts["low"], experts["high"]])
        x0 = None
    scorer.passes = 0
    start = time.perf_counter()
    opt = make_optimizer("m2n2", dim=scorer.dim, bounds=None, x0=x0, seed=seed, objectives=OBJECTIVES, **options)
    while cands := opt.ask(1):
        opt.tell(cands, [_result(scorer.correct(cands[0].genome))])
        if args.trace and opt.n_told % args.trace == 0:
            _trace(scorer, variant, seed, opt, start)
    best, result = opt.best()
    seconds = time.perf_counter() - start
    test = float(scorer.correct(best.genome, "test").mean())
    return Run(variant, seed, test, result.objectives["train_acc"], seconds, scorer.passes)


def _trace(scorer: DigitsScorer, method: str, seed: int, opt: object, start: float) -> None:
    best, result = opt.best()  # type: ignore[attr-defined]
    test = scorer.correct(best.genome, "test").mean()
    print(f"  trace {method} seed {seed}: {opt.n_told} passes, best train {result.objectives['train_acc']:.4f} "  # type: ignore[attr-defined]
          f"test {test:.4f}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


def run_cmaes(scorer: DigitsScorer, seed: int, budget: int, args: argparse.Namespace, frozen: bool = False) -> Run:
    """CMA-ES as the reference runs it, but separable; `frozen`: no covariance learning at all
    (pycma `CMA_on: 0`, sigma adaptation only), which is what full-covariance CMA-ES amounts to
    here: its learning rates c1, cmu ~ 2/n^2 ~ 1e-8 leave C at the identity over 2,500
    generations, while separable CMA-ES's rates are (n + 2) / 3 times larger."""
    x0 = np.random.default_rng(seed).standard_normal(scorer.dim) * args.init_std
    never = {"CMA_on": 0} if frozen else {}
    never |= {"tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10**9, "tolstagnation": 10**9, "tolx": 0,
             "tolfacupx": math.inf, "tolupsigma": math.inf, "tolconditioncov": math.inf}  # fmt: skip
    scorer.passes = 0
    start = time.perf_counter()
    opt = make_optimizer(
        "cmaes", dim=scorer.dim, bounds=None, x0=x0, seed=seed, objectives=OBJECTIVES, popsize=args.cma_popsize,
        sigma0=args.init_std, diagonal=True, max_evals=budget, cma_options=never,
    )  # fmt: skip
    while True:
        cands = opt.ask()
        if not cands:
            if opt.stopped:
                break
            continue
        opt.tell(cands, [_result(scorer.correct(c.genome)) for c in cands])
        if args.trace and opt.n_told % args.trace == 0:
            _trace(scorer, "cmaes_csa" if frozen else "cmaes", seed, opt, start)
    best, result = opt.best()
    seconds = time.perf_counter() - start
    test = float(scorer.correct(best.genome, "test").mean())
    note = "" if "evaluation budget" in (opt.stopped or "") else f"stopped early: {opt.stopped}"
    return Run("cmaes_csa" if frozen else "cmaes", seed, test, result.objectives["train_acc"], seconds, scorer.passes, note)


def run_slerp(scorer: DigitsScorer, budget: int, experts: dict) -> Run:
    scorer.passes = 0
    start = time.perf_counter()
    low, high = experts["low"], experts["high"]
    opt = make_optimizer("grid", dim=1, bounds=([0.0], [1.0]), x0=None, seed=0, objectives=OBJECTIVES, points=budget, popsize=64)
    while cands := opt.ask():
        opt.tell(cands, [_result(scorer.correct(slerp(float(c.genome[0]), low, high))) for c in cands])
    best, result = opt.best()
    seconds = time.perf_counter() - start
    test = float(scorer.correct(slerp(float(best.genome[0]), low, high), "test").mean())
    return Run("slerp", 0, test, result.objectives["train_acc"], seconds, scorer.passes, f"w={best.genome[0]:.4f}")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def table(setting: str, runs: list[Run], methods: list[str]) -> None:
    print(f"{'method':40s} {'test acc':>17s} {'train acc':>17s} {'seconds':>15s} {'cpu s':>7s}  {'seeds':>5s}  reference test acc")
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        (ta, ts), (ra, rs), (sa, ss) = (mean_std([getattr(r, k) for r in mine]) for k in ("test_acc", "train_acc", "seconds"))
        ref = REFERENCE.get((setting, method))
        ref_text = f"{ref:.3f}" if ref is not None else "-"
        if method == "m2n2":
            ref_text += f" in {REFERENCE_SECONDS[setting]:.0f} s (JAX, seed 42)"
        cpu = [r.cpu_seconds for r in mine if not math.isnan(r.cpu_seconds)]
        cpu_text = f"{statistics.fmean(cpu):7.1f}" if cpu else f"{'-':>7s}"
        print(f"{LABELS[method]:40s} {ta:.4f} +- {ts:.4f}   {ra:.4f} +- {rs:.4f}   {sa:6.1f} +- {ss:5.1f} {cpu_text}  {len(mine):5d}  {ref_text}")


_WORKER: dict = {}


def _init_worker(args: argparse.Namespace, experts: dict | None) -> None:
    """Per process: thread limits and the data (a process pool calls it in every worker)."""
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)
    _WORKER.update(args=args, experts=experts, scorer=DigitsScorer(args.pixel_scale, args.data))


def _execute(task: tuple[str, str, int]) -> Run:
    setting, method, seed = task
    args, scorer, experts = _WORKER["args"], _WORKER["scorer"], _WORKER["experts"]
    budget = args.scratch_passes if setting == "scratch" else args.pretrained_passes
    cpu = time.process_time()
    if method in ("cmaes", "cmaes_csa"):
        run = run_cmaes(scorer, seed, budget, args, frozen=method == "cmaes_csa")
    elif method == "slerp":
        run = run_slerp(scorer, budget, experts)
    else:
        run = run_m2n2(scorer, method, seed, budget, args, experts if setting == "pretrained" else None)
    run.cpu_seconds = time.process_time() - cpu
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--scratch-passes", type=int, default=50_000)
    parser.add_argument("--pretrained-passes", type=int, default=10_000)
    parser.add_argument("--archive", type=int, default=20)
    parser.add_argument("--mutation", type=float, default=0.01, help="std of the child mutation from scratch")
    parser.add_argument("--init-std", type=float, default=0.01, help="std of the initial genomes (and CMA-ES sigma0)")
    parser.add_argument("--cma-popsize", type=int, default=20)
    parser.add_argument("--pixel-scale", type=float, default=1.0, help="multiply the [0, 1] pixels (16: the reference's raw pixels)")
    parser.add_argument("--settings", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    parser.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--data", default="zoo", choices=["zoo", "reference"],
                        help="zoo: evomerge.zoo.digits splits; reference: the reference's unshuffled 80/20 split, raw pixels")  # fmt: skip
    parser.add_argument("--experts", default="zoo", choices=["zoo", "reference"],
                        help="pre-trained experts: the zoo's (default) or trained like the reference's (weaker)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (timed inside it)")
    parser.add_argument("--deadline-minutes", type=float, default=0.0,
                        help="start no run after this long (0: none); the summary covers the runs done")  # fmt: skip
    parser.add_argument("--trace", type=int, default=0, help="print the best member every N passes (0: never)")
    parser.add_argument("--quick", action="store_true", help="budgets / 25 and one seed: a smoke run")
    parser.add_argument("--from-logs", nargs="+", metavar="LOG", help="run nothing: summarize the run lines of earlier outputs")
    args = parser.parse_args()
    if args.from_logs:
        summarize(runs_from_logs(args.from_logs), args.scratch_passes, args.pretrained_passes)
        return
    if args.quick:
        args.scratch_passes //= 25
        args.pretrained_passes //= 25
        args.seeds = args.seeds[:1]
    if args.data == "reference":
        args.experts = "reference"  # the zoo's experts were trained on another split
    _init_worker(args, None)
    scorer = _WORKER["scorer"]
    print(f"M2N2 on digits: train {len(scorer.data['train'][1])} / test {len(scorer.data['test'][1])} images, "
          f"MLP {'-'.join(map(str, SIZES))} ({scorer.dim} genes), archive {args.archive}, seeds {args.seeds}, "
          f"torch {torch.__version__}, {args.threads} thread(s) per run, {args.jobs} run(s) at a time, "
          f"data {args.data}, pixel scale {args.pixel_scale:g}")  # fmt: skip
    print(f"start: {load()} on {os.cpu_count()} cores")
    tasks: list[tuple[str, str, int]] = []
    experts = None
    if "scratch" in args.settings:
        tasks += [("scratch", m, seed) for m in ("m2n2", "m2n2_no_attraction", "ga", "cmaes", "cmaes_csa") if m in args.methods for seed in args.seeds]
    if "pretrained" in args.settings:
        experts, origin = load_experts() if args.experts == "zoo" else reference_style_experts(scorer)
        for name, genome in experts.items():
            acc = scorer.correct(genome, "test").mean()
            print(f"expert {name} (digits {EXPERT_CLASSES[name]}): test acc {acc:.4f}  [{origin}]")
        tasks += [("pretrained", m, seed) for m in ("m2n2", "m2n2_no_attraction", "ga") if m in args.methods for seed in args.seeds]
        if "slerp" in args.methods:
            tasks.append(("pretrained", "slerp", 0))  # deterministic: one run
    _WORKER["experts"] = experts
    results: dict[str, list[Run]] = {}

    def report(setting: str, run: Run) -> None:
        results.setdefault(setting, []).append(run)
        print(f"[{setting}] {LABELS[run.method]:40s} seed {run.seed}: test {run.test_acc:.4f}  train {run.train_acc:.4f}  "
              f"{run.seconds:6.1f} s  {run.passes} passes ({run.passes / run.seconds:.0f}/s)  cpu {run.cpu_seconds:.1f} s  {load()}  {run.note}", flush=True)  # fmt: skip

    # The runs behind the headline lines first, so a deadline cuts the extras.
    tasks.sort(key=lambda t: PRIORITY.index((t[0], t[1])))
    started = time.perf_counter()
    deadline = started + 60 * args.deadline_minutes if args.deadline_minutes else math.inf
    done = 0
    if args.jobs == 1:
        for task in tasks:
            if time.perf_counter() > deadline:
                break
            report(task[0], _execute(task))
            done += 1
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs, initializer=_init_worker, initargs=(args, experts)) as pool:
            for task, run in zip(tasks, pool.imap(_execute, tasks), strict=True):
                report(task[0], run)
                done += 1
                if time.perf_counter() > deadline:
                    break  # leaving the block terminates the runs in flight
    if done < len(tasks):
        print(f"deadline of {args.deadline_minutes:g} min reached: {len(tasks) - done} of {len(tasks)} runs not done")
    print(f"all runs: {time.perf_counter() - started:.0f} s wall with {args.jobs} at a time")
    summarize(results, args.scratch_passes, args.pretrained_passes)


def summarize(results: dict[str, list[Run]], scratch_passes: int, pretrained_passes: int) -> None:
    """The side-by-side tables and the headline lines."""
    for setting, runs in results.items():
        budget = scratch_passes if setting == "scratch" else pretrained_passes
        print(f"\n{setting}: {budget:,} forward passes over the training split, mean +- std over seeds")
        table(setting, runs, list(LABELS))
    print("CMA-ES here is separable (pycma CMA_diagonal); the reference's figure is full-covariance CMA-ES, which at")
    print("19,210 genes needs ~7 h per seed and > 8.7 GiB here; 'covariance frozen' is what it amounts to in 2,500 generations.")
    print(f"end: {load()}")

    def headline(setting: str, method: str, key: str) -> str:
        values = [getattr(r, key) for r in results.get(setting, []) if r.method == method]
        return f"{statistics.fmean(values):.4f}" if values else "nan"

    print(f"m2n2_scratch_test_acc: {headline('scratch', 'm2n2', 'test_acc')}")
    print(f"cmaes_scratch_test_acc: {headline('scratch', 'cmaes', 'test_acc')}")
    print(f"m2n2_pretrained_test_acc: {headline('pretrained', 'm2n2', 'test_acc')}")
    print(f"m2n2_scratch_seconds: {headline('scratch', 'm2n2', 'seconds')}")


CONFIG = re.compile(r"(archive \d+).*?(data \w+, pixel scale [0-9.]+)")
RUN_LINE = re.compile(
    r"^\[(scratch|pretrained)\] (.+?)\s+seed (\d+): test ([0-9.]+)\s+train ([0-9.]+)\s+([0-9.]+) s\s+(\d+) passes \(\d+/s\)(?:\s+cpu ([0-9.]+) s)?\s+(load average [0-9. ]+?)\s{2}(.*)$"
)


def runs_from_logs(paths: list[str]) -> dict[str, list[Run]]:
    """The per-run lines of earlier invocations' output (runs split over several processes), for
    one summary over all of them; a (setting, method, seed) seen twice keeps its first line."""
    by_label = {label: method for method, label in LABELS.items()}
    results: dict[str, list[Run]] = {}
    seen: set[tuple[str, str, int]] = set()
    settings: dict[str, str] = {}
    for path in paths:
        for line in open(path, encoding="utf-8"):
            header = CONFIG.search(line) if line.startswith("M2N2 on digits:") else None
            if header:
                settings[path] = header.group(1) + ", " + header.group(2)
            match = RUN_LINE.match(line.rstrip("\n"))
            if not match:
                continue
            setting, label, seed, test, train, seconds, passes, cpu, _, note = match.groups()
            if len(set(settings.values())) > 1:
                raise SystemExit(f"the logs ran different set-ups, not one experiment: {settings}")
            key = (setting, by_label[label.strip()], int(seed))
            if key in seen:
                continue
            seen.add(key)
            print(line.rstrip("\n"), f"  <- {path}")
            results.setdefault(setting, []).append(
                Run(key[1], int(seed), float(test), float(train), float(seconds), int(passes), note.strip(), float(cpu or "nan"))
            )
    return results

if __name__ == "__main__":
    main()
