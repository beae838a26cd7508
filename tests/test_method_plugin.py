"""Adding a merge method is one new file: a toy method, declared with `@merge_method` in a module
of its own, is usable from a recipe (`evomerge merge`), from a PS space (`space describe`, a
decoded genome) and from the engine, without editing any evomerge source file.

evomerge finds plugin modules when a method name is not known yet: the modules (names or `.py`
paths) in `EVOMERGE_PLUGINS`, and the entry points of the group `evomerge.methods` (what an
installed package declares). Both paths are tested; the merged tensors are compared with the
method's formula computed directly with torch (parity style).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import plugins
from evomerge.merge import specs
from evomerge.merge.engine import materialize
from evomerge.merge.sources import SourcePool
from evomerge.plugins import PLUGINS_ENV
from evomerge.recipe import Recipe
from evomerge.spaces import build_space

# The whole plugin: one file, as a user would write it.
PLUGIN = '''"""mean_plus: the weighted mean of the models' tensors, plus a constant offset."""

import torch

from evomerge.merge.specs import ModelCount, ParamSpec, merge_method


@merge_method(
    "mean_plus",
    requires_base=False,
    models=ModelCount(2),
    model_params=(ParamSpec("weight", 1.0, doc="weight of this model in the mean", low=0.0),),
    global_params=(ParamSpec("offset", 0.0, doc="added to every entry", low=-1.0, high=1.0),),
    doc="weighted mean plus an offset (a test plugin)",
)
def mean_plus(base, tensors, model_params, params, ctx):
    weights = [p["weight"] for p in model_params]
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for w, t in zip(weights, tensors):
        acc += w * t.float()
    return (acc / sum(weights) + params["offset"]).to(tensors[0].dtype)
