"""Cheap fitness: documents evaluated under each fidelity strategy, and what the saving costs.

The tiny-zoo PS search of `experiments/tiny_ps.yaml` (layer-wise task arithmetic over the three
experts, CMA-ES with generations of 10, `--evaluations` candidates, seeds `--seeds`) is run with
`evomerge run --local` once per strategy and seed, on two evaluators:

- `exact`: `evaluators/zoo_all.yaml` as tiny_ps uses it (exact match under teacher forcing,
  `loglikelihood` requests, the first 128 search documents of each skill; holdout: all 400);
- `mc`: a multiple-choice lm-eval task folder written by this script (`<work>/tasks/zoo_*_mc`):
  the same prompts with four choices each (the answer and three near misses: for add the sum
  +-1 and +-10, for reverse the unreversed string and two swaps, for sort the unsorted digits,
  the descending order and a swap; a document without three distinct ones is left out),
  `output_type: multiple_choice`, metric `acc`; 128 search
  documents per skill, all 400 holdout ones.

Figures per evaluator and strategy (against `full` with the same seed):
  - docs_evaluated_ratio_vs_full: the search documents the `full` runs scored in the PS stage,
    summed over seeds, over the strategy's (documents evaluated as `evomerge status` counts
    them, `evomerge.fidelity.figures`: candidates, and the full re-scoring of what would enter
    the top k on an estimate; a repeated recipe's reused scores count 0).
  - holdout_mean_delta_vs_full: holdout mean_acc of the stage's reported best minus full's, in
    points (x100), mean over seeds.
  - rank_spearman_vs_full: Spearman correlation between the fitness each candidate was told (an
    estimate or exact) and its fitness on the full search split, over `--rank-sample`
    candidates drawn (seeded) from the runs' own ledgers (an equal share from each seed's run,
    distinct candidates, the rows the optimizer was told), each scored in full by this script
    when its row is an estimate (for this benchmark only).

Strategies (`--strategies`, options by `--set-strategy NAME=JSON`): full, racing, sequential,
irt (its defaults: rotating uniform anchors told their mean, a bounded final re-scoring),
irt_fixed (the earlier fixed-anchor irt), irt_pirt (irt's previous defaults; not run unless named). The headline lines come last: one line per strategy and figure for the `exact`
evaluator, then the best strategy's figures again under their bare names. "Best" is the one with
the highest ratio among those with holdout delta >= -1.0 and Spearman >= 0.9 (the issue's bar),
else the highest ratio overall (and it says so).

    .venv/bin/python experiments/benchmarks/fitness_cost.py [--seeds 0,1,2] [--evaluations 300]
        [--strategies full,racing,sequential,irt,irt_fixed] [--evaluators exact,mc] [--mc-seeds 0]
        [--mc-evaluations 100] [--rank-sample 100]
        [--work DIR] [--set-strategy 'irt={"anchors": 24}']

Runs already complete in `--work` (their `best/scores.json` exists, with the same experiment)
are reused, so an interrupted benchmark picks up where it stopped; so are the full search-split
scores of the rank sample (`<work>/<evaluator>/full_scores.json`, by recipe hash).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.resources import builtin_dir

ROOT = Path(__file__).resolve().parents[2]
SKILLS = ("add", "reverse", "sort")
SEARCH_DOCS = 128
STAGE = "ps"
DEFAULT_STRATEGIES: dict[str, object] = {
    "full": "full",
    "racing": {"strategy": "racing"},
    "irt": {"strategy": "irt"},  # rotating uniform anchors told their mean, a bounded final re-scoring
    "sequential": {"strategy": "sequential"},
    # the earlier irt: anchors chosen once per fit (k-means + information at the best model), gp-IRT,
    # full scoring of novel candidates; kept in the table for comparison
    "irt_fixed": {"strategy": "irt", "rotate": False, "anchors": 18, "estimator": "gp_irt", "novelty_margin": 0.1},
    # irt's previous defaults (p-IRT, half the draw by information): not in the default list, as it
    # meets the bar on seeds 0-2 but not beyond them (experiments/RESULTS.md); --strategies ...,irt_pirt
    "irt_pirt": {"strategy": "irt", "estimator": "p_irt", "spread": 0.5},
}
BAR = {"ratio": 10.0, "delta": -1.0, "spearman": 0.9}


# ---------------------------------------------------------------------- the multiple-choice task
MC_EVALUATOR = """# Written by experiments/benchmarks/fitness_cost.py: the zoo skills as multiple choice.
kind: lm_eval
description: zoo skills, four-way multiple choice (answer vs near misses), mean accuracy
tasks:
  - {task: zoo_add_mc, metric: acc}
  - {task: zoo_reverse_mc, metric: acc}
  - {task: zoo_sort_mc, metric: acc}
