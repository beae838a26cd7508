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

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from evomerge.config import read_experiment
from evomerge.errors import ConfigError
from evomerge.fsutil import atomic_write_text
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.modeldir import check_target
from evomerge.models import load_hint
from evomerge.recipe import Recipe
from evomerge.run.card import hub_card, read_references, search_summary
from evomerge.run.integrity import check_run_dir
from evomerge.run.ledger import Ledger
from evomerge.run.rundir import (
    ARCHIVE_DIR,
    LEDGER_FILE,
    STAGE_MODEL,
    STAGES_DIR,
    RunDir,
    is_run_dir,
)
from evomerge.run.stages import Best, run_best, write_json

MODEL_REF_PREFIXES = ("stage:", "archive:", "zoo:")


def run_sources(run_dir: Path, allow_pickle: bool = False) -> SourcePool:
    """A source pool that knows the run's own models (stage best models, M2N2 archive members)."""
    pool = SourcePool(allow_pickle=allow_pickle)
    for best in sorted((run_dir / STAGES_DIR).glob(f"*/{STAGE_MODEL}")):
        pool.register(f"stage:{best.parent.name}", best)
    for member in sorted((run_dir / ARCHIVE_DIR).glob("*/*")):
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
        search = search_summary(exp, ledger)
    if best is None:
        raise ConfigError("the run has no successful evaluation yet; nothing to export", file=str(run_dir))
    pool = run_sources(run_dir, exp.allow_pickle)
    # archive ids are per stage: the best's own stage wins
    for member in sorted(RunDir(run_dir).archive(best.stage).glob("*")):
        if member.name.isdigit():
            pool.register(f"archive:{member.name}", member)
    recipe = write_best(run_dir, best, pool)
    model_dir = None
    if out is not None:
        card = partial(hub_card, best=best, exp=exp, search=search, written=read_references(run_dir))
        model_dir = write_best_model(best, pool, out, recipe=recipe, card=card, card_extra=selection_note(best), force=force)
    return RunDir(run_dir).best / "recipe.yaml", model_dir


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


# ---- best/ and model cards ---------------------------------------------------------------------


def _flat_scores(best: Best) -> dict[str, float]:
    scores = {f"search/{k}": float(v) for k, v in best.search.items()}
    scores.update({f"holdout/{k}": float(v) for k, v in (best.holdout or {}).items()})
    return scores


def portable_recipe(recipe: Recipe, pool: SourcePool) -> Recipe:
    """The recipe with run-internal references (`stage:`, `archive:`, `zoo:`) replaced by the
    local directories they stand for, so `mergekit-yaml` can run it; the original names are
    kept in the `evomerge.sources` block."""
    names: dict[str, str] = {}
    for ref in recipe.model_refs():
        if ref.startswith(MODEL_REF_PREFIXES):
            names[ref] = str(pool.resolve(ref))

    def swap(value: Any) -> Any:
        if isinstance(value, str):
            return names.get(value, value)
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, dict):
            return {k: (v if k == "evomerge" else swap(v)) for k, v in value.items()}
        return value

    data = swap(recipe.to_dict())
    out = Recipe.parse(data)
    return out.with_evomerge(sources={path: ref for ref, path in names.items()}) if names else out


def best_tensors(best: Best, pool: SourcePool) -> tuple[Path, dict[str, Any]] | None:
    """A weights-space best: (its template's directory, its tensors, rebuilt from the genome its
    ledger row keeps); None for a merge recipe."""
    from evomerge.run.weights import (  # imports torch: only for a weights-space best
        GENOME_PREFIX,
        is_weights_recipe,
        template_of,
        tensors_digest,
        tensors_from_genome,
    )

    recipe = Recipe.from_string(best.recipe_yaml)
    if not is_weights_recipe(recipe):
        return None
    if best.genome is None:
        raise ConfigError(f"the ledger row of candidate {best.candidate_id} keeps no genome; its weights are lost", field="genome")
    source = pool.get(template_of(recipe))
    tensors = tensors_from_genome(best.genome, source)
    if GENOME_PREFIX + tensors_digest(tensors) != recipe.model_refs()[0]:
        raise ConfigError(f"the genome of candidate {best.candidate_id} does not rebuild the weights it scored (template '{template_of(recipe)}' changed?)", field="genome")
    return source.path, tensors


def write_best_model(
    best: Best,
    pool: SourcePool,
    out: str | Path,
    *,
    recipe: Recipe | None = None,
    card: Callable[[Recipe, dict[str, str]], str] | None = None,
    card_extra: str = "",
    force: bool = False,
) -> Path:
    """The best's model as a directory: the merge written by the engine (of `recipe`, default
    the best's own), or for a weights-space best its evolved tensors beside the template's
    config.json; the README (model card) says which, with the scores and, in `card_extra`, how
    the best was chosen (`card`: the merge's card from its recipe and source hashes, default
    the engine's). An existing `out` is treated as `evomerge.modeldir` says (`force`)."""
    weights = best_tensors(best, pool)
    if weights is not None:
        from evomerge.run.weights import write_weights_model  # imports torch

        template_dir, tensors = weights
        return write_weights_model(tensors, template_dir, out, weights_card(best, template_dir) + card_extra, force=force)
    recipe = recipe or Recipe.from_string(best.recipe_yaml)
    return write_model(recipe, pool, out, scores=_flat_scores(best), card=card, card_extra=card_extra, force=force)


