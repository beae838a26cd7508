"""Recipes read and write mergekit's YAML language with mergekit's parameter rules."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe, evaluate_setting, resolve_global_param, resolve_model_param

TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.5}
  - model: b
    parameters:
      weight: [0.0, 1.0]
      density:
        - {filter: self_attn, value: 0.2}
        - {value: 0.9}
parameters: {normalize: false, density: 0.7}
dtype: float32
"""


def test_round_trip_keeps_everything_and_the_hash() -> None:
    recipe = Recipe.from_string(TIES)
    again = Recipe.from_string(recipe.to_yaml())
    assert again == recipe
    assert again.content_hash() == recipe.content_hash()
    assert recipe.model_refs() == ["base", "a", "b"]


def test_hash_changes_with_what_changes_tensors_only() -> None:
    recipe = Recipe.from_string(TIES)
    reseeded = recipe.with_evomerge(seed=7)
    scored = recipe.with_evomerge(scores={"acc": 0.9})
    assert reseeded.content_hash() != recipe.content_hash()
    assert scored.content_hash() == recipe.content_hash()
    nudged = Recipe.from_string(TIES.replace("0.5, density: 0.5", "0.51, density: 0.5"))
    assert nudged.content_hash() != recipe.content_hash()


def test_gradient_interpolates_like_mergekit() -> None:
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    # three anchors: t=0.75 is halfway between the 2nd and 3rd
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4, 0.6], "x", 1.0) == pytest.approx(0.6)
    assert evaluate_setting(0.3, "x", 0.9) == 0.3


def test_filters_take_the_first_match_and_fall_back() -> None:
    setting = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.0) == 0.2
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.norm.weight", 1.0) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 1.0) is None


def test_precedence_model_over_top_level() -> None:
    recipe = Recipe.from_string(TIES)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert resolve_model_param(recipe, "density", "a", q, 0.0) == 0.5
    assert resolve_model_param(recipe, "density", "b", q, 0.0) == 0.2
    assert resolve_model_param(recipe, "density", "b", "model.norm.weight", 1.0) == 0.9
    assert resolve_model_param(recipe, "weight", "b", q, 0.5) == pytest.approx(0.5)
    assert resolve_global_param(recipe, "normalize", q, 0.0) is False
    assert resolve_model_param(recipe, "epsilon", "a", q, 0.0) is None


def test_slice_source_parameters_win() -> None:
    recipe = Recipe.from_string(
        """
merge_method: linear
slices:
  - sources:
      - {model: a, layer_range: [0, 2], parameters: {weight: 0.9}}
      - {model: b, layer_range: [1, 3]}
    parameters: {weight: 0.4}
models: null
parameters: {weight: 0.1}
"""
    )
    out_slice = recipe.slices[0]
    assert resolve_model_param(recipe, "weight", "a", "t", 0.0, out_slice) == 0.9
    assert resolve_model_param(recipe, "weight", "b", "t", 0.0, out_slice) == 0.4


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("merge_method: tie\nbase_model: b\nmodels: [{model: a}]", "merge_method", ["valid:", "ties"]),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {wieght: 1}}]", "models[0].parameters.wieght", ["valid:", "weight", "density"]),
        ("merge_method: ties\nmodels: [{model: a}]", "base_model", ["needs a base_model"]),
        ("merge_method: linear\nmodels: [{model: a}]\nslices: []", "models", ["exactly one"]),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: float8", "dtype", ["bfloat16"]),
        ("merge_method: linear\nmodels: [{model: a}]\nmodel_stock: 1", "model_stock", ["unknown field"]),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]",
            "slices[0].sources",
            ["differ in length"],
        ),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {value: [1, x]}}}]", "models[0].parameters.weight.value[1]", ["gradient"]),
    ],
)
def test_bad_recipes_name_file_field_and_valid_values(text: str, field: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Recipe.from_string(text, file="r.yaml")
    message = str(caught.value)
    assert message.startswith(f"r.yaml: {field}: "), message
    assert "\n" not in message
    for word in words:
        assert word in message