objectives:
  mean_acc: [zoo_add_mc, zoo_reverse_mc, zoo_sort_mc]
primary: mean_acc
include_path: tasks
batch_size: 128
"""


def near_misses(skill: str, prompt: str, answer: str) -> list[str]:
    """Three wrong answers close to `answer` (distinct, deterministic)."""
    if skill == "add":
        value = int(answer)
        pool = [str(v) for v in (value + 1, value - 1, value + 10, value - 10, value + 2) if v >= 0]
    elif skill == "reverse":
        word = prompt.rstrip("|")
        swaps = [answer[1] + answer[0] + answer[2:], answer[:-2] + answer[-1] + answer[-2], answer[1:] + answer[0]]
        pool = [word, *swaps]
    else:
        digits = prompt.rstrip(">")
        swaps = [answer[1] + answer[0] + answer[2:], answer[:-2] + answer[-1] + answer[-2]]
        pool = [digits, answer[::-1], *swaps]
    out: list[str] = []
    for p in pool:
        if p != answer and p not in out:
            out.append(p)
    return out[:3]


def write_mc(work: Path) -> Path:
    """The multiple-choice task folders and their evaluator YAML under `work`; the YAML's path."""
    rng = np.random.default_rng(20251202)
    for skill in SKILLS:
        folder = work / "tasks" / f"zoo_{skill}_mc"
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("search", "holdout"):
            lines = []
            source = builtin_dir("evaluators") / "tasks" / f"zoo_{skill}" / f"{split}.jsonl"
            for line in source.read_text().splitlines():
                doc = json.loads(line)
                wrong = near_misses(skill, doc["prompt"], doc["answer"])
                if len(wrong) < 3:
                    continue
                gold = int(rng.integers(4))
                choices = [w + "\n" for w in wrong]
                choices.insert(gold, doc["target"])
                lines.append(json.dumps({"id": doc["id"], "prompt": doc["prompt"], "choices": choices, "gold": gold}))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        # the exact-match task's YAML and data locator, turned into a multiple choice
        shipped = builtin_dir("evaluators") / "tasks" / f"zoo_{skill}"
        text = "".join(line for line in (shipped / f"zoo_{skill}.yaml").read_text().splitlines(keepends=True) if not line.startswith("#"))
        for old, new in (
            (f"task: zoo_{skill}\n", f"task: zoo_{skill}_mc\n"),
            ("output_type: loglikelihood", "output_type: multiple_choice"),
            ("doc_to_target: target", "doc_to_choice: choices\ndoc_to_target: gold"),
        ):
            if old not in text:
                raise SystemExit(f"error: {shipped}: zoo_{skill}.yaml has no '{old.strip()}' to turn into a multiple choice")
            text = text.replace(old, new)
        (folder / f"zoo_{skill}_mc.yaml").write_text(f"# Written by experiments/benchmarks/fitness_cost.py from zoo_{skill}.yaml: four-way multiple choice, acc = the answer is the likeliest choice.\n{text}")
        shutil.copyfile(shipped / "_data.py", folder / "_data.py")
    path = work / "zoo_mc.yaml"
    path.write_text(MC_EVALUATOR)
    return path


# ---------------------------------------------------------------------- runs
def experiment(evaluator: str, fidelity: object, seed: int, evaluations: int) -> dict:
    exp = yaml.safe_load((ROOT / "experiments" / "tiny_ps.yaml").read_text())
    exp["seed"] = seed
    exp["name"] = f"fitness_cost_s{seed}"
    stage = exp["stages"][0]
    stage["evaluator"] = evaluator
    stage["evaluator_overrides"] = {"limit": SEARCH_DOCS}
    stage["budget"] = {"evaluations": evaluations}
    stage["fidelity"] = fidelity
    exp["ray"] = {"workers": 0}
    return exp


def run(exp: dict, out: Path, log: Path) -> float:
    """`evomerge run --local` of `exp` into `out` (skipped when a finished run of the same
    experiment is there); the seconds it took."""
    spec = out.parent / f"{out.name}.yaml"
    text = yaml.safe_dump(exp, sort_keys=False)
    if (out / "best" / "scores.json").is_file() and spec.is_file() and spec.read_text() == text:
        return 0.0
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)  # a run this script started and did not finish
    spec.write_text(text)
    cli = Path(sys.executable).parent / "evomerge"
    start = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.run([str(cli), "run", str(spec), "--local", "--out", str(out)], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"error: {spec}: evomerge run failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def ledger_rows(run_dir: Path, split: str) -> list[dict]:
    conn = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT seq, candidate_id, recipe_hash, recipe_yaml, objectives, fitness, status, docs, estimate, meta "
            "FROM evaluations WHERE stage = ? AND split = ? ORDER BY seq",
            (STAGE, split),
        ).fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows]


