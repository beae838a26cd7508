"""A real run on the `test` zoo with the lm-eval evaluator: the whole stack, no stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main


@pytest.fixture(scope="module")
def test_zoo() -> Path:
    from evomerge.zoo import build_zoo

    return build_zoo("test")


def test_zoo_run_with_lm_eval_then_export(test_zoo: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exp = {
        "name": "zoo_small",
        "seed": 1,
        "models": {"base": "zoo:test/base", "sources": ["zoo:test/add", "zoo:test/reverse"]},
        "stages": [
            {
                "name": "ps",
                "space": "ps_ties",
                "evaluator": "zoo_all",
                "evaluator_overrides": {"limit": 24, "holdout_limit": 24},
                "optimizer": {"name": "cmaes", "popsize": 3},
                "budget": {"evaluations": 3},
                "holdout_top_k": 1,
            }
        ],
    }
    exp_file = tmp_path / "zoo.yaml"
    exp_file.write_text(yaml.safe_dump(exp))
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(exp_file), "--out", str(run_dir), "--local"])
    assert result.exit_code == 0, result.output
    status = json.loads(runner.invoke(main, ["status", str(run_dir), "--json"]).output)
    assert status["finished"] and status["evaluations"] == 3 and status["failures"] == 0
    names = [o["name"] for o in status["stages"][0]["objectives"]]
    assert names[0] == "mean_acc" and {"add", "reverse", "sort"} <= set(names)
    assert 0.0 <= status["best"]["score"] <= 1.0 and 0.0 <= status["best"]["holdout"] <= 1.0

    model_dir = tmp_path / "merged"
    result = runner.invoke(main, ["export", str(run_dir), "--out", str(model_dir)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_hidden_layers >= 1 and tokenizer("12+3=")["input_ids"]
    card = (model_dir / "README.md").read_text()
    assert "zoo:test/add" in card and "holdout/mean_acc" in card and "ties" in card
