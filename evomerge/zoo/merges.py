"""How hand-set merges of the zoo's experts do: the figures behind the zoo's design.

For every pair of experts and for all three, this merges them with the engine (mergekit
semantics, so the numbers carry over to recipes) and prints the exact-match holdout
accuracy on each expert's skill, for the hand-set merges an evolutionary search has to beat
(task arithmetic with lambda 1 and 0.5, TIES and DARE-TIES at density 0.5) and for a few
per-model and per-layer weightings that show there is something better to find (for a
preset whose experts own layers, each expert with only its own layers' delta, and the
layer-wise composite: each expert weight 1 on its own layers and 0 elsewhere)::

    python -m evomerge.zoo.merges --preset tiny

Per-layer weights are mergekit gradient lists (one value per layer; the embeddings take the
first value and the final norm and head the last).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoModelForCausalLM

from evomerge.merge.engine import load_into_model
from evomerge.merge.sources import SourcePool
from evomerge.merge.specs import get_spec
from evomerge.recipe import Recipe
from evomerge.zoo import build_zoo, read_manifest
from evomerge.zoo.build import holdout_accuracy

Weight = float | list[float]


def merge_recipe(
    zoo_dir: Path,
    method: str,
    experts: Sequence[str],
    weights: Sequence[Weight],
    density: float | None = None,
    seed: int = 0,
) -> Recipe:
    """A mergekit recipe over the zoo's base and `experts` (absolute paths)."""
    models = []
    for name, weight in zip(experts, weights, strict=True):
        params: dict[str, Any] = {"weight": weight}
        if density is not None:
            params["density"] = density
        models.append({"model": str(zoo_dir / name), "parameters": params})
    data: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(zoo_dir / "base"),
        "models": models,
        "dtype": "float32",
    }
    if get_spec(method).random:
        data["evomerge"] = {"seed": seed}
    return Recipe.parse(data)


def hand_set(zoo_dir: Path, experts: Sequence[str]) -> dict[str, Recipe]:
    """The baselines a search must beat: TA lambda 1 and 0.5, TIES and DARE-TIES at density 0.5."""
    k = len(experts)
    return {
        "task_arithmetic lambda=1": merge_recipe(zoo_dir, "task_arithmetic", experts, [1.0] * k),
        "task_arithmetic lambda=0.5": merge_recipe(zoo_dir, "task_arithmetic", experts, [0.5] * k),
        "ties density=0.5": merge_recipe(zoo_dir, "ties", experts, [1.0] * k, 0.5),
        "dare_ties density=0.5": merge_recipe(zoo_dir, "dare_ties", experts, [1.0] * k, 0.5),
    }


def table(
    zoo_dir: Path,
    groups: Sequence[Sequence[str]],
    extra: Callable[[Path, Sequence[str]], dict[str, Recipe]] | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Holdout accuracy of each merge of each group; prints a row per merge."""
    manifest = read_manifest(zoo_dir)
    skill_of = {name: m["skill"] for name, m in manifest["models"].items()}
    pool = SourcePool(resident=True)
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    rows = []
    for group in groups:
        skills = [skill_of[n] for n in group]
        own = {skill_of[n]: manifest["models"][n]["holdout_accuracy"][skill_of[n]] for n in group}
        echo(f"\n{' + '.join(group)}   (experts alone: "
             + ", ".join(f"{s} {a:.3f}" for s, a in own.items()) + ")")
        recipes = hand_set(zoo_dir, group)
        if extra is not None:
            recipes.update(extra(zoo_dir, group))
        for label, recipe in recipes.items():
            load_into_model(model, recipe, pool)
            acc = holdout_accuracy(model, skills)
            mean = float(np.mean(list(acc.values())))
            kept = min(acc[s] / own[s] for s in skills if own[s] > 0)
            rows.append({"models": list(group), "merge": label, "holdout_accuracy": acc,
                         "mean": round(mean, 4), "min_fraction_of_expert": round(kept, 3)})
            echo(f"  {label:<34}" + "".join(f"{s} {acc[s]:.3f}  " for s in skills)
                 + f"mean {mean:.3f}  worst kept {kept:.2f}")
    return rows


def own_layers(zoo_dir: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Each expert's own layers (from the preset's spec; empty when it has none) and the depth."""
    manifest = read_manifest(zoo_dir)
    own = {e["name"]: tuple(e.get("own_layers") or ()) for e in manifest["spec"].get("experts", [])}
    config = json.loads((zoo_dir / "base" / "config.json").read_text())
    return own, int(config["num_hidden_layers"])


def layer_weights(layers: Sequence[int], depth: int) -> list[float]:
    """A per-layer gradient list: 1 on `layers`, 0 elsewhere."""
    return [1.0 if i in layers else 0.0 for i in range(depth)]


def probes(zoo_dir: Path, experts: Sequence[str]) -> dict[str, Recipe]:
    """Non-uniform task-arithmetic weightings: per model, and the layer-wise composite (each
    expert weight 1 on its own layers, 0 elsewhere), the optimum a layer-wise search aims at."""
    k = len(experts)
    out = {f"task_arithmetic weights {w}": merge_recipe(zoo_dir, "task_arithmetic", experts, [w] * k)
           for w in (0.7, 0.8, 0.9)}
    own, depth = own_layers(zoo_dir)
    if all(own.get(e) for e in experts):
        out["layer-wise composite"] = merge_recipe(
            zoo_dir, "task_arithmetic", experts, [layer_weights(own[e], depth) for e in experts]
        )
    return out


def own_layers_only(zoo_dir: Path, echo: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Holdout accuracy of each expert with only its own layers' delta (the rest reset to the base)."""
    manifest = read_manifest(zoo_dir)
    own, depth = own_layers(zoo_dir)
    pool = SourcePool(resident=True)
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base")
    rows = {}
    for name, layers in own.items():
        if not layers:
            continue
        skill = manifest["models"][name]["skill"]
        load_into_model(model, merge_recipe(zoo_dir, "task_arithmetic", [name], [layer_weights(layers, depth)]), pool)
        rows[name] = holdout_accuracy(model, [skill])
        full = manifest["models"][name]["holdout_accuracy"][skill]
        echo(f"{name} with only layers {list(layers)}: {skill} {rows[name][skill]:.3f} (whole expert {full:.3f})")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args(argv)
    zoo_dir = build_zoo(args.preset, progress=print)
    names = [n for n, m in read_manifest(zoo_dir)["models"].items() if m.get("skill")]
    groups = [list(p) for p in itertools.combinations(names, 2)] + [names]
    own_layers_only(zoo_dir)
    table(zoo_dir, groups, probes)


if __name__ == "__main__":
    main()
