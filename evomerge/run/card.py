"""The model card of an exported merge, ready for the Hugging Face Hub.

Its YAML front matter is Hub metadata: `base_model` lists the models the merge descends from by
the references the experiment wrote (a Hub id, `zoo:NAME`, or a path as written, relative to the
experiment file; `stage:NAME` stands for that stage's own models), with `base_model_relation:
merge`, `library_name: transformers` and `tags` (`merge`, `evomerge`, `mergekit` and the merge
method). The body names each source the same way with its content hash, then the search (per
stage: optimizer, budget, evaluations, documents scored, seed), the scores and the recipe, its
model references as written too (`mergekit_config.yml` beside it keeps the local directories).

The references as written are kept at the start of a run in `<run>/references.json` (resolved
reference -> as written; `record_references`), since the frozen experiment holds absolute paths.
A run without it (started before it existed) shows the frozen references.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.fsutil import atomic_write_text
from evomerge.recipe import Recipe

REFERENCES_FILE = "references.json"
_RUN_ONLY = ("stage:", "archive:")


def _model_refs(exp: Any) -> list[str | None]:
    """Every model reference of an experiment in a fixed order (None where one is not given)."""
    refs: list[str | None] = [exp.models.base, *exp.models.sources]
    for stage in exp.stages:
        refs += [stage.base, *(stage.models or [])]
    return refs


def written_references(written: Any, resolved: Any) -> dict[str, str]:
    """Resolved reference -> as the experiment wrote it, for those that resolution changed
    (relative directories made absolute); `written` is the experiment before
    `resolve_experiment`, `resolved` after."""
    pairs = zip(_model_refs(written), _model_refs(resolved), strict=False)
    return {new: old for old, new in pairs if old is not None and new is not None and old != new}


def record_references(run_dir: str | Path, references: dict[str, str]) -> None:
    atomic_write_text(Path(run_dir) / REFERENCES_FILE, json.dumps(references, indent=2, sort_keys=True) + "\n")


def read_references(run_dir: str | Path) -> dict[str, str]:
    try:
        data = json.loads((Path(run_dir) / REFERENCES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


@dataclass(frozen=True)
class StageSearch:
    """One stage's search, as the card shows it."""

    name: str
    optimizer: str
    budget: str
    evaluations: int
    documents: int
    seed: int


def search_summary(exp: Any, ledger: Any) -> list[StageSearch]:
    """Per stage: optimizer and options, budget, search evaluations, documents scored (search and
    holdout rows) and the optimizer's seed (the experiment's seed + the stage's index)."""
    out = []
    for index, stage in enumerate(exp.stages):
        options = ", ".join(f"{k}: {v}" for k, v in stage.optimizer.options.items() if k != "initial")
        budget = [f"{stage.budget.evaluations} evaluations"] if stage.budget.evaluations else []
        budget += [f"{stage.budget.seconds:g} s"] if stage.budget.seconds else []
        rows = ledger.rows(stage=stage.name)
        out.append(
            StageSearch(
                name=stage.name,
                optimizer=f"{stage.optimizer.name} ({options})" if options else stage.optimizer.name,
                budget=" or ".join(budget),
                evaluations=sum(1 for r in rows if r.split == "search"),
                documents=sum(r.documents_evaluated for r in rows),
                seed=exp.seed + index,
            )
        )
    return out


def base_models(exp: Any, stage_name: str, written: dict[str, str]) -> list[str]:
    """The models a stage's best descends from, as written: its models and base, a `stage:NAME`
    replaced by that stage's (recursively), in order, each once."""
    out: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        stage = exp.stage(name)
        base = exp.stage_base(stage)
        for ref in [*([base] if base else []), *exp.stage_models(stage)]:
            if ref.startswith("stage:"):
                visit(ref[len("stage:"):])
            elif not ref.startswith(_RUN_ONLY):
                out.append(written.get(ref, ref))

    visit(stage_name)
    return list(dict.fromkeys(out))


def hub_card(recipe: Recipe, hashes: dict[str, str], *, best: Any, exp: Any, search: list[StageSearch], written: dict[str, str]) -> str:
    """The card of a merge (module docstring): `recipe` is what was merged (its local
    directories named in its `evomerge.sources` block when it replaced run references),
    `hashes` its sources' content hashes, `best` the run's best, `search` `search_summary`,
    `written` `read_references`."""
    block = recipe.evomerge.model_dump() if recipe.evomerge is not None else {}
    origin = {str(path): str(ref) for path, ref in (block.get("sources") or {}).items()}

    def name(ref: str) -> str:
        ref = origin.get(ref, ref)
        return written.get(ref, ref)

    meta = {
        "base_model": base_models(exp, best.stage, written),
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": list(dict.fromkeys(["merge", "evomerge", "mergekit", recipe.merge_method])),
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# {exp.name}",
        "",
        f"A merge of {len(hashes)} models with the `{recipe.merge_method}` method, found by evolutionary search with evomerge",
        f"(experiment `{exp.name}`, seed {exp.seed}; stage `{best.stage}`, candidate {best.candidate_id}).",
        "",
        "## Sources",
        "",
        "| model | content hash |",
        "|---|---|",
    ]
    lines += [f"| `{name(ref)}` | `{digest}` |" for ref, digest in hashes.items()]
    lines += ["", "## Search", "", "| stage | optimizer | budget | evaluations | documents scored | seed |", "|---|---|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.optimizer} | {s.budget} | {s.evaluations} | {s.documents} | {s.seed} |" for s in search]
    scores = {f"search/{k}": v for k, v in best.search.items()}
    scores.update({f"holdout/{k}": v for k, v in (best.holdout or {}).items()})
    if scores:
        lines += ["", "## Scores", "", "| split / objective | score |", "|---|---|"]
        lines += [f"| {key} | {float(value):.4f} |" for key, value in scores.items()]
    lines += ["", "## Recipe (mergekit configuration)", "", "```yaml", _written_recipe(recipe, name).rstrip(), "```", ""]
    return "\n".join(lines)


def _written_recipe(recipe: Recipe, name: Any) -> str:
    """The recipe's YAML with its model references as written, without the local paths of its
    `evomerge` block (the run directory, the local directories it replaced)."""
    refs = set(recipe.model_refs())

    def swap(value: Any) -> Any:
        if isinstance(value, str):
            return name(value) if value in refs else value
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, dict):
            return {swap(k) if isinstance(k, str) else k: swap(v) for k, v in value.items()}
        return value

    data = recipe.to_dict()
    block = dict(data.pop("evomerge", None) or {})
    block.pop("sources", None)
    if isinstance(block.get("run"), dict):
        block["run"] = {k: v for k, v in block["run"].items() if k != "dir"}
    data = swap(data)
    if block:
        data["evomerge"] = swap(block)
    return yaml.safe_dump(data, sort_keys=False)
