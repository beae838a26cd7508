"""Every recipe, search-space and experiment parameter is checked before any work starts.

Recipes: every value of every parameter (scalar, gradient anchor, `{filter, value}`, at the top
level, under `models[i]`, `slices[i]`, `slices[i].sources[j]`) is valid for the parameter's
declaration in `evomerge.merge.specs` (weights finite, density and t in [0, 1], booleans as
booleans); `models: []`, `slices: []` and `sources: []` are refused for every method; sources of
different architectures are refused unless the recipe allows them. Search spaces: bounds finite
and valid for the parameter. Experiments: numbers finite, optimizer options checked (type,
range), all of it before a zoo is built or a model or dataset is loaded.

Each CLI case asserts exit code 2, exactly one line on stderr naming the file and the field, no
"Traceback", no pydantic "Value error, " prefix, and that nothing was written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.plan import MixedArchitectureWarning, plan_merge
from evomerge.merge.sources import SourcePool
from evomerge.merge.specs import METHOD_SPECS
from evomerge.recipe import InputModel, Recipe
from tests.conftest import write_llama

EVALUATOR = {"kind": "python", "callable": "tests.test_run:score", "objectives": {"acc": True}}
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, out: str, err: str, file: Path | str, field: str | None, *words: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    line = err.strip()
    assert str(file) in line, line
    if field is not None:
        assert f": {field}: " in line, line
    assert "Value error" not in line and "Input should be" not in line, line
    for word in words:
        assert word in line, line
    return line


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def models_recipe(family: dict[str, Path], method: str, params: dict | None = None, **top) -> dict:
    """A `models:` recipe over the family's a and b (base: the family's base where needed)."""
    spec = METHOD_SPECS[method]
    entry = {"weight": 0.5} if any(p.name == "weight" for p in spec.model_params) else {}
    data: dict = {"merge_method": method}
    if spec.requires_base:
        data["base_model"] = str(family["base"])
    names = ["a"] if method in ("slerp", "passthrough") else ["a", "b"]
    data["models"] = [{"model": str(family[n]), "parameters": {**entry, **(params or {})} or None} for n in names]
    for m in data["models"]:
        if m["parameters"] is None:
            del m["parameters"]
    if method == "slerp":
        data["parameters"] = {"t": 0.5}
    data.update(top)
    return data


# ---- 1. non-finite and out-of-range recipe parameters --------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]
PLACES = {
    # where the value goes -> (recipe changes, the field the error names)
    "top-level": (lambda f, v: {"parameters": {"weight": v}}, "parameters.weight"),
    "models[1]": (lambda f, v: {"models": [{"model": str(f["a"]), "parameters": {"weight": 1.0}}, {"model": str(f["b"]), "parameters": {"weight": v}}]}, "models[1].parameters.weight"),
    "gradient": (lambda f, v: {"models": [{"model": str(f["a"]), "parameters": {"weight": [0.2, v, 0.4]}}]}, "models[0].parameters.weight[1]"),
    "condition": (
        lambda f, v: {"models": [{"model": str(f["a"]), "parameters": {"weight": [{"filter": "mlp", "value": v}, {"value": 1.0}]}}]},
        "models[0].parameters.weight[0].value",
    ),
    "slices[0]": (
        lambda f, v: {"models": None, "slices": [{"sources": [{"model": str(f["a"]), "layer_range": [0, 3]}], "parameters": {"weight": v}}]},
        "slices[0].parameters.weight",
    ),
    "slices[0].sources[1]": (
        lambda f, v: {
            "models": None,
            "slices": [{"sources": [
                {"model": str(f["a"]), "layer_range": [0, 3], "parameters": {"weight": 1.0}},
                {"model": str(f["b"]), "layer_range": [0, 3], "parameters": {"weight": v}},
            ]}],
        },
        "slices[0].sources[1].parameters.weight",
    ),  # fmt: skip
}


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("place", list(PLACES))
def test_non_finite_weight_is_refused_everywhere(llama_family: dict[str, Path], tmp_path: Path, place: str, value: float) -> None:
    change, field = PLACES[place]
    data = {"merge_method": "linear", "models": [{"model": str(llama_family["a"]), "parameters": {"weight": 1.0}}]}
    data.update(change(llama_family, value))
    data = {k: v for k, v in data.items() if v is not None}
    recipe = write_yaml(tmp_path / "r.yaml", data)
    out = tmp_path / "out"
    line = assert_one_line_error(*run_cli("merge", recipe, "--out", out), recipe, field, "weight must be a finite number")
    assert str(value) in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("method", "params", "top", "field", "valid"),
    [
        ("ties", {"density": 1.5}, {}, "models[0].parameters.density", "in [0, 1]"),
        ("dare_ties", {"density": -0.1}, {}, "models[0].parameters.density", "in [0, 1]"),
        ("ties", {"density": math.nan}, {}, "models[0].parameters.density", "in [0, 1]"),
        ("slerp", {}, {"parameters": {"t": 1.5}}, "parameters.t", "in [0, 1]"),
        ("slerp", {}, {"parameters": {"t": [0.0, math.nan]}}, "parameters.t[1]", "in [0, 1]"),
        ("breadcrumbs", {"gamma": 1.0}, {}, "models[0].parameters.gamma", "in [0, 1)"),
        ("della", {"epsilon": math.inf}, {}, "models[0].parameters.epsilon", "finite number >= 0"),
        ("ties", {}, {"parameters": {"lambda": math.nan}}, "parameters.lambda", "a finite number"),
        ("ties", {}, {"parameters": {"normalize": 1}}, "parameters.normalize", "true or false"),
        ("linear", {}, {"parameters": {"normalize": "no"}}, "parameters.normalize", "true or false"),
        ("model_stock", {}, {"parameters": {"filter_wise": [True, False]}}, "parameters.filter_wise", "true or false"),
        ("passthrough", {"scale": math.inf}, {}, "models[0].parameters.scale", "a finite number"),
        ("linear", {"weight": True}, {}, "models[0].parameters.weight", "a finite number"),
        ("linear", {"weight": []}, {}, "models[0].parameters.weight", "empty list"),
    ],
)
def test_out_of_range_parameters_name_what_is_valid(
    llama_family: dict[str, Path], tmp_path: Path, method: str, params: dict, top: dict, field: str, valid: str
) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", models_recipe(llama_family, method, params, **top))
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, field, valid)
    assert not (tmp_path / "out").exists()


def test_the_declaration_is_the_one_check(llama_family: dict[str, Path]) -> None:
    """A recipe built in code skips Recipe.check; planning reads the same declarations."""
    pool = SourcePool()
    recipe = Recipe(merge_method="linear", models=[InputModel(model=str(llama_family["a"]), parameters={"weight": math.nan})])
    with pytest.raises(ConfigError, match="weight must be a finite number, got nan"):
        plan_merge(recipe, pool)
    ties = Recipe.parse(models_recipe(llama_family, "ties", {"density": 0.5}))
    bad = ties.model_copy(update={"parameters": {"density": 2.0}, "models": [InputModel(model=str(llama_family["a"]), parameters={"weight": 1.0})]})
    with pytest.raises(ConfigError, match=r"density must be in \[0, 1\], got 2.0"):
        plan_merge(bad, pool)
    plan_merge(ties, pool)  # valid values plan


def test_della_joint_rule_is_checked_when_planning(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """density - epsilon > 0 and density + epsilon < 1 (each valid alone): refused by the plan,
    before a tensor is read (it used to fail while merging)."""
    recipe = write_yaml(tmp_path / "r.yaml", models_recipe(llama_family, "della", {"density": 0.1}))
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, "parameters", "density - epsilon > 0", "epsilon=0.15")
    assert not (tmp_path / "out").exists()


def test_valid_edge_values_still_merge(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """Negative weights (as mergekit allows), density 0 and 1, t 0 and 1 are valid."""
    for name, data in {
        "neg": models_recipe(llama_family, "task_arithmetic", {"weight": -0.5}),
        "d0": models_recipe(llama_family, "ties", {"density": 0.0}),
        "t1": models_recipe(llama_family, "slerp", parameters={"t": [0.0, 1.0]}),
    }.items():
        recipe = write_yaml(tmp_path / f"{name}.yaml", data)
        code, out, err = run_cli("merge", recipe, "--out", tmp_path / name)
        assert code == 0, err
        assert (tmp_path / name / "config.json").is_file()


# ---- 2. empty models / slices / sources ----------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_empty_models_are_refused_for_every_method(llama_family: dict[str, Path], tmp_path: Path, method: str) -> None:
    data = models_recipe(llama_family, method)
    data["models"] = []
    data.setdefault("base_model", str(llama_family["base"]))  # with a base: no copy of it either
    recipe = write_yaml(tmp_path / "r.yaml", data)
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, "models", "empty")
    assert not (tmp_path / "out").exists()


def test_only_the_base_is_not_a_merge(llama_family: dict[str, Path], tmp_path: Path) -> None:
    data = models_recipe(llama_family, "ties")
    data["models"] = [{"model": str(llama_family["base"]), "parameters": {"weight": 1.0}}]
    recipe = write_yaml(tmp_path / "r.yaml", data)
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, "models", "besides base_model")


@pytest.mark.parametrize(
    ("slices", "field"),
    [([], "slices"), ([{"sources": []}], "slices[0].sources")],
)
def test_empty_slices_and_sources_are_refused(llama_family: dict[str, Path], tmp_path: Path, slices: list, field: str) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", {"merge_method": "passthrough", "slices": slices})
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, field, "empty")


def test_empty_models_in_code_do_not_reach_the_engine(llama_family: dict[str, Path]) -> None:
    """StopIteration before: plan_merge of a recipe built in code without models."""
    with pytest.raises(ConfigError, match="merges no model"):
        plan_merge(Recipe(merge_method="linear", models=[]), SourcePool())


# ---- 3. mixed architectures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed")
    return {"llama": write_llama(root / "llama", seed=1), "qwen": write_llama(root / "qwen", seed=2, arch="qwen2")}


def test_mixed_architectures_are_refused(mixed: dict[str, Path], tmp_path: Path) -> None:
    data = {"merge_method": "linear", "models": [{"model": str(mixed["llama"]), "parameters": {"weight": 0.5}}, {"model": str(mixed["qwen"]), "parameters": {"weight": 0.5}}]}
    recipe = write_yaml(tmp_path / "r.yaml", data)
    line = assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, "models", "different architectures", "allow_mixed_architectures")
    assert f"'{mixed['llama']}' (llama" in line and f"'{mixed['qwen']}' (qwen2" in line
    assert not (tmp_path / "out").exists()


def test_allowed_mixed_architectures_take_the_base_and_warn(mixed: dict[str, Path], tmp_path: Path) -> None:
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(mixed["llama"]),
        "models": [{"model": str(mixed["qwen"]), "parameters": {"weight": 0.5}}],
        "evomerge": {"allow_mixed_architectures": True},
    }
    recipe = write_yaml(tmp_path / "r.yaml", data)
    code, out, err = run_cli("merge", recipe, "--out", tmp_path / "out")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.*.self_attn.{proj}.bias" in lines[0]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama"
    # in code: a MixedArchitectureWarning, not an error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_merge(Recipe.parse(data), SourcePool())
    assert [w.category for w in caught] == [MixedArchitectureWarning]


def test_allow_mixed_architectures_is_a_declared_boolean(mixed: dict[str, Path], tmp_path: Path) -> None:
    data = {"merge_method": "linear", "models": [{"model": str(mixed["llama"]), "parameters": {"weight": 1.0}}], "evomerge": {"allow_mixed_architectures": "sure"}}
    recipe = write_yaml(tmp_path / "r.yaml", data)
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, "evomerge.allow_mixed_architectures")


# ---- 4. parameters per method match mergekit 0.1.5 --------------------------------------------------


def test_declared_parameters_are_mergekits() -> None:
    """mergekit 0.1.5 (merge_methods/generalized_task_arithmetic.py, registry.py): every task-
    arithmetic method takes int8_mask, normalize, rescale, lambda, weight, density; gamma only
    the breadcrumbs pair, epsilon only the DELLA pair; linear weight/normalize, slerp t,
    model_stock filter_wise, passthrough scale. `rescale` is used by every sparsifying method
    (ties included: mergekit's magnitude() rescales the kept entries); without sparsification
    (task_arithmetic) density and rescale are accepted and inert."""
    names = {m: {p.name for p in (*s.model_params, *s.global_params)} for m, s in METHOD_SPECS.items()}
    family = {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"}
    for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        assert names[method] == family
    assert names["breadcrumbs"] == names["breadcrumbs_ties"] == family | {"gamma"}
    assert names["della"] == names["della_linear"] == family | {"epsilon"}
    assert names["linear"] == {"weight", "normalize"} and names["slerp"] == {"t"}
    assert names["model_stock"] == {"filter_wise"} and names["passthrough"] == {"scale"}
    inert = {m: {p.name for p in (*s.model_params, *s.global_params) if p.inert} for m, s in METHOD_SPECS.items()}
    assert inert["task_arithmetic"] == {"density", "rescale", "int8_mask"}
    assert inert["ties"] == {"int8_mask"}


def test_ties_rescale_is_mergekits_l1_rescale() -> None:
    """TIES with rescale: true = each trimmed task vector times |delta|_1 / |trimmed|_1, then the
    sign election and disjoint mean (mergekit 0.1.5: sparsify(..., rescale_norm=l1))."""
    import torch

    from evomerge.merge.methods import MergeContext, get_method

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(40, 16, generator=gen)
    xs = [base + 0.1 * torch.randn(40, 16, generator=gen) for _ in range(3)]
    weights, density = [1.0, 0.7, 0.4], 0.3
    method = get_method("ties")
    glob = {p.name: p.default for p in method.global_params}

    def merged(rescale: bool) -> np.ndarray:
        ctx = MergeContext(tensor_name="model.layers.0.mlp.up_proj.weight", keys=[0, 1, 2])
        params = [{"weight": w, "density": density} for w in weights]
        return method.merge(base, xs, params, {**glob, "rescale": rescale}, ctx).numpy()

    b = base.numpy().astype(np.float64)
    deltas = []
    for x, w in zip(xs, weights, strict=True):
        d = x.numpy().astype(np.float64) - b
        k = int(density * d.size)
        keep = np.zeros(d.size, bool)
        keep[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = True
        t = np.where(keep.reshape(d.shape), d, 0.0)
        deltas.append(w * t * np.abs(d).sum() / np.abs(t).sum())
    stack = np.stack(deltas)
    sign = np.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stack) == sign
    w = np.array(weights)[:, None, None] * agree
    den = w.sum(0)
    want = b + (stack * agree).sum(0) / np.where(den == 0, 1.0, den)
    np.testing.assert_allclose(merged(True), want, rtol=1e-4, atol=1e-5)
    assert np.abs(merged(True) - merged(False)).max() > 1e-3  # rescale is used, not just accepted


# ---- search spaces ------------------------------------------------------------------------------------

SPACE_CASES = [
    ({"kind": "ps", "method": "ties", "genes": {"weight": {"low": 0.0, "high": math.inf}}}, "genes.weight.high", "finite"),
    ({"kind": "ps", "method": "ties", "genes": {"weight": {"low": math.nan, "high": 1.0}}}, "genes.weight.low", "finite"),
    ({"kind": "ps", "method": "ties", "genes": {"density": {"low": 0.1, "high": 1.5}}}, "genes.density.high", "density must be in [0, 1]"),
    ({"kind": "ps", "method": "slerp", "genes": {"t": {"low": -0.5, "high": 0.5}}}, "genes.t.low", "t must be in [0, 1]"),
    ({"kind": "ps", "method": "ties", "genes": {"normalize": {"low": 0.0, "high": 1.0}}}, "genes.normalize", "fixed"),
    ({"kind": "ps", "method": "task_arithmetic", "genes": {"density": {"low": 0.1, "high": 1.0}}}, "genes.density", "no effect"),
    ({"kind": "ps", "method": "ties", "genes": {"weight": {"low": 0.0, "high": 1.0}}, "fixed": {"lambda": math.nan}}, "fixed.lambda", "finite"),
    ({"kind": "ps", "method": "tie", "genes": {"weight": {"low": 0.0, "high": 1.0}}}, "method", "valid:"),
    ({"kind": "ps", "method": "ties", "genes": {"weight": {"low": 1.0, "high": 0.0}}}, "genes.weight", "must be below"),
    ({"kind": "dfs", "scale_range": {"low": 0.0, "high": 2.0}}, "scale_range.low", "> 0"),
    ({"kind": "weights", "bound": math.inf}, "bound", "finite"),
]


@pytest.mark.parametrize(("space", "field", "word"), SPACE_CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(SPACE_CASES)])
def test_space_bounds_are_checked_against_the_declarations(llama_family: dict[str, Path], tmp_path: Path, space: dict, field: str, word: str) -> None:
    file = write_yaml(tmp_path / "space.yaml", space)
    models = f"{llama_family['a']},{llama_family['b']}"
    assert_one_line_error(*run_cli("space", "describe", file, "--models", models, "--base", llama_family["base"]), file, field, word)


# ---- experiments: finite numbers, optimizer options, static checks first ---------------------------


def experiment(family: dict[str, Path], **stage_changes) -> dict:
    stage = {"name": "ps", "space": "ps_ties", "evaluator": dict(EVALUATOR), "optimizer": {"name": "cmaes", "popsize": 4}, "budget": {"evaluations": 8}}
    stage.update(stage_changes)
    return {"name": "t", "seed": 0, "models": {"base": str(family["base"]), "sources": [str(family["a"]), str(family["b"])]}, "stages": [stage]}


EXPERIMENT_CASES = [
    ([], {"budget": {"seconds": math.inf}}, "stages[0].budget.seconds", "finite"),
    ([], {"budget": {"evaluations": math.nan}}, "stages[0].budget.evaluations", None),
    (["--set", "stages.ps.optimizer.popsize=abc"], {}, "stages[0].optimizer.popsize", "an integer >= 2"),
    (["--set", "stages.ps.optimizer.popsize=1"], {}, "stages[0].optimizer.popsize", "at least 2"),
    (["--set", "stages.ps.optimizer.sigma0=.nan"], {}, "stages[0].optimizer.sigma0", "finite number > 0"),
    (["--set", "stages.ps.optimizer.diagonal=maybe"], {}, "stages[0].optimizer.diagonal", "true or false"),
    (["--set", "stages.ps.optimizer.bogus=1"], {}, "stages[0].optimizer.bogus", "no option 'bogus'"),
    (["--set", "stages.ps.optimizer.name=bayes"], {}, "stages[0].optimizer", "unknown optimizer"),
    ([], {"optimizer": {"name": "optuna", "sampler": "gp"}}, "stages[0].optimizer.sampler", "unknown optuna sampler 'gp'"),
    ([], {"optimizer": {"name": "m2n2", "alpha": -1}}, "stages[0].optimizer.alpha", ">= 0"),
    ([], {"space_overrides": {"genes": {"weight": {"low": 0.0, "high": math.inf}}}}, "stages[0].space_overrides.genes.weight.high", "finite"),
    ([], {"space": "ps_slerp", "space_overrides": {"genes": {"t": {"low": 0.0, "high": 2.0}}}}, "stages[0].space_overrides.genes.t.high", "in [0, 1]"),
    ([], {"evaluator": {"kind": "python"}}, "stages[0].evaluator.callable", "required"),
    (["--set", "ray.num_cpus_per_worker=.inf"], {}, "ray.num_cpus_per_worker", "finite"),
]


@pytest.mark.parametrize(("sets", "change", "field", "word"), EXPERIMENT_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(EXPERIMENT_CASES)])
def test_bad_experiment_numbers_and_options(llama_family: dict[str, Path], tmp_path: Path, sets: list, change: dict, field: str, word: str | None) -> None:
    exp = write_yaml(tmp_path / "e.yaml", experiment(llama_family, **change))
    run = tmp_path / "run"
    words = [word] if word else []
    assert_one_line_error(*run_cli("run", exp, "--out", run, "--local", *sets), exp, field, *words)
    assert not run.exists()


def test_baseline_recipes_are_checked_with_the_experiment(llama_family: dict[str, Path], tmp_path: Path) -> None:
    data = experiment(llama_family)
    data["baselines"] = [{"name": "nan", "recipe": models_recipe(llama_family, "ties", {"weight": math.nan})}]
    exp = write_yaml(tmp_path / "e.yaml", data)
    assert_one_line_error(*run_cli("run", exp, "--out", tmp_path / "run"), exp, "baselines[0].recipe.models[0].parameters.weight", "finite")


def test_static_problems_are_found_before_any_model_is_opened(tmp_path: Path) -> None:
    """Sources that do not exist and a zoo that is not built: the optimizer option, the space
    bound, the baseline, the evaluator and a fidelity strategy the evaluator cannot serve are
    reported first (nothing is built or loaded)."""
    missing = {"base": "zoo:tiny/base", "a": str(tmp_path / "no-a"), "b": str(tmp_path / "no-b")}
    for sets, change, field in [
        (["--set", "stages.ps.optimizer.bogus=1"], {}, "stages[0].optimizer.bogus"),
        ([], {"space_overrides": {"genes": {"density": {"low": 0.0, "high": 2.0}}}}, "stages[0].space_overrides.genes.density.high"),
        ([], {"evaluator": {"kind": "nope"}}, "stages[0].evaluator.kind"),
        ([], {"fidelity": "racing"}, "stages[0].fidelity"),  # the python evaluator cannot select documents
    ]:
        exp = write_yaml(tmp_path / "e.yaml", experiment(missing, **change))
        assert_one_line_error(*run_cli("run", exp, "--out", tmp_path / "run", *sets), exp, field)
    assert not (tmp_path / "run").exists()


def test_unknown_option_is_reported_in_about_the_import_time(tmp_path: Path) -> None:
    """`evomerge run experiments/tiny_ps.yaml --set stages.ps.optimizer.bogus=1` in a real
    process, with an empty cache (the zoo unbuilt): the error comes before any zoo build or
    model load, within the time the imports take (a zoo build takes minutes)."""
    env = {"EVOMERGE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from evomerge.cli import main; main()", "run", str(REPO / "experiments" / "tiny_ps.yaml"),
         "--set", "stages.ps.optimizer.bogus=1", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "stages[0].optimizer.bogus: optimizer 'cmaes' has no option 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stdout == ""
    assert not (tmp_path / "cache" / "zoo").exists() and not (tmp_path / "run").exists()
    assert elapsed < 30, elapsed


# ---- 5. one formatting path: no pydantic prefixes -----------------------------------------------------


def test_validator_messages_carry_no_pydantic_prefix(llama_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(llama_family["a"]), "layer_range": [2, 1]}]}]})
    assert_one_line_error(*run_cli("merge", recipe, "--out", tmp_path / "out"), recipe, "slices[0].sources[0].layer_range", "layer_range must be")
    space = write_yaml(tmp_path / "s.yaml", {"kind": "ps", "method": "ties", "genes": {"weight": {"low": 0.0, "high": 1.0, "init": 2.0}}})
    models = f"{llama_family['a']},{llama_family['b']}"
    assert_one_line_error(*run_cli("space", "describe", space, "--models", models, "--base", llama_family["base"]), space, "genes.weight", "init (2.0)")
    exp = write_yaml(tmp_path / "e.yaml", experiment(llama_family, budget={}))
    assert_one_line_error(*run_cli("run", exp, "--out", tmp_path / "run"), exp, "stages[0].budget", "give evaluations")
    with pytest.raises(EvomergeError) as caught:
        Recipe.from_string("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nevomerge: {seed: x}", file="r.yaml")
    assert "Value error" not in str(caught.value) and str(caught.value).startswith("r.yaml: evomerge.seed: ")


# ---- files that are not YAML, --set keys, options named as options -------------------------------------


def test_files_that_are_not_text_are_one_line(llama_family: dict[str, Path], tmp_path: Path) -> None:
    junk = bytes(range(256)) * 4
    for name in ("r.yaml", "s.yaml", "e.yaml"):
        (tmp_path / name).write_bytes(junk)
    models = f"{llama_family['a']},{llama_family['b']}"
    assert_one_line_error(*run_cli("merge", tmp_path / "r.yaml", "--out", tmp_path / "out"), tmp_path / "r.yaml", None, "not a text file")
    assert_one_line_error(*run_cli("space", "describe", tmp_path / "s.yaml", "--models", models), tmp_path / "s.yaml", None, "not a text file")
    assert_one_line_error(*run_cli("run", tmp_path / "e.yaml", "--out", tmp_path / "run"), tmp_path / "e.yaml", None, "not a text file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_set_keys_and_overrides_are_named(llama_family: dict[str, Path], tmp_path: Path) -> None:
    exp = write_yaml(tmp_path / "e.yaml", experiment(llama_family))
    for bad in ("=5", "stages..budget=3", "stages.ps.=3"):
        code, out, err = run_cli("run", exp, "--out", tmp_path / "run", "--set", bad)
        assert_one_line_error(code, out, err, "", "--set", "empty key")
    exp = write_yaml(tmp_path / "o.yaml", experiment(llama_family, evaluator_overrides={"objectivs": {"acc": True}}))
    assert_one_line_error(*run_cli("run", exp, "--out", tmp_path / "run"), exp, "stages[0].evaluator_overrides.objectivs")
    assert not (tmp_path / "run").exists()


def test_space_describe_names_its_options(llama_family: dict[str, Path]) -> None:
    models = f"{llama_family['a']},{llama_family['b']}"
    line = assert_one_line_error(*run_cli("space", "describe", "ps_ties", "--models", models), "ps_ties.yaml", "--base", "needs a base model")
    assert "models.base" not in line