def docs_evaluated(run_dir: Path) -> int:
    """Documents the PS stage scored on its search split, as `evomerge status` counts them."""
    from evomerge.fidelity.figures import stage_documents
    from evomerge.run.ledger import Ledger

    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        figure = stage_documents(ledger, STAGE)
    return int(figure["evaluated"]) if figure else 0


def best_holdout(run_dir: Path) -> float:
    """The stage best's holdout mean_acc (`best/scores.json`)."""
    best = json.loads((run_dir / "best" / "scores.json").read_text())
    return float(best["holdout"]["mean_acc"])


# ---------------------------------------------------------------------- rescoring in full
class FullScorer:
    """Scores recipes on the whole search split, in this process (cached by recipe hash)."""

    def __init__(self, run_dir: Path, cache: Path) -> None:
        from evomerge.run.worker_core import WorkerCore

        frozen = yaml.safe_load((run_dir / "experiment.yaml").read_text())
        self.spec = frozen["stages"][0]["evaluator"]
        self.core_cls = WorkerCore
        self.cores: dict[str, object] = {}
        self.path = cache
        self.cache: dict[str, float] = json.loads(cache.read_text()) if cache.is_file() else {}

    def score(self, key: str, recipe_yaml: str, recipe_hash: str) -> float:
        import torch

        from evomerge.merge.sources import resolve_model_ref
        from evomerge.recipe import Recipe

        if recipe_hash in self.cache:
            return self.cache[recipe_hash]
        recipe = Recipe.parse(yaml.safe_load(recipe_yaml))
        core = self.cores.get(key)
        if core is None:
            sources = {ref: str(resolve_model_ref(ref)) for ref in recipe.model_refs()}
            core = self.cores[key] = self.core_cls(sources, self.spec, device="cpu")
        model, tokenizer = core.prepare(recipe)
        with torch.no_grad():
            result = core.evaluator.evaluate(model, tokenizer, "search")
        value = float(result.objectives["mean_acc"])
        self.cache[recipe_hash] = value
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # benchmarks sharing a --work folder
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.path)
        return value


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return math.nan
    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--strategies", default="full,racing,sequential,irt,irt_fixed")
    parser.add_argument("--evaluators", default="exact,mc")
    parser.add_argument("--mc-seeds", default=None, help="seeds of the multiple-choice runs (default: --seeds)")
    parser.add_argument("--mc-evaluations", type=int, default=None, help="evaluations of the multiple-choice runs (default: --evaluations)")
    parser.add_argument("--rank-sample", type=int, default=100)
    parser.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "evomerge-fitness-cost"))
    parser.add_argument("--set-strategy", action="append", default=[], help="NAME=JSON fidelity spec (NAME may be new)")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    specs = dict(DEFAULT_STRATEGIES)
    for item in args.set_strategy:
        name, _, value = item.partition("=")
        specs[name] = json.loads(value)
    names = [s for s in args.strategies.split(",") if s]
    if "full" not in names:
        names.insert(0, "full")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    evaluators = {"exact": "zoo_all"}  # the built-in name: a run in --work is reused from any checkout
    if "mc" in args.evaluators.split(","):
        evaluators["mc"] = str(write_mc(work))
    evaluators = {k: v for k, v in evaluators.items() if k in args.evaluators.split(",")}
    log = work / "runs.log"
    mc = f" (mc: seeds {args.mc_seeds or args.seeds}, {args.mc_evaluations or args.evaluations} evaluations)" if "mc" in evaluators else ""
    print(f"work: {work}; seeds {seeds}; {args.evaluations} evaluations; strategies {names}; evaluators {list(evaluators)}{mc}", flush=True)

    table: dict[str, dict[str, dict[str, float]]] = {}
    for ev_name, ev_path in evaluators.items():
        per: dict[str, dict[int, dict]] = {n: {} for n in names}
        ev_seeds = [int(x) for x in args.mc_seeds.split(",")] if ev_name == "mc" and args.mc_seeds else seeds
        for seed in ev_seeds:
            for name in names:
                out = work / ev_name / f"{name}-s{seed}"
                out.parent.mkdir(parents=True, exist_ok=True)
                budget = args.mc_evaluations if ev_name == "mc" and args.mc_evaluations else args.evaluations
                seconds = run(experiment(ev_path, specs[name], seed, budget), out, log)
                rows = ledger_rows(out, "search")
                docs = docs_evaluated(out)
                per[name][seed] = {"dir": out, "docs": docs, "holdout": best_holdout(out), "rows": rows, "seconds": seconds}
                print(f"{ev_name} seed {seed} {name}: {docs} docs, best holdout {per[name][seed]['holdout']:.4f} ({seconds:.0f} s)", flush=True)
        scorer = FullScorer(per["full"][ev_seeds[0]]["dir"], work / ev_name / "full_scores.json")
        table[ev_name] = {}
        for name in names:
            ratio = sum(per["full"][s]["docs"] for s in ev_seeds) / max(1, sum(per[name][s]["docs"] for s in ev_seeds))
            delta = float(np.mean([100 * (per[name][s]["holdout"] - per["full"][s]["holdout"]) for s in ev_seeds]))
            told, full = [], []
            for s in ev_seeds:
                a, b = rank_pairs(per[name][s], math.ceil(args.rank_sample / len(ev_seeds)), s, scorer, ev_name)
                told += a
                full += b
            rho = spearman(told, full)
            table[ev_name][name] = {"ratio": ratio, "delta": delta, "spearman": rho}
            deltas = ", ".join(f"{100 * (per[name][s]['holdout'] - per['full'][s]['holdout']):+.2f}" for s in ev_seeds)
            print(f"{ev_name} {name}: ratio {ratio:.2f}, holdout delta {delta:+.2f} points (per seed {deltas}), spearman {rho:.3f} over {len(told)} candidates", flush=True)

    print()
    print("| evaluator | strategy | docs_evaluated_ratio_vs_full | holdout_mean_delta_vs_full | rank_spearman_vs_full |")
    print("|---|---|---|---|---|")
    for ev_name, rows in table.items():
        for name, f in rows.items():
            print(f"| {ev_name} | {name} | {f['ratio']:.1f} | {f['delta']:+.2f} | {f['spearman']:.3f} |")
    for ev_name in [e for e in table if e != "exact"]:
        for name, f in table[ev_name].items():
            print(f"{ev_name}.{name}.docs_evaluated_ratio_vs_full: {f['ratio']:.2f}")
            print(f"{ev_name}.{name}.holdout_mean_delta_vs_full: {f['delta']:.2f}")
            print(f"{ev_name}.{name}.rank_spearman_vs_full: {f['spearman']:.3f}")
    head = table.get("exact") or next(iter(table.values()))
    for name, f in head.items():
        print(f"{name}.docs_evaluated_ratio_vs_full: {f['ratio']:.2f}")
        print(f"{name}.holdout_mean_delta_vs_full: {f['delta']:.2f}")
        print(f"{name}.rank_spearman_vs_full: {f['spearman']:.3f}")
    passing = [n for n, f in head.items() if n != "full" and f["delta"] >= BAR["delta"] and f["spearman"] >= BAR["spearman"]]
    pool = passing or [n for n in head if n != "full"] or list(head)
    best = max(pool, key=lambda n: head[n]["ratio"])
    meets = best in passing and head[best]["ratio"] >= BAR["ratio"]
    print(f"best_strategy: {best}{'' if meets else ' (short of the bar: ratio >= 10, delta >= -1.0, spearman >= 0.9)'}")
    print(f"docs_evaluated_ratio_vs_full: {head[best]['ratio']:.2f}")
    print(f"holdout_mean_delta_vs_full: {head[best]['delta']:.2f}")
    print(f"rank_spearman_vs_full: {head[best]['spearman']:.3f}")


def rank_pairs(run: dict, sample: int, seed: int, scorer: FullScorer, key: str) -> tuple[list[float], list[float]]:
    """(told fitness, full search-split fitness) of `sample` distinct candidates of the run, drawn
    (seeded) from the rows the optimizer was told."""
    first: dict[int, dict] = {}
    for r in run["rows"]:
        meta = json.loads(r["meta"] or "{}")
        if r["status"] == "ok" and "rescore_of" not in meta and r["candidate_id"] not in first:
            first[r["candidate_id"]] = r
    cands = list(first.values())
    rng = np.random.default_rng(seed)
    picked = [cands[i] for i in sorted(rng.choice(len(cands), size=min(sample, len(cands)), replace=False))]
    told, full = [], []
    for r in picked:
        told.append(float(json.loads(r["objectives"])["mean_acc"]))
        full.append(scorer.score(key, r["recipe_yaml"], r["recipe_hash"]) if r["estimate"] else told[-1])
    return told, full


if __name__ == "__main__":
    main()
