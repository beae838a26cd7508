"""Regenerate experiments/RESULTS.md (the README's results table) from runs this script performs.

    .venv/bin/python experiments/results.py [--seeds 0] [--out runs/results] [--skip-digits]

What it does, every figure from a run made here (nothing is copied from elsewhere):

1. builds (or reuses) the `tiny` zoo: base + experts add, reverse, sort;
2. runs `experiments/tiny_ps.yaml` (PS), `tiny_dfs.yaml` (DFS) and `tiny_ps_dfs.yaml` (PS then DFS)
   through `evomerge run` (in this process: `--local`, same scores as Ray workers), once per seed
   (`--set seed=N`); a run directory that is already there is carried on, not redone;
3. scores on the *holdout* split of each zoo skill (add, reverse, sort and the composition
   add_rev = the sum written reversed, which no expert was trained on) the sources, the hand-set
   merges at their usual defaults (the `baselines` of tiny_ps.yaml: task arithmetic λ=1 and 0.5,
   TIES and DARE-TIES at density 0.5) and each run's best recipe (chosen on the search split);
   one evaluator (lm-eval exact match, `evaluators/tasks/zoo_*`) scores them all;
4. checks the goal of issue 7: the evolved PS model beats the best hand-set merge by >= 10 points
   of mean holdout accuracy (mean over add, reverse, sort) and keeps >= 90% of each expert's
   accuracy on its own skill;
5. digits (M2N2): both reference set-ups (from the two pre-trained experts, from scratch) through
   `experiments/benchmarks/m2n2_digits.py` (same optimizer, in-process), beside the natural_niches
   reference figures. The same set-ups run through `evomerge run` as `experiments/digits_m2n2_*.yaml`
   (weights space, M2N2 genome mode; full budgets take 8 and 16 minutes, too long to repeat here;
   their measured figures are in those files' comments);
6. writes experiments/RESULTS.md (atomically) and prints it.

`--front RUN_DIR` instead writes the Pareto front of a multi-objective run (tiny_pareto) as
mergekit configs to RUN_DIR/front/ and exits.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ("add", "reverse", "sort")
COMPOSITION = "add_rev"
EXPERIMENTS = {"PS": ("tiny_ps", None), "DFS": ("tiny_dfs", None), "PS+DFS": ("tiny_ps_dfs", None)}
GOAL_MARGIN = 0.10
GOAL_KEEP = 0.90
# add_rev: a merge "beats" the sources only by more than this (2 points = 8 of 400 documents)
COMPOSITION_NOISE = 0.02
# natural_niches (the JAX reference code, seed 42), measured on these machines when the project was designed
REFERENCE = {
    "scratch": {"test_acc": 0.8667, "passes": 50_000, "seconds": 591.0},
    "pretrained": {"test_acc": 0.6889, "passes": 10_000, "seconds": 99.0},
}
HOLDOUT_EVALUATOR: dict[str, Any] = {
    "kind": "lm_eval",
    "description": "zoo skills and the composition add_rev, exact match",
    "tasks": [{"task": f"zoo_{s}", "metric": "acc"} for s in (*SKILLS, COMPOSITION)],
    "objectives": {
        "mean_acc": [f"zoo_{s}" for s in SKILLS],
        **{s: [f"zoo_{s}"] for s in (*SKILLS, COMPOSITION)},
    },
    "primary": "mean_acc",
    "batch_size": 128,
}


@dataclass
class Scored:
    """A model of the table: label, kind, recipe, holdout accuracy per skill (per seed)."""

    label: str
    kind: str
    recipes: list[Any] = field(default_factory=list)
    holdout: list[dict[str, float]] = field(default_factory=list)
    search_mean: list[float] = field(default_factory=list)

    def mean(self, key: str) -> float:
        values = [h[key] for h in self.holdout if key in h]
        return statistics.fmean(values) if values else float("nan")

    def spread(self, key: str) -> float:
        values = [h[key] for h in self.holdout if key in h]
        return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def say(text: str) -> None:
    print(text, flush=True)


# ---- runs ---------------------------------------------------------------------------------------


def run_experiment(name: str | Path, run_dir: Path, seed: int, sets: list[str], local: bool) -> Path:
    """Start (or carry on) an experiment run (a built-in name or a file); returns its directory."""
    from evomerge.run.driver import resume_run, start_run
    from evomerge.run.rundir import is_run_dir

    if is_run_dir(run_dir):
        resume_run(run_dir, local=local, echo=say)
    else:
        start_run(name, out=run_dir, sets=(f"seed={seed}", *sets), local=local, echo=say)
    return run_dir


def run_best(run_dir: Path, stage: str | None = None) -> tuple[Any, float]:
    """The best recipe of a run (of `stage`, default the last stage that has one), made portable
    (run-internal refs replaced by directories), and its search fitness."""
    from evomerge.config import read_experiment
    from evomerge.recipe import Recipe
    from evomerge.run.export import portable_recipe, run_sources
    from evomerge.run.ledger import Ledger
    from evomerge.run.rundir import LEDGER_FILE
    from evomerge.run.stages import stage_best

    exp = read_experiment(run_dir)
    names = [stage] if stage else [s.name for s in reversed(exp.stages)]
    with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
        for name in names:
            best = stage_best(ledger, name)
            if best is not None:
                recipe = portable_recipe(Recipe.from_string(best.recipe_yaml), run_sources(run_dir))
                return recipe, float(best.score)
    raise SystemExit(f"{run_dir}: no successful evaluation to take a best from")


# ---- scoring ------------------------------------------------------------------------------------


def holdout_scorer(limit: int | None = None) -> Any:
    """One in-process worker (the runs' own WorkerCore) with the 4-skill holdout evaluator."""
    from evomerge.evaluate import resolve_spec
    from evomerge.run.worker_core import WorkerCore

    overrides = {"holdout_limit": limit} if limit else {}
    return WorkerCore({}, resolve_spec(dict(HOLDOUT_EVALUATOR), overrides), device="cpu")


def score_holdout(core: Any, recipe: Any) -> dict[str, float]:
    from evomerge.run.jobs import Job

    result = core.run(Job("results", recipe, "holdout"))
    if result.failed:
        raise SystemExit(f"scoring failed: {result.error}")
    return {k: float(v) for k, v in result.objectives.items()}


def source_recipe(ref: str) -> Any:
    from evomerge.recipe import Recipe

    return Recipe.parse({"merge_method": "passthrough", "models": [{"model": ref}]})


def experiment_file(name: str, models: str, out: Path) -> Path:
    """experiments/NAME.yaml, or a copy of it whose `zoo:tiny/` models are `models` + NAME
    (another zoo preset, `zoo:test/`, or a directory of candidate models, `/path/`)."""
    from evomerge.resources import find_yaml

    path = find_yaml("experiments", name)
    if models == "zoo:tiny/":
        return path
    copy = out / "experiments" / path.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(path.read_text().replace("zoo:tiny/", models))
    return copy


def budget_sets(path: Path, evaluations: int | None, limit: int | None, holdout_limit: int | None = None) -> list[str]:
    """--set overrides for every stage of an experiment: its budget, popsize (at most the budget)
    and the number of documents per task it searches on."""
    from evomerge.config import load_experiment

    out = []
    for stage in load_experiment(path).stages:
        if evaluations:
            out.append(f"stages.{stage.name}.budget.evaluations={evaluations}")
            popsize = stage.optimizer.options.get("popsize")
            if popsize and popsize > evaluations:
                out.append(f"stages.{stage.name}.optimizer.popsize={evaluations}")
        if limit or holdout_limit:
            overrides = dict(stage.evaluator_overrides)
            overrides.update({k: v for k, v in (("limit", limit), ("holdout_limit", holdout_limit)) if v})
            text = ", ".join(f"{k}: {v}" for k, v in overrides.items())
            out.append(f"stages.{stage.name}.evaluator_overrides={{{text}}}")
    return out


def search_docs_text(models: str, out: Path) -> str:
    """How many search documents per skill the experiments' stages use (their own settings)."""
    from evomerge.config import load_experiment

    users: dict[int, list[str]] = {}
    for name, _ in EXPERIMENTS.values():
        for stage in load_experiment(experiment_file(name, models, out)).stages:
            users.setdefault(stage.evaluator_overrides.get("limit") or 400, []).append(name)
    parts = [f"{'all 400' if n >= 400 else f'the first {n} of 400'} ({', '.join(dict.fromkeys(names))})" for n, names in sorted(users.items())]
    return "searched on " + " or ".join(parts)


def handset_recipes(path: Path) -> list[tuple[str, Any]]:
    """The hand-set baselines of an experiment file (name, recipe)."""
    from evomerge.config import load_experiment
    from evomerge.recipe import Recipe

    exp = load_experiment(path)
    return [(b.name, Recipe.parse(b.recipe) if isinstance(b.recipe, dict) else Recipe.from_yaml(b.recipe)) for b in exp.baselines]


# ---- digits -------------------------------------------------------------------------------------


def digits_benchmark(setting: str, passes: int, seed: int) -> dict[str, Any]:
    """An M2N2 digits figure (one seed) from experiments/benchmarks/m2n2_digits.py: `evomerge run`
    cannot run the digits MLPs yet (its workers build transformers models only)."""
    cmd = [
        sys.executable, str(ROOT / "experiments" / "benchmarks" / "m2n2_digits.py"), "--seeds", str(seed),
        "--methods", "m2n2", "--settings", setting, f"--{setting}-passes", str(passes),
    ]  # fmt: skip
    say("running: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    lines = dict(re.findall(r"^(m2n2_\w+): (\S+)$", done.stdout, flags=re.M))
    return {
        "test_acc": float(lines.get(f"m2n2_{setting}_test_acc", "nan")),
        "seconds": float(lines.get(f"m2n2_{setting}_seconds", wall)),
        "passes": passes,
    }


# ---- the page -----------------------------------------------------------------------------------


def pct(value: float) -> str:
    return "–" if value != value else f"{100 * value:.1f}"


def cell(model: Scored, key: str) -> str:
    text = pct(model.mean(key))
    spread = model.spread(key)
    return f"{text} ± {100 * spread:.1f}" if spread else text


def render(models: list[Scored], seeds: list[int], digits: dict[str, Any], facts: dict[str, Any]) -> str:
    cols = [*SKILLS, "mean_acc", COMPOSITION]
    lines = [
        "# Results",
        "",
        f"Generated by `python experiments/results.py{facts['argv']}` on {facts['date']} ({facts['cores']} CPU cores, load average {facts['load']} at the start;"
        + f" {facts['minutes']:.0f} min). Seeds: {', '.join(map(str, seeds))}"
        + (" (figures are means; ± is half the range over seeds)." if len(seeds) > 1 else "."),
        "",
        f"## {facts['preset'].capitalize()} zoo: holdout exact-match accuracy (%)",
        "",
        f"Zoo `{facts['preset']}` (`{facts['zoo']}`). Each skill's holdout split: {facts['holdout_docs']} documents,"
        f" disjoint from the search split the evolution saw ({facts['search_docs']} documents per skill). `mean` = mean over add, reverse, sort (the search fitness is the"
        " same mean on the search split). `add_rev` (the sum written reversed) is a composition no expert"
        " was trained on; nothing searched on it.",
        "",
        "| model | kind | " + " | ".join("mean" if c == "mean_acc" else c for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for m in models:
        lines.append(f"| {m.label} | {m.kind} | " + " | ".join(cell(m, c) for c in cols) + " |")
    lines += ["", "### Goal (issue 7)", ""]
    lines += [f"- {line}" for line in facts["goal"]]
    lines += ["", "### Composition skill add_rev", ""]
    lines += [f"- {line}" for line in facts["composition"]]
    lines += ["", "## Digits: M2N2 test accuracy (%)", ""]
    if not digits:
        lines.append("Not run this time (`--skip-digits`).")
    else:
        lines += [
            "| set-up | evomerge | forward passes | seconds | natural_niches reference (seed 42) | source of our figure |",
            "|---|---:|---:|---:|---|---|",
        ]
        for setting in ("pretrained", "scratch"):
            how = f"`experiments/benchmarks/m2n2_digits.py --methods m2n2 --settings {setting}` (seed 42)"
            got = digits.get(setting)
            ref = REFERENCE[setting]
            ref_text = f"{pct(ref['test_acc'])} in {ref['passes']:,} passes, {ref['seconds']:.0f} s"
            if got is None:
                lines.append(f"| {setting} | not run | | | {ref_text} | |")
            elif "error" in got:
                lines.append(f"| {setting} | failed: {got['error']} | | | {ref_text} | {how} |")
            else:
                lines.append(f"| {setting} | {pct(got['test_acc'])} | {got['passes']:,} | {got['seconds']:.0f} | {ref_text} | {how} |")
        lines += [
            "",
            "Not like for like with the reference: both set-ups here use the zoo's data (a stratified 80/20 split of"
            " scikit-learn's digits, pixels in [0, 1]; the reference trains on the first 80% of the file, raw 0..16"
            " pixels, a harder test set) and the pre-trained set-up starts from the zoo's experts (`low`: 0-4, `high`:"
            " 5-9), trained far more than the reference's (10 full-batch Adam steps). `m2n2_digits.py --data reference"
            " --experts reference` runs the reference's own set-up.",
        ]
    lines += ["", "## How the evolved models were found", ""]
    lines += [f"- {line}" for line in facts["runs"]]
    return "\n".join(lines) + "\n"


def goal_lines(models: dict[str, Scored], preset: str = "tiny") -> tuple[list[str], bool]:
    ps = models["PS"]
    handset = [m for m in models.values() if m.kind == "hand-set"]
    best_hand = max(handset, key=lambda m: m.mean("mean_acc"))
    margin = ps.mean("mean_acc") - best_hand.mean("mean_acc")
    ok_margin = margin >= GOAL_MARGIN
    lines = [
        f"Evolved PS mean {pct(ps.mean('mean_acc'))} vs best hand-set ({best_hand.label}) {pct(best_hand.mean('mean_acc'))}:"
        f" {100 * margin:+.1f} points (goal >= +{100 * GOAL_MARGIN:.0f}): {'met' if ok_margin else 'NOT met'}."
    ]
    ok_keep = True
    for skill in SKILLS:
        expert = models[f"zoo:{preset}/{skill}"].mean(skill)
        kept = ps.mean(skill) / expert if expert > 0 else float("nan")
        ok = kept >= GOAL_KEEP
        ok_keep &= ok
        lines.append(
            f"{skill}: PS {pct(ps.mean(skill))} vs expert {pct(expert)} = {100 * kept:.0f}% kept (goal >= {100 * GOAL_KEEP:.0f}%): {'met' if ok else 'NOT met'}."
        )
    return lines, ok_margin and ok_keep


def composition_lines(models: dict[str, Scored]) -> list[str]:
    experts = [m for m in models.values() if m.kind in ("source", "base")]
    best_expert = max(experts, key=lambda m: m.mean(COMPOSITION))
    lines = [f"Best source on add_rev: {best_expert.label} {pct(best_expert.mean(COMPOSITION))}."]
    for label in ("PS", "DFS", "PS+DFS"):
        m = models[label]
        margin = m.mean(COMPOSITION) - best_expert.mean(COMPOSITION)
        # a few documents of 400 either way are noise: a win must clear NOISE and the seeds' spread
        if margin > max(COMPOSITION_NOISE, m.spread(COMPOSITION)):
            verdict = f"beats every source (+{100 * margin:.1f} points)"
        elif margin > 0:
            verdict = f"does not clearly beat every source (+{100 * margin:.1f} points, within noise)"
        else:
            verdict = "does not beat every source"
        lines.append(f"{label}: {pct(m.mean(COMPOSITION))} — {verdict}.")
    return lines


# ---- Pareto front export -----------------------------------------------------------------------


def export_front(run_dir: Path) -> list[Path]:
    """The non-dominated recipes of each multi-objective stage, as mergekit configs in RUN_DIR/front/."""
    from evomerge.fsutil import atomic_write_text
    from evomerge.recipe import Recipe
    from evomerge.report.data import load_run
    from evomerge.run.export import portable_recipe, run_sources

    view = load_run(run_dir)
    pool = run_sources(run_dir)
    written = []
    for stage in view.stages:
        if not stage.multi:
            continue
        for i, row in enumerate(stage.front()):
            recipe = portable_recipe(Recipe.from_string(row.recipe_yaml), pool)
            recipe = recipe.with_evomerge(stage=stage.name, recipe_hash=row.recipe_hash, scores={"search": dict(row.objectives)})
            path = run_dir / "front" / f"{stage.name}-{i:02d}.yaml"
            atomic_write_text(path, recipe.to_yaml())
            written.append(path)
    return written


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "results", help="where the runs go")
    parser.add_argument("--md", type=Path, default=ROOT / "experiments" / "RESULTS.md")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every tiny run")
    parser.add_argument("--ray", action="store_true", help="run on the experiments' Ray workers instead of in-process")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--scratch-passes", type=int, default=50_000)
    parser.add_argument("--pretrained-passes", type=int, default=10_000)
    parser.add_argument("--preset", default="tiny", help="zoo preset of the models (test: a smoke run)")
    parser.add_argument("--models", default=None, help="a directory holding base/ add/ reverse/ sort/ to use instead of the zoo's")
    parser.add_argument("--budget", type=int, default=None, help="evaluations per stage instead of the experiments' own")
    parser.add_argument("--limit", type=int, default=None, help="search documents per task instead of the experiments' own")
    parser.add_argument("--holdout-limit", type=int, default=None, help="holdout documents per task (default: all 400)")
    parser.add_argument("--quick", action="store_true", help="4 evaluations per stage, 16 documents per task: a smoke run")
    parser.add_argument("--front", type=Path, default=None, help="export the Pareto front of this run and exit")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.front is not None:
        for path in export_front(args.front):
            say(str(path))
        return 0

    from evomerge.fsutil import atomic_write_text
    from evomerge.resources import read_yaml
    from evomerge.zoo import build_zoo

    start = time.perf_counter()
    load = f"{os.getloadavg()[0]:.1f}"
    if args.quick:
        args.budget, args.limit, args.holdout_limit = args.budget or 4, args.limit or 16, args.holdout_limit or 16
    prefix = f"{Path(args.models).resolve()}/" if args.models else f"zoo:{args.preset}/"
    zoo = Path(args.models).resolve() if args.models else build_zoo(args.preset, progress=say)
    local = not args.ray
    models: dict[str, Scored] = {}
    for name in ("base", *SKILLS):
        label = f"zoo:{args.preset}/{name}"  # with --models: the stand-in for that zoo model
        models[label] = Scored(label, "base" if name == "base" else "source", [source_recipe(f"{prefix}{name}")])
    for name, recipe in handset_recipes(experiment_file("tiny_ps", prefix, args.out)):
        models[name] = Scored(name, "hand-set", [recipe])
    run_facts = []
    for label, (name, stage) in EXPERIMENTS.items():
        models[label] = Scored(f"evolved {label}", "evolved")
        file = experiment_file(name, prefix, args.out)
        sets = [*budget_sets(file, args.budget, args.limit, args.holdout_limit), *args.sets]
        for seed in args.seeds:
            run_dir = run_experiment(file, args.out / f"{name}-seed{seed}", seed, sets, local)
            recipe, search = run_best(run_dir, stage)
            models[label].recipes.append(recipe)
            models[label].search_mean.append(search)
        exp = read_yaml(args.out / f"{name}-seed{args.seeds[0]}" / "experiment.yaml")
        stages = "; ".join(
            f"{s['name']}: {s['space']['kind']}"
            + (f" {s['space'].get('method')}" if s["space"].get("method") else "")
            + (f", {s['space'].get('layer_groups')} layer groups" if s["space"].get("layer_groups", 1) > 1 else "")
            + f", {s['optimizer']['name']} popsize {s['optimizer'].get('popsize')}, {s['budget']['evaluations']} evaluations"
            for s in exp["stages"]
        )
        run_facts.append(f"{label}: `experiments/{name}.yaml` ({stages}); runs in `{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}/{name}-seed*`.")

    say("scoring every model on the holdout splits")
    core = holdout_scorer(args.holdout_limit)
    for m in models.values():
        m.holdout = [score_holdout(core, r) for r in m.recipes]
    core = None

    digits: dict[str, Any] = {}
    if not args.skip_digits:
        digits["pretrained"] = digits_benchmark("pretrained", args.pretrained_passes, 42)
        digits["scratch"] = digits_benchmark("scratch", args.scratch_passes, 42)

    goal, met = goal_lines(models, args.preset)
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "load": load,
        "minutes": (time.perf_counter() - start) / 60,
        "zoo": str(zoo) if args.models else Path(zoo).name,
        "preset": args.preset,
        "holdout_docs": f"the first {args.holdout_limit} of 400" if args.holdout_limit else "all 400",
        "search_docs": f"searched on the first {args.limit} of 400" if args.limit else search_docs_text(prefix, args.out),
        "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "goal": goal,
        "composition": composition_lines(models),
        "runs": run_facts,
    }
    text = render(list(models.values()), args.seeds, digits, facts)
    atomic_write_text(args.md, text)
    say(text)
    say(f"wrote {args.md} (goal {'met' if met else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
