"""Search spaces decode genomes into recipes the engine builds; DFS exports exactly."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.errors import ConfigError
from evomerge.merge.engine import materialize
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.resources import builtin_names
from evomerge.spaces import DataFlowSpace, ParameterSpace, build_space

from .conftest import write_llama

PS_SPACES = [name for name in builtin_names("search_spaces") if name.startswith("ps_")]


def random_genomes(space, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lo, hi = space.bounds[:, 0], space.bounds[:, 1]
    return [space.x0, lo.copy(), hi.copy(), *(rng.uniform(lo, hi) for _ in range(n))]


def test_every_shipped_space_is_listed() -> None:
    assert set(PS_SPACES) >= {"ps_linear", "ps_task_arithmetic", "ps_ties", "ps_dare_ties", "ps_dare_ties_layerwise", "ps_slerp", "ps_della"}
    assert "dfs" in builtin_names("search_spaces")


@pytest.mark.parametrize("name", PS_SPACES)
def test_shipped_ps_spaces_decode_to_buildable_recipes(name: str, llama_family: dict[str, Path]) -> None:
    fam = {k: str(v) for k, v in llama_family.items()}
    models = [fam["a"]] if name == "ps_slerp" else [fam["a"], fam["b"], fam["c"]]
    overrides = {"layer_groups": 3} if name == "ps_dare_ties_layerwise" else None
    space = build_space(name, models=models, base=fam["base"], overrides=overrides)
    assert isinstance(space, ParameterSpace)
    assert space.dim == len(space.bounds) == len(space.x0) > 0
    assert np.all(space.bounds[:, 0] <= space.x0) and np.all(space.x0 <= space.bounds[:, 1])
    pool = SourcePool(resident=True)
    seen = set()
    for genome in random_genomes(space, 2, seed=1):
        recipe = space.decode(genome)
        assert space.decode(genome) == recipe  # pure and deterministic
        recipe.check()
        merged = materialize(recipe, pool)
        assert all(torch.isfinite(t).all() for t in merged.values())
        seen.add(recipe.content_hash())
    assert len(seen) >= 3  # different genomes, different merges


def test_ps_genes_follow_layout_and_bounds(llama_family: dict[str, Path]) -> None:
    fam = {k: str(v) for k, v in llama_family.items()}
    space = build_space(
        "ps_ties", models=[fam["a"], fam["b"]], base=fam["base"], overrides={"filters": ["self_attn", "mlp"], "layer_groups": 3}
    )
    # 2 models x 2 params x 3 filter groups x 3 layer groups
    assert space.dim == 36
    assert space.bounds[0].tolist() == [0.0, 1.5]  # weight
    assert space.bounds[9].tolist() == [0.1, 1.0]  # density
    genome = space.x0.copy()
    genome[0] = 1.25  # a.weight, self_attn, layers 0-0
    recipe = space.decode(genome)
    assert len(recipe.slices) == 3
    params = recipe.slices[0].sources[0].parameters
    assert params["weight"][0] == {"filter": "self_attn", "value": 1.25}
    assert params["weight"][2] == {"value": 0.5}
    with pytest.raises(ValueError, match="outside its bounds"):
        space.decode(np.full(space.dim, 2.0))
    negative = build_space("ps_task_arithmetic", models=[fam["a"]], base=fam["base"], overrides={"allow_negative_weights": True})
    assert negative.bounds[0].tolist() == [-1.5, 1.5]
    smooth = build_space("ps_slerp", models=[fam["a"]], base=fam["base"])
    recipe = smooth.decode(smooth.x0)
    assert recipe.parameters["t"][0] == {"filter": "self_attn", "value": [0.5, 0.5, 0.5]}


def test_ps_bad_input(llama_family: dict[str, Path], tmp_path: Path) -> None:
    fam = {k: str(v) for k, v in llama_family.items()}
    with pytest.raises(ConfigError, match=r"genes\.dropout: method 'ties' has no parameter 'dropout'; valid: .*density"):
        build_space({"kind": "ps", "method": "ties", "genes": {"dropout": {"low": 0, "high": 1}}}, models=[fam["a"]], base=fam["base"])
    with pytest.raises(ConfigError, match=r"layer_groups: 2 groups do not divide the 3 layers .*1, 3"):
        build_space("ps_dare_ties_layerwise", models=[fam["a"]], base=fam["base"])
    deep = write_llama(tmp_path / "deep", seed=9, layers=4)
    with pytest.raises(ConfigError, match="different layer counts"):
        build_space("ps_dare_ties_layerwise", models=[fam["a"], str(deep)], base=fam["base"])
    with pytest.raises(ConfigError, match="kind must be one of"):
        build_space({"kind": "psx"}, models=[fam["a"]])


# ---- data-flow space ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dfs_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two 3-layer models with a negligible RMSNorm epsilon: the fold is exact up to that epsilon
    (a norm of c·x with eps differs from one of x by O(eps / mean(x²))), so with eps = 1e-12 any
    difference left is float rounding."""
    root = tmp_path_factory.mktemp("dfs")
    a = write_llama(root / "a", seed=11, rms_norm_eps=1e-12)
    b = write_llama(root / "b", seed=12, base=a, noise=0.2, rms_norm_eps=1e-12)
    return [str(a), str(b)]