def weights_card(best: Best, template_dir: Path) -> str:
    """Model card of a weights-space best: evolved raw weights, not a merge of sources."""
    recipe = Recipe.from_string(best.recipe_yaml)
    block = (recipe.evomerge.model_dump() if recipe.evomerge else {}).get("weights", {})
    config = json.loads((Path(template_dir) / "config.json").read_text())
    arch = config.get("architecture") or ", ".join(config.get("architectures") or []) or config.get("model_type", "?")
    load = load_hint(config)
    lines = [
        "---",
        "tags: [evomerge, evolved-weights]",
        "---",
        f"# Evolved {arch} (raw weights, not a merge)",
        "",
        f"Made by evomerge from a `weights` search space: the genome is this model's {block.get('genes', '?')} raw",
        f"parameters, evolved by {best.optimizer or 'the stage optimizer'} in the architecture of",
        f"the template model `{block.get('template', '?')}` (its `config.json` is copied here; its weights are not used",
        "unless the experiment started from them). Nothing here was trained by gradient descent during the search.",
        "",
        f"Load it with {load}.",
        "",
        f"- stage: `{best.stage}`, candidate {best.candidate_id}, generation {best.generation}",
        f"- weights id: `{recipe.model_refs()[0]}` (sha256 of the tensors)",
    ]
    scores = _flat_scores(best)
    if scores:
        lines += ["", "## Scores", "", "| split / objective | score |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
    return "\n".join(lines) + "\n"


def selection_note(best: Best) -> str:
    """The model card's section on which candidate this is and why."""
    holdout = "-" if best.holdout_score is None else f"{best.holdout_score:.4f}"
    lines = [
        "",
        "## Selection",
        "",
        f"Stage `{best.stage}`, candidate {best.candidate_id}: search fitness {best.score:.4f}, holdout {holdout}.",
    ]
    if best.selection:
        lines.append(f"Chosen as {best.selection}.")
    return "\n".join(lines) + "\n"


def write_best(run_dir: Path, best: Best, pool: SourcePool) -> Recipe:
    """`best/recipe.yaml` (a mergekit config) and `best/scores.json` for the run's best so far.
    A weights-space best is also written to `best/model/` (its recipe is a passthrough of that
    directory: the weights exist nowhere else)."""
    run_dir = Path(run_dir)
    recipe = Recipe.from_string(best.recipe_yaml)
    weights = best_tensors(best, pool)
    if weights is not None:
        model_dir = write_best_model(best, pool, RunDir(run_dir).best / "model", card_extra=selection_note(best))
        block = (recipe.evomerge.model_dump() if recipe.evomerge else {}).get("weights", {})
        recipe = Recipe.parse({"merge_method": "passthrough", "models": [{"model": str(model_dir)}]}).with_evomerge(
            weights=block, sources={str(model_dir): recipe.model_refs()[0]}
        )
    else:
        recipe = portable_recipe(recipe, pool)
    exp = read_experiment(run_dir)
    recipe = recipe.with_evomerge(
        run={"name": exp.name, "seed": exp.seed, "dir": str(run_dir.resolve())},
        stage=best.stage,
        candidate_id=best.candidate_id,
        recipe_hash=best.recipe_hash,
        scores={"search": best.search, "holdout": best.holdout},
        **({"selection": best.selection} if best.selection else {}),
        **({"lineage": best.lineage} if best.lineage else {}),
    )
    atomic_write_text(RunDir(run_dir).best / "recipe.yaml", recipe.to_yaml())
    write_json(RunDir(run_dir).best / "scores.json", best.scores())
    return recipe


def run_files(run_dir: str | Path, best: Best | None) -> Callable[[], dict[str, str]] | None:
    """What a tracker logs when a run ends (`evomerge.tracking`): the best's `recipe.yaml` (as
    written to `best/`) and `README.md`, the model card `export --out` writes. A function (made
    on the tracking thread: it hashes the sources); None without a best."""
    if best is None:
        return None
    run_dir = Path(run_dir)

    def files() -> dict[str, str]:
        folder = RunDir(run_dir).best
        recipe = Recipe.from_yaml(folder / "recipe.yaml")
        refs = recipe.model_refs()
        if len(refs) == 1 and Path(refs[0]).resolve() == (folder / "model").resolve():  # a weights-space best: its card is written
            return {"recipe.yaml": recipe.to_yaml(), "README.md": (folder / "model" / "README.md").read_text()}
        exp = read_experiment(run_dir)
        with Ledger.open(run_dir / LEDGER_FILE, readonly=True) as ledger:
            search = search_summary(exp, ledger)
        pool = SourcePool(allow_pickle=exp.allow_pickle)
        hashes = {ref: pool.get(ref).content_hash() for ref in recipe.model_refs()}
        card = hub_card(recipe.with_evomerge(source_hashes=hashes), hashes, best=best, exp=exp, search=search, written=read_references(run_dir))
        return {"recipe.yaml": recipe.to_yaml(), "README.md": card + selection_note(best)}

    return files
