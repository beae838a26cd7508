"""``evomerge demo``, the main job of ``make run``: an evolutionary merge search, end to end.

Steps, each through the same code a user's ``evomerge`` commands run:

1. build (or reuse from the cache) the ``tiny`` zoo: a base Llama and three experts
   fine-tuned from it on ``add``, ``reverse`` and ``sort``;
2. run ``experiments/tiny_ps_dfs.yaml`` on local Ray workers (2 workers, 1 CPU each): a
   parameter-space stage (task arithmetic per layer group, CMA-ES), then a data-flow stage
   over the PS model and an expert; the experiment's baselines score the sources as they are
   and the hand-set merges on both splits;
3. export the best model (``evomerge export``) and write the report (``evomerge report``);
4. print a table of every model's search and holdout accuracy per skill (and their mean),
   the search documents each stage evaluated (against a full-fidelity run: the stages'
   `fidelity:`, see the README's "Cheap fitness"), and the paths of the exported model and
   the report.

A second call with the same ``out`` carries on (or just re-reads) the run that is there, so
``make run`` twice does not search twice. The table is read back from the run's ledger
(:func:`run_table`), so the figures printed are the ones the report and ``evomerge status``
show.

``evomerge demo --merge-only`` (:func:`run_merge_only`) skips the search: one hand-set TIES
merge of the ``add`` and ``reverse`` experts, written as a plain mergekit config (the zoo
models named by their directories) and merged, with each model's holdout exact match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from evomerge.config import load_experiment, read_experiment
from evomerge.fidelity import split_spec
from evomerge.fidelity.figures import documents_line, stage_documents
from evomerge.fsutil import atomic_write_text
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.recipe import Recipe
from evomerge.report import write_report
from evomerge.resources import find_yaml
from evomerge.run.driver import resume_run, start_run
from evomerge.run.export import export_run
from evomerge.run.ledger import BASELINE_PREFIX, Ledger
from evomerge.run.rundir import LEDGER_FILE, is_run_dir
from evomerge.run.stages import stage_best
from evomerge.zoo import PRESETS, build_zoo
from evomerge.zoo.build import holdout_accuracy

DEFAULT_OUT = Path("runs/demo")
EXPERIMENT = "tiny_ps_dfs"
# Cheap fitness for the demo's stages (README "Cheap fitness"): the PS stage scores each candidate
# on 24 anchor documents drawn afresh for each generation (irt's defaults), the strategy that
# kept the holdout within a point of the full-fidelity search on tiny_ps, the same stage, at 10x
# fewer documents (experiments/RESULTS.md, fitness table). The DFS stage, 48 candidates, stays in
# full.
FIDELITY: dict[str, str] = {"ps": "irt"}
PRESET = "tiny"
SKILLS: tuple[str, ...] = ("add", "reverse", "sort")
MEAN = "mean_acc"
EXPERTS: tuple[str, ...] = ("add", "reverse")  # the --merge-only demo's two experts
# Hand-set TIES parameters: keep 70% of each task vector (by magnitude), elect signs, and
# add each expert's surviving entries at weight 0.8 (no normalisation). On the tiny zoo this
# keeps part of both skills and loses part of each: the gap an evolutionary search closes.
WEIGHT = 0.8
DENSITY = 0.7


@dataclass
class TableRow:
    """One model of the results table: its kind (source, hand-set, evolved), name and scores."""

    kind: str
    name: str
    search: dict[str, float] = field(default_factory=dict)
    holdout: dict[str, float] = field(default_factory=dict)
    recipe_yaml: str | None = None


def run_table(run_dir: str | Path, sources: Sequence[str] = ()) -> list[TableRow]:
    """Rows of the results table from a run's ledger: the models named in `sources` (scored by a
    baseline of that name, i.e. a one-model passthrough recipe), the other baselines (hand-set
    merges), then each stage's best by search fitness with its holdout scores."""
    run_dir = Path(run_dir)
    exp = read_experiment(run_dir)
    rows: list[TableRow] = []
    with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
        baselines: dict[str, TableRow] = {}
        for row in ledger.baselines():
            name = row.stage.removeprefix(BASELINE_PREFIX)
            entry = baselines.setdefault(name, TableRow("hand-set", name, recipe_yaml=row.recipe_yaml))
            if row.ok:
                setattr(entry, row.split, {k: float(v) for k, v in row.objectives.items()})
        for name in sources:
            if name in baselines:
                entry = baselines.pop(name)
                entry.kind = "base" if name == exp.models.base else "source"
                rows.append(entry)
        rows.extend(b for name, b in baselines.items() if name not in sources)
        for stage in exp.stages:
            best = stage_best(ledger, stage.name)
            if best is not None:
                rows.append(
                    TableRow(
                        "evolved",
                        f"{exp.name}:{stage.name}",
                        search=dict(best.search),
                        holdout=dict(best.holdout or {}),
                        recipe_yaml=best.recipe_yaml,
                    )
                )
    return rows


