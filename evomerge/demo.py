"""The interim main job of ``make run``: build the tiny zoo, TIES-merge two experts, report.

Steps: build (or reuse) the ``tiny`` zoo; write a TIES recipe over its base and the
``add`` and ``reverse`` experts to ``<out>/recipe.yaml``; merge it with the engine into
``<out>/model``; load that with ``AutoModelForCausalLM`` and print each expert's and the
merge's exact-match holdout accuracy on the two skills (the lm-eval ``acc`` of the
``zoo_add``/``zoo_reverse`` tasks), and where the merged model is.

The recipe names the zoo models by their directories, so it is a plain mergekit config
(``mergekit-yaml <out>/recipe.yaml DIR`` accepts it); ``zoo:tiny/NAME`` would resolve to the
same directories inside evomerge.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.fsutil import atomic_write_text
from evomerge.recipe import Recipe

DEFAULT_OUT = Path("runs/demo")
PRESET = "tiny"
EXPERTS: tuple[str, ...] = ("add", "reverse")
# Hand-set TIES parameters: keep 70% of each task vector (by magnitude), elect signs, and
# add each expert's surviving entries at weight 0.8 (no normalisation). On the tiny zoo this
# keeps part of both skills and loses part of each: the gap an evolutionary search closes.
WEIGHT = 0.8
DENSITY = 0.7


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


def run_demo(
    out: Path | None = None, echo: Callable[[str], None] = print, *, preset: str = PRESET
) -> dict[str, Any]:
    """Run the demo; returns paths and the accuracy table ``{model: {skill: acc}}``.

    `preset` exists for the tests (``test`` builds in seconds); the demo is ``tiny``.
    """
    from transformers import AutoModelForCausalLM

    from evomerge.merge.sources import SourcePool
    from evomerge.merge.writer import write_model
    from evomerge.zoo import build_zoo
    from evomerge.zoo.build import holdout_accuracy

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