'''

WEIGHTS = {"a": 0.75, "b": 0.25}
OFFSET = 0.125


def expected(models: dict[str, Path], weights: dict[str, float], offset) -> dict[str, torch.Tensor]:
    """The formula, computed directly from the source checkpoints."""
    states = {name: load_file(str(models[name] / "model.safetensors")) for name in weights}
    first = next(iter(states.values()))
    out = {}
    for key in first:
        acc = torch.zeros(first[key].shape, dtype=torch.float32)
        for name, w in weights.items():
            acc += w * states[name][key].float()
        value = offset(key) if callable(offset) else offset
        out[key] = (acc / sum(weights.values()) + value).to(first[key].dtype)
    return out


def recipe_dict(models: dict[str, Path]) -> dict:
    return {
        "merge_method": "mean_plus",
        "models": [{"model": str(models[n]), "parameters": {"weight": w}} for n, w in WEIGHTS.items()],
        "parameters": {"offset": OFFSET},
    }


@pytest.fixture()
def plugin_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The plugin as a file named in EVOMERGE_PLUGINS; the registry is restored afterwards."""
    path = tmp_path / "mean_plus_method.py"
    path.write_text(PLUGIN)
    monkeypatch.setenv(PLUGINS_ENV, str(path))
    before, loaded = dict(specs.METHOD_SPECS), set(plugins._plugins_loaded)
    yield path
    specs.METHOD_SPECS.clear()
    specs.METHOD_SPECS.update(before)
    plugins._plugins_loaded.clear()
    plugins._plugins_loaded.update(loaded)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_plugin_method_merges_from_a_recipe_like_its_formula(llama_family: dict[str, Path], plugin_file: Path) -> None:
    assert "mean_plus" not in specs.METHOD_SPECS  # found on first use, not imported before
    recipe = Recipe.parse(recipe_dict(llama_family))
    spec = specs.get_spec("mean_plus")
    assert spec.param("offset").default == 0.0 and spec.models.low == 2
    got = materialize(recipe, SourcePool())
    want = expected(llama_family, WEIGHTS, OFFSET)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_a_plugin_method_is_checked_by_its_declaration(llama_family: dict[str, Path], plugin_file: Path) -> None:
    from evomerge.errors import ConfigError

    bad = recipe_dict(llama_family)
    bad["parameters"] = {"offset": 2.0}
    with pytest.raises(ConfigError, match=r"offset must be in \[-1, 1\], got 2.0"):
        Recipe.parse(bad)
    one = recipe_dict(llama_family)
    one["models"] = one["models"][:1]
    with pytest.raises(ConfigError, match="merge method 'mean_plus' merges at least 2 models per slice, got 1"):
        Recipe.parse(one)
    unknown = recipe_dict(llama_family)
    unknown["parameters"] = {"ofset": 0.1}
    with pytest.raises(ConfigError, match="has no parameter 'ofset'; valid: offset, weight"):
        Recipe.parse(unknown)


def test_a_plugin_method_in_a_ps_space(llama_family: dict[str, Path], plugin_file: Path, tmp_path: Path) -> None:
    space_file = tmp_path / "ps_mean_plus.yaml"
    space = {
        "kind": "ps",
        "method": "mean_plus",
        "genes": {"weight": {"low": 0.1, "high": 1.0, "init": 0.5}, "offset": {"low": -0.5, "high": 0.5, "init": 0.0}},
        "filters": ["mlp"],
    }
    space_file.write_text(yaml.safe_dump(space))
    models = [str(llama_family["a"]), str(llama_family["b"])]
    built = build_space(str(space_file), models=models, base=None, pool=SourcePool())
    assert built.dim == 2 * 2 + 2  # weight per model and filter group, offset per filter group
    assert "method mean_plus" in built.describe() and "offset: added to every entry (in [-1, 1]" in built.describe()
    genome = np.array([0.6, 0.6, 0.2, 0.2, 0.25, -0.25])  # [a.weight mlp, rest], [b.weight ...], [offset ...]
    recipe = built.decode(genome)
    assert recipe.merge_method == "mean_plus"
    Recipe.parse(recipe.to_dict())  # a valid recipe
    got = materialize(recipe, SourcePool())
    want = expected(llama_family, {"a": 0.6, "b": 0.2}, lambda key: 0.25 if "mlp" in key else -0.25)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7)

    env = {**os.environ, PLUGINS_ENV: str(plugin_file)}
    described = cli("space", "describe", str(space_file), "--models", ",".join(models), env=env)
    assert described.returncode == 0, described.stderr
    assert "ps space: 6 genes" in described.stdout and "offset[mlp]" in described.stdout


def test_evomerge_merge_finds_a_plugin_by_entry_point(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """An installed package's entry point (group `evomerge.methods`) is enough for the CLI; without
    the plugin the recipe is one line naming the unknown method."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_mean_plus.py").write_text(PLUGIN)
    dist = site / "toy_mean_plus-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-mean-plus\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[evomerge.methods]\nmean_plus = toy_mean_plus\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(llama_family)))
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}

    missing = cli("merge", str(recipe), "--out", str(tmp_path / "none"), env=env)
    assert missing.returncode == 2 and "unknown merge method 'mean_plus'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    done = cli("merge", str(recipe), "--out", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = expected(llama_family, WEIGHTS, OFFSET)
    assert set(written) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0)


def test_readme_method_table_follows_the_declarations() -> None:
    """README's method table lists every built-in method once, with the base column and the
    parameters that have an effect as declared (the declaration is the source; the table says it
    in words)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = readme.index("| method | base needed | per-model parameters | method parameters |")
    rows = []
    for line in readme[header:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    listed: list[str] = []
    for row in rows:
        names_cell, base_cell, per_model, method_wide = (cell.strip() for cell in row.strip("|").split("|"))
        for name in re.findall(r"`(\w+)`", names_cell):
            listed.append(name)
            spec = specs.METHOD_SPECS[name]
            assert base_cell.startswith("yes" if spec.requires_base else "no"), name
            for cell, params in ((per_model, spec.model_params), (method_wide, spec.global_params)):
                for param in params:
                    if not param.inert:
                        assert re.search(rf"\b{param.name}\b", cell), (name, param.name)
    assert sorted(listed) == sorted(specs.BUILTIN_METHODS)
