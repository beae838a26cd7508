"""Model kinds (`evomerge.models`): the core builds a config's model by its registered kind and
imports no model code it does not build (the zoo's DigitsMLP is found by its `architecture`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from evomerge import models
from evomerge.models import build_model, model_kinds, register_model_kind, registered_model
from evomerge.plugins import PLUGINS_ENV


def test_the_digits_mlp_is_a_registered_kind_found_by_its_architecture() -> None:
    from evomerge.zoo.digits import DigitsMLP

    model = registered_model({"architecture": "DigitsMLP", "sizes": [64, 32, 10]})
    assert isinstance(model, DigitsMLP) and model.sizes == (64, 32, 10)
    assert "DigitsMLP" in model_kinds()
    assert registered_model({"model_type": "llama", "architecture": "DigitsMLP"}) is None  # a Hugging Face config
    assert registered_model({"sizes": [1]}) is None  # names no kind


def test_unknown_kinds_are_one_line_and_a_new_kind_is_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_KINDS", dict(models._KINDS))  # this test's kinds stay here
    with pytest.raises(ValueError, match=r"unknown architecture 'Nope' in config.json; valid: .*DigitsMLP.* or a Hugging Face config"):
        registered_model({"architecture": "Nope"})

    def toy(config):
        return torch.nn.Linear(config["n"], 1)

    register_model_kind("ToyLinear", toy)
    register_model_kind("ToyLinear", toy)  # the same loader again: no-op
    assert build_model({"architecture": "ToyLinear", "n": 3}).in_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model_kind("ToyLinear", "somewhere:else")
    register_model_kind("ToyLinear", "torch.nn:Identity", replace=True)  # lazy 'module:attr'
    assert isinstance(build_model({"architecture": "ToyLinear"}), torch.nn.Identity)
    with pytest.raises(ValueError, match="not 'package.module:attr'"):
        register_model_kind("Bad", "no_colon")


def test_the_core_imports_no_zoo_code() -> None:
    code = (
        "import sys, evomerge.run.worker_core, evomerge.run.driver, evomerge.evaluate, evomerge.models\n"
        "print([m for m in sys.modules if m.startswith('evomerge.zoo')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_zoo_registers_its_own_model_kind() -> None:
    """The core's table holds no zoo entry; the zoo's plugin (evomerge/zoo/kinds.py) adds DigitsMLP
    when a config names a kind the core does not know."""
    code = (
        "from evomerge import models\n"
        "before = models.model_kinds()\n"
        "model = models.build_model({'architecture': 'DigitsMLP', 'sizes': [4, 2]})\n"
        "print(before, type(model).__module__, 'DigitsMLP' in models.model_kinds())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] evomerge.zoo.digits True"


def test_the_classification_evaluator_takes_its_data_from_its_spec() -> None:
    """No zoo default in the core: the digits data is named by evaluators/digits.yaml."""
    from evomerge.errors import ConfigError
    from evomerge.evaluate import build_evaluator

    with pytest.raises(ConfigError, match="no data") as info:
        build_evaluator({"kind": "classification"})
    assert info.value.field == "data"
    assert build_evaluator("digits").spec.data == "evomerge.zoo.digits:load_split"


def test_a_model_card_says_how_to_load_the_kind() -> None:
    from evomerge.models import load_hint

    assert "DigitsMLP.from_pretrained(DIR)" in load_hint({"architecture": "DigitsMLP", "sizes": [64, 10]})
    assert load_hint({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "`transformers.AutoModel.from_pretrained(DIR)`"


def test_a_plugin_module_registers_a_model_kind(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evomerge import plugins

    monkeypatch.setattr(models, "_KINDS", dict(models._KINDS))
    monkeypatch.setattr(plugins, "_plugins_loaded", set(plugins._plugins_loaded))
    plugin = tmp_path / "my_kind.py"
    plugin.write_text(
        "import torch\nfrom evomerge.models import register_model_kind\n"
        "register_model_kind('PluginLinear', lambda config: torch.nn.Linear(config['n'], 2))\n"
    )
    monkeypatch.setenv(PLUGINS_ENV, str(plugin))
    assert build_model({"architecture": "PluginLinear", "n": 4}).in_features == 4
