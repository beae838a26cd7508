"""The engine builds what a recipe says, in memory and as a loadable Hugging Face directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.errors import ConfigError, SourceError
from evomerge.merge.engine import load_into_model, materialize, plan_merge
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.recipe import Recipe

from .conftest import write_llama


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_task_arithmetic_by_hand(llama_family: dict[str, Path]) -> None:
    fam = llama_family
    recipe = Recipe.parse(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(fam["base"]),
            "models": [
                {"model": str(fam["a"]), "parameters": {"weight": 0.5}},
                {"model": str(fam["b"]), "parameters": {"weight": [0.0, 1.0]}},
            ],
        }
    )
    merged = materialize(recipe, SourcePool())
    base, a, b = state(fam["base"]), state(fam["a"]), state(fam["b"])
    assert set(merged) == set(base)
    # three layers: the gradient gives b weight 0, 0.5, 1 at layers 0, 1, 2; embeddings and head
    # are read at t = 0, as mergekit does (tests/test_mergekit_parity.py)
    for name, expected_wb in [
        ("model.embed_tokens.weight", 0.0),
        ("model.layers.0.mlp.up_proj.weight", 0.0),
        ("model.layers.1.mlp.up_proj.weight", 0.5),
        ("model.layers.2.self_attn.o_proj.weight", 1.0),
        ("lm_head.weight", 0.0),
    ]:
        expected = base[name] + 0.5 * (a[name] - base[name]) + expected_wb * (b[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_passthrough_slices_stack_layers_and_set_layer_count(llama_family: dict[str, Path], tmp_path: Path) -> None:
    fam = llama_family
    recipe = Recipe.parse(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(fam["a"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(fam["b"]), "layer_range": [1, 3], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
            ],
            "dtype": "float32",
        }
    )
    out = write_model(recipe, SourcePool(), tmp_path / "stacked")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    merged = state(out)
    a, b = state(fam["a"]), state(fam["b"])
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.3.self_attn.o_proj.weight"], 0.5 * b["model.layers.2.self_attn.o_proj.weight"])
    torch.testing.assert_close(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    written = Recipe.from_yaml(out / "mergekit_config.yml")
    assert written.content_hash() == recipe.content_hash()
    assert set(written.evomerge.source_hashes) == {str(fam["a"]), str(fam["b"])}
    assert "passthrough" in (out / "README.md").read_text()


def test_written_model_loads_and_matches_memory(llama_family: dict[str, Path], tmp_path: Path) -> None:
    fam = llama_family
    recipe = Recipe.parse(
        {
            "merge_method": "ties",
            "base_model": str(fam["base"]),
            "models": [{"model": str(fam[k]), "parameters": {"weight": w, "density": d}} for k, w, d in [("a", 0.5, 0.5), ("b", 0.3, 0.7), ("c", 0.4, 0.4)]],
        }
    )
    out = write_model(recipe, SourcePool(), tmp_path / "ties", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    in_memory = materialize(recipe, SourcePool())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, in_memory[name])

    # the same merge copied into a resident model gives the same logits
    resident = AutoModelForCausalLM.from_pretrained(fam["base"])
    load_into_model(resident, recipe, SourcePool(resident=True))
    ids = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(resident(ids).logits, model(ids).logits)


def test_dtype_is_kept_and_converted(llama_family: dict[str, Path]) -> None:
    fam = llama_family
    recipe = Recipe.parse(
        {
            "merge_method": "linear",
            "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0}}, {"model": str(fam["b"]), "parameters": {"weight": 1.0}}],
            "dtype": "bfloat16",
        }
    )
    merged = materialize(recipe, SourcePool())
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    plan = plan_merge(recipe, SourcePool())
    assert plan.config["torch_dtype"] == "bfloat16"


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    base = write_llama(tmp_path / "base", seed=0, tie=True)
    other = write_llama(tmp_path / "other", seed=1, base=base, tie=True)
    recipe = Recipe.parse(
        {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(other), "parameters": {"weight": 0.5}}]}
    )
    out = write_model(recipe, SourcePool(), tmp_path / "out")
    assert "lm_head.weight" not in state(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_layouts(tmp_path: Path, arch: str) -> None:
    base = write_llama(tmp_path / "base", seed=0, arch=arch)
    other = write_llama(tmp_path / "other", seed=1, base=base, arch=arch)
    recipe = Recipe.parse(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(other), "parameters": {"weight": 1.0, "density": 0.5}}],
        }
    )
    out = write_model(recipe, SourcePool(), tmp_path / "out")
    merged = state(out)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in merged
    AutoModelForCausalLM.from_pretrained(out)


def test_gpt2_names(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = []
    for seed in range(2):
        torch.manual_seed(seed)  # GPT-2's own init; only the test uses the global RNG
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
        paths.append(tmp_path / f"g{seed}")
        model.save_pretrained(paths[-1])
    recipe = Recipe.parse(
        {
            "merge_method": "linear",
            "models": [{"model": str(paths[0]), "parameters": {"weight": 1.0}}, {"model": str(paths[1]), "parameters": {"weight": [0.0, 1.0]}}],
        }
    )
    merged = materialize(recipe, SourcePool())
    g0, g1 = state(paths[0]), state(paths[1])
    name = "transformer.h.1.attn.c_attn.weight"
    # layer 1 of 2 is t=1: weights (1, 1), normalized -> the mean; embeddings are t=0: (1, 0)
    torch.testing.assert_close(merged[name], (g0[name] + g1[name]) / 2)
    torch.testing.assert_close(merged["transformer.wte.weight"], g0["transformer.wte.weight"])


# ---- bad input: one line, exit code 2, nothing written ------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


def test_cli_merge_writes_a_model(llama_family: dict[str, Path], recipe_file, tmp_path: Path) -> None:
    fam = llama_family
    path = recipe_file(
        f"merge_method: slerp\nbase_model: {fam['a']}\nmodels:\n  - model: {fam['a']}\n  - model: {fam['b']}\nparameters:\n  t: 0.3\n"
    )
    result = run_cli("merge", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("merge_method: frankenstein\nmodels: [{model: A}]", ["merge_method", "valid:", "ties", "slerp"]),
        ("merge_method: ties\nbase_model: BASE\nmodels: [{model: A, parameters: {weight: 1, dens: 1}}]", ["dens", "valid:", "density"]),
        ("merge_method: linear\nmodels: [{model: /nonexistent/model, parameters: {weight: 1}}]", ["/nonexistent/model", "does not exist"]),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: A, layer_range: [0, 1]}, {model: B, layer_range: [0, 2]}]}]",
            ["slices[0].sources", "same number of layers"],
        ),
    ],
)
def test_cli_refuses_bad_recipes(llama_family: dict[str, Path], recipe_file, tmp_path: Path, text: str, words: list[str]) -> None:
    fam = llama_family
    text = text.replace("BASE", str(fam["base"])).replace("A", str(fam["a"])).replace("B", str(fam["b"]))
    path = recipe_file(text)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(path), "--out", str(out)), out, str(path), *words)


def test_cli_refuses_mismatched_shapes(llama_family: dict[str, Path], recipe_file, tmp_path: Path) -> None:
    wide = write_llama(tmp_path / "wide", seed=3, intermediate=48)
    path = recipe_file(
        f"merge_method: task_arithmetic\nbase_model: {llama_family['base']}\nmodels: [{{model: {wide}, parameters: {{weight: 1}}}}]"
    )
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(path), "--out", str(out)), out, "mlp", "different shapes", "[16, 48]", "[16, 32]")


def test_pickle_needs_allow_pickle(llama_family: dict[str, Path], recipe_file, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama_family["a"] / "config.json").read_text())
    torch.save(state(llama_family["a"]), pickled / "pytorch_model.bin")
    path = recipe_file(f"merge_method: linear\nmodels: [{{model: {pickled}, parameters: {{weight: 1}}}}]")
    out = tmp_path / "out"
    assert_refused(run_cli("merge", str(path), "--out", str(out)), out, "pytorch_model.bin", "--allow-pickle")
    assert run_cli("merge", str(path), "--out", str(out), "--allow-pickle").returncode == 0
    torch.testing.assert_close(state(out)["lm_head.weight"], state(llama_family["a"])["lm_head.weight"])


def test_engine_errors_are_typed(llama_family: dict[str, Path]) -> None:
    recipe = Recipe.parse({"merge_method": "ties", "base_model": str(llama_family["base"]), "models": [{"model": str(llama_family["a"])}]})
    with pytest.raises(ConfigError, match="needs 'weight'"):
        materialize(recipe, SourcePool())
    with pytest.raises(SourceError, match="zoo:"):
        SourcePool().resolve("./not/here")


def test_safetensors_sharded_source(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """A sharded source (index + several files) reads like a single file."""
    full = state(llama_family["a"])
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((llama_family["a"] / "config.json").read_text())
    names = sorted(full)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: full[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    recipe = Recipe.parse({"merge_method": "linear", "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]})
    merged = materialize(recipe, SourcePool())
    for name in names:
        torch.testing.assert_close(merged[name], full[name])
