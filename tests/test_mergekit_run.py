"""mergekit itself builds what evomerge exports: runs on the `test` zoo (a PS stage with TIES in
float32, one with layer-wise task arithmetic in float16, a DFS stage in bfloat16; `--local`, a few
evaluations each), `evomerge export --out`, then `mergekit-yaml` on the exported
`best/recipe.yaml`; every tensor of the two models is compared, and config.json's architecture,
layer count and dtype.

mergekit is the reference, never a dependency: it lives in its own venv (`make mergekit` builds
`.venv-mergekit`, see experiments/benchmarks/mergekit_venv.py) and `make test` names its
`mergekit-yaml` in EVOMERGE_MERGEKIT_YAML. Without that variable (a plain `pytest`) these tests
skip and say so; with it set to something that does not run, they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.run_helpers import cli

ENV = "EVOMERGE_MERGEKIT_YAML"
# mergekit on one CPU thread, no model card; the tokenizer is copied as by default.
MERGEKIT_FLAGS = ("--random-seed", "0", "--quiet", "--no-write-model-card", "-j", "1")
EVALUATOR = {"evaluator": "zoo_all", "evaluator_overrides": {"limit": 8, "holdout_limit": 8}}
STAGES = {
    "ps_ties": {"space": "ps_ties", "optimizer": {"name": "cmaes", "popsize": 3}, "budget": {"evaluations": 3}},
    "ps_task_arithmetic_layerwise": {
        "space": "ps_task_arithmetic_layerwise",
        "space_overrides": {"dtype": "float16"},
        "optimizer": {"name": "cmaes", "popsize": 3},
        "budget": {"evaluations": 3},
    },
    "dfs": {
        "space": "dfs",
        "space_overrides": {"repeats": 1, "dtype": "bfloat16"},
        "models": ["zoo:test/add", "zoo:test/reverse"],
        "optimizer": {"name": "cmaes", "popsize": 4},
        "budget": {"evaluations": 4},
    },
}


@pytest.fixture(scope="module")
def mergekit_yaml() -> Path:
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"{ENV} is not set: `make test` builds mergekit's venv (`make mergekit`) and sets it")
    exe = Path(value)
    assert exe.is_file() and os.access(exe, os.X_OK), f"{ENV}={value} is not an executable file; run `make mergekit`"
    return exe


def run_and_export(name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A one-stage run on the `test` zoo, then `export --out`: (best/recipe.yaml, model directory)."""
    exp = {
        "name": f"mergekit_{name}",
        "seed": 3,
        "models": {"base": "zoo:test/base", "sources": ["zoo:test/add", "zoo:test/reverse"]},
        "stages": [{"name": name, **EVALUATOR, **STAGES[name], "holdout_top_k": 1}],
    }
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(exp, sort_keys=False))
    run_dir = tmp_path / "run"
    code, out = cli("run", exp_file, "--out", run_dir, "--local")
    assert code == 0, out
    model_dir = tmp_path / "evomerge"
    code, out = cli("export", run_dir, "--out", model_dir)
    assert code == 0, out
    return run_dir / "best" / "recipe.yaml", model_dir


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    """Same names, dtypes and shapes; 32-bit values as the parity tests compare them (rtol 1e-5,
    atol 1e-7); 16-bit values within one unit in the last place at the tensor's scale,
    |got - want| <= eps(dtype) * max|want| (a merge computed in 16 bits rounds after every
    operation, and mergekit orders them differently: measured up to 0.73 of that bound, float16
    task arithmetic; near-zero entries then differ by more of their own, finer, units)."""
    assert sorted(got) == sorted(want), f"{label}: tensor names differ"
    for name, expected in want.items():
        tensor = got[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, f"{label}: {name}"
        if tensor.element_size() == 2:
            bound = torch.finfo(expected.dtype).eps * float(expected.float().abs().max())
            worst = float((tensor.float() - expected.float()).abs().max())
            assert worst <= bound, f"{label}: {name}: {worst:.3g} apart, more than eps * max|x| = {bound:.3g}"
        else:
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{label}: {n}: {m}")


@pytest.mark.parametrize("stage", list(STAGES))
def test_mergekit_builds_what_evomerge_exports(stage: str, mergekit_yaml: Path, tmp_path: Path) -> None:
    recipe, ours = run_and_export(stage, tmp_path)
    text = recipe.read_text()
    if stage == "dfs":  # the search moved off model A as it is: a layer path with folded scales
        assert "passthrough" in text and "scale" in text and "filter: o_proj" in text, text
    theirs = tmp_path / "mergekit"
    result = subprocess.run(
        [str(mergekit_yaml), str(recipe), str(theirs), *MERGEKIT_FLAGS],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"mergekit-yaml failed on {recipe}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert_same_tensors(tensors(ours), tensors(theirs), stage)
    mine, its = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    for key in ("architectures", "model_type", "num_hidden_layers", "dtype"):
        assert mine.get(key) == its.get(key), f"{stage}: config.json {key}: evomerge {mine.get(key)}, mergekit {its.get(key)}"
    assert mine["torch_dtype"] == its["dtype"]  # the older key, for readers of transformers < 4.56
