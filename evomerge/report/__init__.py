"""`evomerge report DIR`: plots and an HTML summary of a run, written to DIR/report/.

The page (index.html) and its PNG plots are plain files beside each other, written atomically, so
the report opens offline and a reader never sees a half-written file. It works on a run that is
still going, was stopped or resumed: it shows what the ledger holds so far.

Plots: per stage, every evaluation's fitness and the best so far against evaluations; the Pareto
front of multi-objective stages (`multi_objective: true`; its first two objectives); the best PS recipe's merge
parameters as heat maps over models and layer groups; the best DFS recipe's layer path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from evomerge.fsutil import atomic_write
from evomerge.report import plots
from evomerge.report.data import (
    NotARunError,
    RunView,
    StageView,
    dfs_steps,
    load_run,
    parse_recipe,
    ps_parameter_grids,
    short_ref,
)
from evomerge.report.html import Image, Section, render_page
from evomerge.run.integrity import check_run_files
from evomerge.run.rundir import EXPERIMENT_FILE, LEDGER_FILE, REPORT_DIR
from evomerge.spaces.config import find_space

__all__ = ["NotARunError", "write_report", "render_report"]

_PLOT_PREFIXES = ("fitness_", "pareto_", "ps_", "dfs_")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report of the run in `run_dir` (default: `run_dir/report/`); returns index.html.

    Raises NotARunError (a one-line EvomergeError, exit code 2 in the CLI) when `run_dir` holds
    no run, and a one-line error naming the file when the run is damaged (unreadable experiment,
    checkpoint or ledger, a ledger that lost rows: `evomerge.run.integrity.check_run_files`), before
    anything is written."""
    path = Path(run_dir)
    if path.is_dir() and any((path / name).exists() for name in (EXPERIMENT_FILE, LEDGER_FILE)):
        check_run_files(run_dir)  # a run with a damaged file says which; load_run says what a run directory is
    view = load_run(run_dir)
    return render_report(view, Path(out_dir) if out_dir is not None else Path(run_dir) / REPORT_DIR)


def render_report(view: RunView, out_dir: Path) -> Path:
    """Draw the plots of `view` into `out_dir` and write index.html there (last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(name: str, png: bytes) -> str:
        _publish(out_dir / name, png)
        written.append(name)
        return name

    slugs = {stage.name: f"{i + 1:02d}_{_slug(stage.name)}" for i, stage in enumerate(view.stages)}
    sections: list[Section] = []

    fitness = Section("Fitness against evaluations", [], [])
    for stage in view.stages:
        if not stage.search:
            fitness.notes.append(f"stage {stage.name}: no search evaluations yet")
            continue
        primary = stage.primary_objective
        file = save(f"fitness_{slugs[stage.name]}.png", plots.fitness_plot(stage))
        fitness.images.append(
            Image(file, f"Stage {stage.name}: fitness ({primary}) of each of {len(stage.search)} evaluations, coloured by generation, and the best so far.", f"fitness of stage {stage.name}")
        )
    sections.append(fitness)

    pareto = Section("Pareto fronts", [], [])
    for stage in view.stages:
        names = _multi_objectives(stage)
        if not stage.multi or len(names) < 2 or not stage.ok:
            continue
        file = save(f"pareto_{slugs[stage.name]}.png", plots.pareto_plot(stage, names))
        extra = f" (of {len(names)} objectives: {', '.join(names)})" if len(names) > 2 else ""
        pareto.images.append(Image(file, f"Stage {stage.name}: {names[0]} against {names[1]}{extra}; the red line joins the non-dominated candidates.", f"Pareto front of stage {stage.name}"))
    if pareto.images:
        sections.append(pareto)

    ps = Section("Best parameter-space recipes", [], [])
    dfs = Section("Best data-flow (DFS) layer paths", [], [])
    for stage in view.stages:
        best = stage.best()
        space = find_space(stage.kind)
        shows = space.RECIPE_VIEW if space is not None else None
        if best is None or shows is None:
            continue
        recipe = parse_recipe(best.recipe_yaml)
        if recipe is None:
            (ps if shows == "parameters" else dfs).notes.append(f"stage {stage.name}: the best candidate's recipe could not be read")
            continue
        label = f"stage {stage.name}, candidate {best.candidate_id}, fitness {best.fitness:.4f}"
        if shows == "parameters":
            grids = ps_parameter_grids(recipe)
            file = save(f"ps_{slugs[stage.name]}.png", plots.param_heatmap(grids, f"{recipe.merge_method}: {label}"))
            names = ", ".join(g.name for g in grids) or "none"
            ps.images.append(Image(file, f"Stage {stage.name}: merge parameters ({names}) of the best {recipe.merge_method} recipe per model and layer group.", f"parameters of the best recipe of stage {stage.name}"))
        else:
            steps = dfs_steps(recipe)
            counts = _layer_counts(recipe.model_refs(include_base=False), view.run_dir)
            file = save(f"dfs_{slugs[stage.name]}.png", plots.dfs_path_plot(steps, counts, f"DFS path: {label}"))
            used = ", ".join(dict.fromkeys(short_ref(s["model"]) for s in steps))
            dfs.images.append(Image(file, f"Stage {stage.name}: the {len(steps)} layers of the best path (models: {used}); ×s is the scale of the hidden state entering each step.", f"DFS layer path of stage {stage.name}"))
    for section in (ps, dfs):
        if section.images or section.notes:
            sections.append(section)

    index = _publish(out_dir / "index.html", render_page(view, sections).encode())
    _remove_stale(out_dir, keep=written)
    return index


def _multi_objectives(stage: StageView) -> list[str]:
    """Objectives every successful search row of the stage reports, in declared order."""
    ok = stage.ok
    names = [n for n in stage.directions if ok and all(n in r.objectives for r in ok)]
    return names


def _layer_counts(refs: Sequence[str], run_dir: Path) -> dict[str, int]:
    """Layer counts of sources that are local model directories or `stage:NAME` models the run
    wrote (nothing is resolved or fetched: a report never builds a zoo or touches the hub); the
    others are inferred from the path."""
    counts: dict[str, int] = {}
    for ref in refs:
        if ref.startswith("stage:"):
            config = run_dir / "stages" / ref[len("stage:"):] / "best_model" / "config.json"
        else:
            config = Path(ref).expanduser() / "config.json"
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            counts[ref] = 0
            continue
        counts[ref] = int(data.get("num_hidden_layers") or data.get("n_layer") or 0)
    return counts


def _publish(path: Path, data: bytes) -> Path:
    """Write atomically with the permissions of an ordinary new file (the temp file of an atomic
    write is private, 0600; a report is meant to be read by others, e.g. served over HTTP)."""
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        tmp.chmod(0o666 & ~umask)

    return atomic_write(path, write)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "stage"


def _remove_stale(out_dir: Path, keep: Sequence[str]) -> None:
    """Drop plots of an earlier report that this one no longer shows (e.g. a renamed stage)."""
    for path in out_dir.glob("*.png"):
        if path.name.startswith(_PLOT_PREFIXES) and path.name not in keep:
            path.unlink(missing_ok=True)
