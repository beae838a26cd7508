"""M2N2 model mode in the recipe language: a child is a mergekit `slerp` recipe over two archive
members whose `t` is a `{filter, value}` list - `w` for the tensors before the split point and
`1 - w` after it.

The split runs over *split units* in checkpoint order: the embeddings (everything before the layer
stack) are one unit, each numbered layer is one unit, and the final norm / head is one unit.
mergekit matches a filter as a substring of the tensor name and takes the first condition that
matches, so the compiled list is checked against every tensor name; when the compact form (one
condition per layer, a catch-all for the rest) would be ambiguous, every tensor is listed by its
full name, longest names first (a longer name cannot be a substring of a shorter one, so that
order is always exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.merge.layout import place_of
from evomerge.recipe import Recipe, evaluate_setting


def split_units(tensor_names: Sequence[str]) -> list[list[str]]:
    """Tensor names grouped into the units a split point falls between, in model order."""
    pre: list[str] = []
    post: list[str] = []
    layers: dict[tuple[str, int], list[str]] = {}
    for name in tensor_names:
        place = place_of(name)
        if place.kind == "layer":
            layers.setdefault((place.prefix, place.index), []).append(name)
        elif place.kind == "pre":
            pre.append(name)
        else:
            post.append(name)
    ordered = [layers[key] for key in sorted(layers, key=lambda k: (k[1], k[0]))]
    return [unit for unit in ([pre] if pre else []) + ordered + ([post] if post else []) if unit]


def _unit_filter(unit: list[str]) -> list[str]:
    """Filters that select one unit: its layer prefix for a layer, else its full names."""
    place = place_of(unit[0])
    if place.kind == "layer":
        return [f"{place.prefix}.{place.index}."]
    return list(unit)


def compile_split_t(units: Sequence[Sequence[str]], split: int, w: float) -> Any:
    """The `t` parameter: `w` for units before `split`, `1 - w` from it on (exact for every name)."""
    names = [n for unit in units for n in unit]
    wanted = {n: (w if i < split else 1.0 - w) for i, unit in enumerate(units) for n in unit}
    if split <= 0:
        return 1.0 - w
    if split >= len(units):
        return w
    compact = [{"filter": f, "value": w} for unit in units[:split] for f in _unit_filter(list(unit))]
    compact.append({"value": 1.0 - w})
    if all(evaluate_setting(compact, n, 0.0) == wanted[n] for n in names):
        return compact
    explicit = [{"filter": n, "value": wanted[n]} for n in sorted(names, key=len, reverse=True)]
    assert all(evaluate_setting(explicit, n, 0.0) == wanted[n] for n in names)
    return explicit


def archive_ref(member_id: int) -> str:
    return f"archive:{member_id}"


def child_recipe(parent_a: int, parent_b: int, units: Sequence[Sequence[str]], split: int | None, w: float) -> Recipe:
    """SLERP of member A (t = 0) toward member B (t = 1), with the split-point schedule of t."""
    t = w if split is None else compile_split_t(units, split, w)
    a, b = archive_ref(parent_a), archive_ref(parent_b)
    data = {
        "merge_method": "slerp",
        "base_model": a,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"t": t},
        "evomerge": {"m2n2": {"parents": [parent_a, parent_b], "w": w, "split": split}},
    }
    return Recipe.model_validate(data)


def initial_recipe(ref: str) -> Recipe:
    """An initial archive member: a source model as it is."""
    return Recipe.model_validate(
        {"merge_method": "passthrough", "models": [{"model": ref}], "evomerge": {"m2n2": {"init": ref}}}
    )