def documents_lines(run_dir: str | Path) -> list[str]:
    """Per stage, the search documents it evaluated against what a full-fidelity run of the same
    candidates scores (`evomerge.fidelity.figures`), for beside the table."""
    run_dir = Path(run_dir)
    exp = read_experiment(run_dir)
    lines = []
    with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
        for stage in exp.stages:
            line = documents_line(f"{exp.name}:{stage.name} ({split_spec(stage.fidelity)[0]})", stage_documents(ledger, stage.name))
            if line is not None:
                lines.append(line.strip())
    return ["documents evaluated:", *(f"  {line}" for line in lines)] if lines else []


def format_table(rows: Sequence[TableRow], skills: Sequence[str] = SKILLS, mean: str = MEAN) -> str:
    """A plain-text table: one line per model, search and holdout accuracy per skill and mean."""
    cols = [*skills, "mean"]
    width = max([len(r.name) for r in rows] + [12])

    def cell(scores: dict[str, float], col: str) -> str:
        value = scores.get(mean if col == "mean" else col)
        return f"{value:>7.3f}" if value is not None else f"{'-':>7}"

    head = f"{'kind':<9} {'model':<{width}}  " + " ".join(f"{c:>7}" for c in cols)
    lines = [
        f"{'':<9} {'':<{width}}  {'search':^{8 * len(cols) - 1}}   {'holdout':^{8 * len(cols) - 1}}",
        head + "   " + " ".join(f"{c:>7}" for c in cols),
    ]
    for row in rows:
        search = " ".join(cell(row.search, c) for c in cols)
        holdout = " ".join(cell(row.holdout, c) for c in cols)
        lines.append(f"{row.kind:<9} {row.name:<{width}}  {search}   {holdout}")
    return "\n".join(lines)


