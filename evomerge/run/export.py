"""`evomerge export DIR [--out MODEL_DIR]`: the run's best recipe, and optionally the merged model.

Which candidate: the run's best (`evomerge.run.stages.run_best`): over all stages by search
fitness when they share the evaluator (PS then DFS on one task: the DFS stage does not always beat
the PS stage it started from), otherwise the last stage's best; `best/scores.json`, the recipe's
`evomerge.selection` and the model card say which stage it came from and why.

`best/recipe.yaml` is a mergekit configuration: references that only mean something inside
evomerge (`zoo:`, `stage:NAME`, `archive:ID`) are replaced by the local directories they stand
for (the original names are kept in its `evomerge.sources` block), and its `evomerge` block
records the stage, candidate, recipe hash and search/holdout scores. With `--out` the merged
model is written as a Hugging Face directory whose README (model card) lists the sources with
their content hashes, the method and parameters (the recipe), the seed and the scores.

A weights-space best (evolved raw weights, e.g. the digits M2N2 set-ups) is no merge: its
tensors are written with the template model's `config.json` to `best/model/` (and to `--out`),
with a model card saying so, and `best/recipe.yaml` is a passthrough of `best/model/`.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.merge.sources import SourcePool
from evomerge.modeldir import check_target
from evomerge.run.driver import (
    selection_note,
    write_best,
    write_best_model,
)
from evomerge.run.integrity import check_run_dir
from evomerge.run.ledger import Ledger
from evomerge.run.rundir import LEDGER_FILE, is_run_dir
from evomerge.run.stages import run_best


def run_sources(run_dir: Path, allow_pickle: bool = False) -> SourcePool:
    """A source pool that knows the run's own models (stage best models, M2N2 archive members)."""
    pool = SourcePool(allow_pickle=allow_pickle)
    for best in sorted((run_dir / "stages").glob("*/best_model")):
        pool.register(f"stage:{best.parent.name}", best)
    for member in sorted((run_dir / "archive").glob("*/*")):
        if member.name.isdigit():
            pool.register(f"archive:{member.name}", member)
    return pool


def export_run(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False) -> tuple[Path, Path | None]:
    """Write `best/recipe.yaml` (+ `best/scores.json`) and, with `out`, the merged model there.
    Returns (recipe path, model directory or None). An `out` that is, holds or lies inside the
    run directory is refused, and so is a non-empty one evomerge did not write unless `force`
    (`evomerge.modeldir`), before anything is written."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError("not a run directory (it needs experiment.yaml and ledger.sqlite)", file=str(run_dir))
    if out is not None:
        out = Path(out).resolve()
        check_out_outside_run(out, run_dir)
        check_target(out, force)
    exp, _ = check_run_dir(run_dir)  # a damaged run, or a ledger that lost rows, is refused
    with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
        best = run_best(exp.stages, ledger)
    if best is None:
        raise ConfigError("the run has no successful evaluation yet; nothing to export", file=str(run_dir))
    pool = run_sources(run_dir, exp.allow_pickle)
    # archive ids are per stage: the best's own stage wins
    for member in sorted((run_dir / "archive" / best["stage"]).glob("*")):
        if member.name.isdigit():
            pool.register(f"archive:{member.name}", member)
    recipe = write_best(run_dir, best, pool)
    model_dir = None
    if out is not None:
        model_dir = write_best_model(best, pool, out, recipe=recipe, card_extra=selection_note(best), force=force)
    return run_dir / "best" / "recipe.yaml", model_dir


def check_out_outside_run(out: Path, run_dir: Path) -> None:
    """Refuse an export target that is the run directory, lies inside it or contains it."""
    out, run = Path(out).resolve(), Path(run_dir).resolve()
    if out == run:
        where = "is the run directory itself"
    elif out.is_relative_to(run):
        where = f"is inside the run directory '{run}'"
    elif run.is_relative_to(out):
        where = f"contains the run directory '{run}'"
    else:
        return
    raise ConfigError(f"{where}; export the model to a directory outside the run", file=str(out))