def direct_dfs_logits(space: DataFlowSpace, genome: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
    """Run the path the direct way: A's embeddings, the chosen layers with the input scale applied
    to the hidden state entering each, A's final norm and head."""
    models = {s.ref: AutoModelForCausalLM.from_pretrained(s.ref) for s in space.sources}
    steps = space.path(genome)
    direct = copy.deepcopy(models[space.sources[0].ref])
    layers = []
    for t, step in enumerate(steps):
        layer = copy.deepcopy(models[step.model].model.layers[step.layer])
        layer.self_attn.layer_idx = t

        def scale_input(module, args, kwargs, factor=step.input_scale):
            if args:
                return (args[0] * factor, *args[1:]), kwargs
            kwargs["hidden_states"] = kwargs["hidden_states"] * factor
            return args, kwargs

        layer.register_forward_pre_hook(scale_input, with_kwargs=True)
        layers.append(layer)
    direct.model.layers = torch.nn.ModuleList(layers)
    direct.config.num_hidden_layers = len(layers)
    if getattr(direct.config, "layer_types", None):
        direct.config.layer_types = [direct.config.layer_types[0]] * len(layers)
    with torch.no_grad():
        return direct(ids, use_cache=False).logits


@pytest.mark.parametrize("scales", ["per_slot", "matrix"])
def test_dfs_export_matches_the_direct_path(dfs_models: list[str], tmp_path: Path, scales: str) -> None:
    space = build_space("dfs", models=dfs_models, overrides={"scales": scales, "pin_ends": False})
    assert space.t == 12  # (3 + 3) layers x 2 repeats
    rng = np.random.default_rng(0)
    genome = rng.uniform(space.bounds[:, 0], space.bounds[:, 1])
    genome[:12] = -1
    genome[[0, 1, 4, 7, 9]] = 1  # A0, A1, B1, then A1 and B0 again in the second repeat
    steps = space.path(genome)
    assert [(Path(s.model).name, s.layer) for s in steps] == [("a", 0), ("a", 1), ("b", 1), ("a", 1), ("b", 0)]
    assert any(abs(s.cumulative - 1) > 0.1 for s in steps)

    out = write_model(space.decode(genome), SourcePool(), tmp_path / "dfs")
    exported = AutoModelForCausalLM.from_pretrained(out)  # a standard checkpoint, no remote code
    assert exported.config.num_hidden_layers == 5
    ids = torch.tensor([[1, 5, 9, 2, 33, 7, 8, 60]])
    with torch.no_grad():
        got = exported(ids, use_cache=False).logits
    want = direct_dfs_logits(space, genome, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dfs_repeats_pins_and_empty_path(dfs_models: list[str]) -> None:
    space = build_space("dfs", models=dfs_models)  # repeats 2, pin_ends
    genome = space.x0.copy()
    genome[: space.t] = -1
    genome[[2, 8]] = 1  # A2 in both repeats
    path = [(Path(s.model).name, s.layer) for s in space.path(genome)]
    assert path == [("a", 0), ("a", 2), ("a", 2)]
    genome[: space.t] = -1
    assert [(Path(s.model).name, s.layer) for s in space.path(genome)] == [("a", 0), ("a", 2)]
    unpinned = build_space("dfs", models=dfs_models, overrides={"pin_ends": False})
    empty = unpinned.x0.copy()
    empty[: unpinned.t] = -1
    recipe = unpinned.decode(empty)
    assert [(Path(s["model"]).name, s["layer"]) for s in recipe.evomerge.dfs_path] == [("a", 0)]
    merged = materialize(recipe, SourcePool())
    assert "model.layers.0.mlp.up_proj.weight" in merged and "model.layers.1.mlp.up_proj.weight" not in merged
    # x0 reproduces model A
    start = [(Path(s.model).name, s.layer) for s in space.path(space.x0)]
    assert start == [("a", 0), ("a", 1), ("a", 2)]


def test_dfs_refuses_other_architectures(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel; data-flow merging supports LlamaForCausalLM"):
        build_space("dfs", models=[str(tmp_path / "gpt2")])


def test_space_describe_cli(dfs_models: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "space", "describe", "dfs", "--models", ",".join(dfs_models)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dfs space: 24 genes")
    assert "keep slot 7" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "space", "describe", "nope", "--models", dfs_models[0]], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "built-in: dfs" in bad.stderr.replace("\n", " ")
