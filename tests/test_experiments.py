"""Every experiment YAML in experiments/ validates, and the demo search runs end to end.

What is checked, honestly:

- every file: the schema, `--set`-free loading, and resolution (search space and evaluator
  specs found and inlined), as `evomerge run` does before anything else;
- the tiny and digits experiments: the whole `evomerge run` validation (`Run.validate`: sources
  resolve, evaluators build, spaces build and their x0 decodes into a recipe that plans against
  the sources, optimizer options are accepted, baselines plan) with the `tiny` zoo models swapped
  for the `test` zoo's (same layout, seconds to build);
- the templates for real models: their Hugging Face ids are not in the (offline) cache here, so
  validation stops at the first model with a one-line error naming the field; their search space
  and optimizer options are checked on the test zoo's models instead. Their evaluator (GSM8K /
  MGSM-JA) needs datasets from the hub and is not built here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.config import load_experiment, resolve_experiment
from evomerge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
TEMPLATES = [p for p in EXPERIMENTS if p.name.startswith("template_")]
RUNNABLE = [p for p in EXPERIMENTS if p not in TEMPLATES]


def test_the_experiments_issue_7_asks_for_are_there() -> None:
    names = {p.stem for p in EXPERIMENTS}
    assert {
        "tiny_ps", "tiny_dfs", "tiny_ps_dfs", "tiny_m2n2", "tiny_pareto", "digits_m2n2_scratch",
        "digits_m2n2_pretrained", "template_evollm_jp_ps", "template_dfs",
    } <= names  # fmt: skip
    for path in EXPERIMENTS:  # each says what it shows in a comment block at the top
        assert path.read_text().startswith("# "), path.name


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_loads_and_resolves(path: Path) -> None:
    exp = resolve_experiment(load_experiment(path), file=str(path))
    for stage in exp.stages:
        assert isinstance(stage.evaluator, dict) and stage.evaluator["kind"]
        assert stage.space is None or isinstance(stage.space, dict)


@pytest.fixture(scope="module")
def test_zoo() -> Path:
    from evomerge.zoo import build_zoo

    return build_zoo("test")


def _on_test_zoo(path: Path, tmp_path: Path) -> Path:
    """A copy of the experiment with the tiny zoo's models replaced by the test zoo's."""
    out = tmp_path / path.name
    out.write_text(path.read_text().replace("zoo:tiny/", "zoo:test/"))
    return out


def _validate(path: Path, tmp_path: Path) -> None:
    from evomerge.run.driver import Run

    file = str(path)
    exp = resolve_experiment(load_experiment(file), file=file)
    Run(tmp_path / "run", exp, file=file, echo=lambda _m: None).validate()


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_runnable_experiments_pass_run_validation(path: Path, test_zoo: Path, tmp_path: Path) -> None:
    _validate(_on_test_zoo(path, tmp_path), tmp_path)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_templates_name_uncached_hub_models_in_one_line(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        _validate(path, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "models." in message and "Hugging Face cache" in message
    exp = load_experiment(path)
    assert exp.ray.address == "auto" and exp.ray.num_gpus_per_worker >= 1


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_templates_space_and_optimizer_build_on_stand_in_models(path: Path, test_zoo: Path) -> None:
    from evomerge.optim import make_optimizer
    from evomerge.spaces import build_space

    exp = resolve_experiment(load_experiment(path), file=str(path))
    stand_in = ["zoo:test/add", "zoo:test/reverse", "zoo:test/sort"]
    for stage in exp.stages:
        models = stand_in[: len(exp.stage_models(stage))]
        base = "zoo:test/base" if exp.stage_base(stage) else None
        space = build_space(stage.space, models=models, base=base)
        make_optimizer(stage.optimizer.name, dim=space.dim, bounds=space.bounds, x0=space.x0, seed=0, objectives={"ja_math": True, "gsm8k": True}, **stage.optimizer.options)
        assert space.decode(space.x0).merge_method


def test_demo_search_end_to_end_on_the_test_zoo(test_zoo: Path, tmp_path: Path) -> None:
    """The demo's experiment (PS stage, then DFS on stage:ps + an expert), on the test zoo, small
    budgets, in-process workers: run, export, report, table."""
    from transformers import AutoModelForCausalLM

    from evomerge.demo import FIDELITY, run_demo_search
    from evomerge.recipe import Recipe

    exp = _on_test_zoo(ROOT / "experiments" / "tiny_ps_dfs.yaml", tmp_path)
    small = "{limit: 16, holdout_limit: 16}"
    sets = [
        "stages.ps.budget.evaluations=4", "stages.ps.optimizer.popsize=4", f"stages.ps.evaluator_overrides={small}",
        "stages.dfs.budget.evaluations=4", "stages.dfs.optimizer.popsize=4", f"stages.dfs.evaluator_overrides={small}",
    ]  # fmt: skip
    lines: list[str] = []
    out = run_demo_search(tmp_path / "demo", echo=lines.append, experiment=exp, sets=sets, local=True)
    text = "\n".join(lines)
    rows = {r.name: r for r in out["table"]}
    assert [r.kind for r in out["table"]][:4] == ["base", "source", "source", "source"]
    assert {"task_arithmetic_1.0", "task_arithmetic_0.5", "ties_0.5", "dare_ties_0.5"} <= set(rows)
    ps, dfs = rows["tiny_ps_dfs:ps"], rows["tiny_ps_dfs:dfs"]
    for row in (ps, dfs, rows["zoo:test/add"]):
        assert {"mean_acc", "add", "reverse", "sort"} <= set(row.search) and set(row.search) == set(row.holdout)
    assert "stage:ps" in Recipe.from_string(dfs.recipe_yaml).model_refs()
    assert out["report"].is_file() and out["report"].name == "index.html"
    model = AutoModelForCausalLM.from_pretrained(out["model"])
    assert model.config.num_hidden_layers >= 1
    assert str(out["model"].resolve()) in text and str(out["report"].resolve()) in text
    assert "zoo:test/reverse" in text and "tiny_ps_dfs:dfs" in text
    assert "documents evaluated:" in text and f"tiny_ps_dfs:ps ({FIDELITY['ps']}) documents" in text  # the demo's cheap fitness
    # a second call carries on the finished run: nothing is evaluated again
    again = run_demo_search(tmp_path / "demo", echo=lines.append, experiment=exp, sets=sets, local=True)
    assert [(r.name, r.holdout) for r in again["table"]] == [(r.name, r.holdout) for r in out["table"]]


def _results_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("experiments_results", ROOT / "experiments" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_results_budget_overrides_and_goal_check() -> None:
    results = _results_module()
    sets = results.budget_sets(ROOT / "experiments" / "tiny_ps_dfs.yaml", 4, 16, 32)
    assert "stages.ps.budget.evaluations=4" in sets and "stages.dfs.optimizer.popsize=4" in sets
    assert "stages.dfs.evaluator_overrides={limit: 16, holdout_limit: 32}" in sets
    load_experiment(ROOT / "experiments" / "tiny_ps_dfs.yaml", sets)  # the overrides are valid

    def scored(label: str, kind: str, add: float, reverse: float, sort: float) -> object:
        mean = (add + reverse + sort) / 3
        return results.Scored(label, kind, holdout=[{"add": add, "reverse": reverse, "sort": sort, "mean_acc": mean, "add_rev": 0.0}])

    models = {
        **{f"zoo:tiny/{s}": scored(f"zoo:tiny/{s}", "source", *(1.0 if t == s else 0.0 for t in results.SKILLS)) for s in results.SKILLS},
        "ta": scored("ta", "hand-set", 0.3, 0.3, 0.3),
        "PS": scored("evolved PS", "evolved", 0.95, 0.9, 0.92),
    }
    lines, met = results.goal_lines(models)
    assert met and "+62.3 points" in lines[0]
    models["PS"] = scored("evolved PS", "evolved", 0.1, 0.9, 0.92)
    lines, met = results.goal_lines(models)
    assert not met and any(line.startswith("add:") and "NOT met" in line for line in lines)