def run_demo_search(
    out: Path | None = None,
    echo: Callable[[str], None] = print,
    *,
    experiment: str | Path = EXPERIMENT,
    sets: Sequence[str] = (),
    local: bool = False,
) -> dict[str, Any]:
    """Build the zoo, run the PS -> DFS search, export, report, print the table.

    `out` (default ``runs/demo``) receives ``run/`` (the run directory), ``model/`` (the
    exported best model) and the report under ``run/report/``. `experiment`, `sets` and
    `local` are for tests and quick looks (``--set`` overrides, in-process workers); the
    stages named in `FIDELITY` get that `fidelity:` unless `sets` says otherwise.
    Returns the paths, the table rows and the wall time in seconds.
    """
    start = time.perf_counter()
    out = Path(out) if out is not None else DEFAULT_OUT
    run_dir = out / "run"
    file = find_yaml("experiments", experiment)
    names = {stage.name for stage in load_experiment(file).stages}
    sets = [*(f"stages.{name}.fidelity={value}" for name, value in FIDELITY.items() if name in names), *sets]
    exp = load_experiment(file, sets)
    presets = dict.fromkeys(
        ref[len("zoo:"):].split("/")[0] for ref in [exp.models.base or "", *exp.models.sources] if ref.startswith("zoo:")
    )
    for preset in presets:
        if preset in PRESETS:
            echo(f"zoo {preset}: {build_zoo(preset, progress=echo)}")
    if is_run_dir(run_dir):
        echo(f"carrying on the run in {run_dir}")
        resume_run(run_dir, local=local, echo=echo)
    else:
        start_run(file, out=run_dir, sets=tuple(sets), local=local, echo=echo)
    recipe_path, model_dir = export_run(run_dir, out / "model")
    report = write_report(run_dir)
    sources = [r for r in [exp.models.base, *exp.models.sources] if r]
    rows = run_table(run_dir, sources)
    seconds = time.perf_counter() - start
    echo("")
    echo(f"exact-match accuracy ({', '.join(SKILLS)}; mean = the search fitness), seed {exp.seed}:")
    echo(format_table(rows))
    for line in documents_lines(run_dir):
        echo(line)
    echo("")
    echo(f"best recipe:    {Path(recipe_path).resolve()}")
    echo(f"exported model: {Path(model_dir).resolve()}")
    echo(f"report:         {Path(report).resolve()}")
    echo(f"wall time:      {seconds:.0f} s")
    return {
        "run_dir": run_dir,
        "recipe": Path(recipe_path),
        "model": Path(model_dir),
        "report": Path(report),
        "table": rows,
        "seconds": seconds,
    }


# ---- --merge-only: one hand-set merge, no search -----------------------------------------------


def demo_recipe(zoo_dir: Path, experts: tuple[str, ...] = EXPERTS) -> Recipe:
    """The demo's TIES recipe over the zoo's base and `experts`."""
    return Recipe.parse(
        {
            "merge_method": "ties",
            "base_model": str(zoo_dir / "base"),
            "models": [
                {"model": str(zoo_dir / name), "parameters": {"weight": WEIGHT, "density": DENSITY}}
                for name in experts
            ],
            "parameters": {"normalize": False},
            "dtype": "float32",
            "tokenizer_source": "base",
        }
    )


def run_merge_only(
    out: Path | None = None, echo: Callable[[str], None] = print, *, preset: str = PRESET
) -> dict[str, Any]:
    """``evomerge demo --merge-only``: write and merge the TIES recipe; returns paths and the accuracy table ``{model: {skill: acc}}``.

    `preset` exists for the tests (``test`` builds in seconds); the demo is ``tiny``.
    """
    out = Path(out) if out is not None else DEFAULT_OUT
    zoo_dir = build_zoo(preset, progress=echo)
    recipe = demo_recipe(zoo_dir)
    recipe_path = out / "recipe.yaml"
    atomic_write_text(
        recipe_path,
        f"# evomerge demo: TIES merge of {' and '.join(f'zoo:{preset}/{n}' for n in EXPERTS)}\n"
        + recipe.to_yaml(),
    )
    echo(f"recipe: {recipe_path}")
    model_dir = write_model(recipe, SourcePool(), out / "model")

    table: dict[str, dict[str, float]] = {}
    for name in EXPERTS:
        expert = AutoModelForCausalLM.from_pretrained(zoo_dir / name)
        table[f"zoo:{preset}/{name}"] = holdout_accuracy(expert, EXPERTS)
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    table["ties merge"] = holdout_accuracy(merged, EXPERTS)

    width = max(len(k) for k in table)
    echo("")
    echo(f"{'holdout exact match':<{width}}  " + "  ".join(f"{s:>8}" for s in EXPERTS))
    for name, accs in table.items():
        echo(f"{name:<{width}}  " + "  ".join(f"{accs[s]:>8.3f}" for s in EXPERTS))
    echo("")
    echo(f"merged model: {model_dir.resolve()}")
    return {"zoo": zoo_dir, "recipe": recipe_path, "model": model_dir, "accuracy": table}
