"""Search-space kinds are declared once (`evomerge.spaces.config.SPACES`): a kind is one class with
its schema, its build and its capabilities, found by a space file's `kind:`. A user's kind
(`MixSpace`, the smallest one) validates, builds, runs an in-process experiment and, as a plugin,
serves `evomerge space describe`; the built-ins declare what the run and the report read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.merge.sources import SourcePool
from evomerge.recipe import Recipe
from evomerge.spaces import SPACES, Gene, SearchSpace, build_space, register_space, space_class
from evomerge.spaces.base import SpaceSpec
from evomerge.spaces.config import load_space_spec, space_kind_of
from tests.run_helpers import rows
from tests.test_run import experiment, write_exp

# ---- a user's space kind: this class and one register line are all it takes -------------------


class MixSpec(SpaceSpec):
    kind: Literal["test_mix"]
    low: float = 0.0
    high: float = 1.0


class MixSpace(SearchSpace):
    """One gene t: a linear merge of two models weighted t and 1 - t."""

    kind = "test_mix"
    spec_model = MixSpec
    RECIPE_VIEW = "parameters"  # a report draws its best recipe's weights

    @classmethod
    def build(cls, spec: MixSpec, *, models: list[str], base: str | None, pool: SourcePool, file: str | None) -> MixSpace:
        if len(models) != 2:
            raise ConfigError(f"a mix space merges exactly two models, got {len(models)}", file=file, field="models")
        return cls(spec, models)

    def __init__(self, spec: MixSpec, models: list[str]):
        self.spec, self.models = spec, models
        super().__init__([Gene("t", spec.low, spec.high, (spec.low + spec.high) / 2, f"weight of {models[0]}; {models[1]} gets 1 - t")])

    def decode(self, genome: np.ndarray) -> Recipe:
        (t,) = self.check_genome(genome).tolist()
        models = [{"model": self.models[0], "parameters": {"weight": t}}, {"model": self.models[1], "parameters": {"weight": 1 - t}}]
        return Recipe.parse({"merge_method": "linear", "models": models, "dtype": "float32"})


def test_unknown_kinds_list_the_registered_ones_and_each_kind_validates_its_own_fields() -> None:
    with pytest.raises(ConfigError) as info:
        load_space_spec({"kind": "psx"})
    assert info.value.field == "kind" and f"kind must be one of: {', '.join(SPACES)}; got 'psx'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_space_spec({"kind": "dfs", "repeat": 2})
    assert info.value.field == "repeat" and "unknown field; valid: kind, repeats" in info.value.message
    assert list(SPACES)[:3] == ["ps", "dfs", "weights"] and all(space_class(k).kind == k for k in SPACES)


def test_the_builtin_kinds_declare_what_the_run_and_the_report_read() -> None:
    builtin = ["ps", "dfs", "weights"]
    assert [k for k in builtin if space_class(k).RAW_TENSORS] == ["weights"]
    assert {k: space_class(k).RECIPE_VIEW for k in builtin} == {"ps": "parameters", "dfs": "layer_path", "weights": None}
    assert load_space_spec("ps_ties")[0].base_needed() == "merges with 'ties', which needs a base model"
    assert load_space_spec("ps_linear")[0].base_needed() is None and load_space_spec("dfs")[0].base_needed() is None
    assert space_kind_of("dfs") == "dfs" and space_kind_of({"kind": "weights"}) == "weights"
    assert space_kind_of("no_such_space") is None and space_kind_of(None) is None
    code = "import sys, evomerge.spaces, evomerge.config, evomerge.report\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # reading and checking spaces of every kind imports no torch


def test_a_user_registered_space_kind_builds_and_runs(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from evomerge.run.driver import start_run

    register_space("test_mix", "tests.test_space_kind:MixSpace", replace=True)  # lazy, by its module
    a, b = str(llama_family["a"]), str(llama_family["b"])
    space = build_space({"kind": "test_mix", "high": 0.8}, models=[a, b])
    assert isinstance(space, MixSpace) and space.dim == 1 and space.x0.tolist() == [0.4]
    assert space.decode(np.array([0.25])).models[1].parameters == {"weight": 0.75}
    with pytest.raises(ConfigError, match="unknown field; valid: kind, low, high"):
        build_space({"kind": "test_mix", "hihg": 1}, models=[a, b])
    with pytest.raises(ConfigError, match="exactly two models"):
        build_space({"kind": "test_mix"}, models=[a])

    exp = experiment(llama_family)
    exp["stages"][0].update(space={"kind": "test_mix"}, optimizer={"name": "random"}, budget={"evaluations": 4})
    run = tmp_path / "run"
    start_run(write_exp(tmp_path / "e.yaml", exp), out=run, echo=lambda _: None)
    search = rows(run, split="search")
    assert len(search) == 4 and all(r.status == "ok" for r in search)
    assert all(Recipe.from_string(r.recipe_yaml).merge_method == "linear" for r in search)


def test_a_plugin_registers_a_space_kind_for_the_cli(llama_family: dict[str, Path], tmp_path: Path) -> None:
    plugin = tmp_path / "my_space.py"
    plugin.write_text("from evomerge.spaces import register_space\nregister_space('test_mix', 'tests.test_space_kind:MixSpace')\n")
    (tmp_path / "mix.yaml").write_text("kind: test_mix\nhigh: 0.5\n")
    repo = Path(__file__).resolve().parents[1]

    def describe(plugins: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "evomerge.cli", "space", "describe", str(tmp_path / "mix.yaml"), "--models", f"{llama_family['a']},{llama_family['b']}"]
        return subprocess.run(args, cwd=repo, env={**os.environ, "EVOMERGE_PLUGINS": plugins}, capture_output=True, text=True, timeout=120)

    done = describe(str(plugin))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("test_mix space: 1 genes") and "0.25" in done.stdout
    refused = describe("")
    assert refused.returncode == 2 and "kind: kind must be one of: ps, dfs, weights; got 'test_mix'" in refused.stderr
