"""Every checkpoint evomerge writes has a config.json as complete as transformers' `save_pretrained`
writes it (`architectures`, the dtype written, `transformers_version`; the source's generation
config), also from sources whose config lacks `architectures`; non-transformers configs (the
digits MLPs) stay as they are. tests/test_mergekit_run.py has mergekit itself read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evomerge.merge.hfconfig import architectures_of, complete_checkpoint
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.recipe import Recipe
from evomerge.run.weights import write_weights_model
from tests.conftest import write_llama


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def strip_config(model_dir: Path, **extra: object) -> Path:
    """The config as `config.save_pretrained` alone writes it: no architectures, no dtype."""
    config = {k: v for k, v in config_of(model_dir).items() if k not in ("architectures", "dtype", "torch_dtype")}
    (model_dir / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
    return model_dir


def assert_like_save_pretrained(model_dir: Path, tmp_path: Path, dtype: str) -> None:
    """transformers loads it, and its own save_pretrained of what it loaded agrees with ours."""
    ours = config_of(model_dir)
    assert ours["dtype"] == ours["torch_dtype"] == dtype
    assert ours["transformers_version"] == transformers.__version__
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    model.save_pretrained(tmp_path / "resaved")
    theirs = config_of(tmp_path / "resaved")
    assert theirs["architectures"] == ours["architectures"] == [type(model).__name__]
    assert theirs["dtype"] == ours["dtype"]


def test_architectures_from_the_config_else_its_model_type() -> None:
    assert architectures_of({"model_type": "llama", "architectures": ["MyLlama"]}) == ["MyLlama"]
    assert architectures_of({"model_type": "qwen2", "architectures": None}) == ["Qwen2ForCausalLM"]
    assert architectures_of({"model_type": "mistral"}) == ["MistralForCausalLM"]
    assert architectures_of({"model_type": "no-such-type"}) == []


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_merge_of_sources_without_architectures_is_complete(engine: str, tmp_path: Path) -> None:
    a = strip_config(write_llama(tmp_path / "a", seed=0, layers=2))
    b = strip_config(write_llama(tmp_path / "b", seed=1, layers=2))
    assert (a / "generation_config.json").is_file()
    dtype = "float16" if engine == "numpy" else "bfloat16"
    recipe = Recipe.parse({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                                {"model": str(b), "parameters": {"weight": 0.5}}], "dtype": dtype})  # fmt: skip
    out = write_model(recipe, SourcePool(), tmp_path / "merged", engine=engine)
    assert config_of(out)["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").read_text() == (a / "generation_config.json").read_text()
    assert_like_save_pretrained(out, tmp_path, dtype)


def test_merge_config_names_the_dtype_written_not_the_sources(tmp_path: Path) -> None:
    a = write_llama(tmp_path / "a", seed=0, layers=2)
    config = config_of(a)
    (a / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))  # wrong: the weights are float32
    out = write_model(Recipe.parse({"merge_method": "passthrough", "models": [{"model": str(a)}]}), SourcePool(), tmp_path / "out")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    assert_like_save_pretrained(out, tmp_path, "float32")


def test_weights_export_is_complete_and_digits_configs_stay(tmp_path: Path) -> None:
    template = strip_config(write_llama(tmp_path / "template", seed=0, layers=2))
    tensors = load_file(str(template / "model.safetensors"))
    out = write_weights_model({k: v.to(torch.bfloat16) for k, v in tensors.items()}, template, tmp_path / "evolved", "card\n")
    assert (out / "generation_config.json").is_file()
    assert_like_save_pretrained(out, tmp_path, "bfloat16")

    from evomerge.zoo.digits import DigitsMLP

    digits = DigitsMLP().save_pretrained(tmp_path / "digits")
    before = (digits / "config.json").read_text()
    out = write_weights_model(load_file(str(digits / "model.safetensors")), digits, tmp_path / "digits_out", "card\n")
    assert json.loads((out / "config.json").read_text()) == json.loads(before)
    assert not complete_checkpoint(digits) and (digits / "config.json").read_text() == before


def test_zoo_models_are_complete_and_old_builds_are_completed_in_place(tmp_path: Path) -> None:
    import shutil

    from evomerge.zoo import build_zoo
    from evomerge.zoo.build import save_lm

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=51)
    saved = save_lm(LlamaForCausalLM(config), tmp_path / "saved")
    assert config_of(saved)["architectures"] == ["LlamaForCausalLM"] and config_of(saved)["dtype"] == "float32"

    old = tmp_path / "zoo"
    shutil.copytree(build_zoo("test"), old)
    weights = {name: (old / name / "model.safetensors").read_bytes() for name in ("base", "add")}
    for name in ("base", "add"):  # as zoo code version 5 wrote them before configs were completed
        strip_config(old / name, transformers_version="4.0.0")
    assert build_zoo("test", out=old) == old.resolve()  # the same build (hash): reused, not rebuilt
    for name in ("base", "add"):
        config = config_of(old / name)
        assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == config["torch_dtype"] == "float32"
        assert config["transformers_version"] == "4.0.0"  # what was there stays
        assert (old / name / "model.safetensors").read_bytes() == weights[name]
