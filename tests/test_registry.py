"""The optimizer and evaluator-kind registries: unknown names list the valid ones, the built-ins
are imported only when used, capabilities decide instead of names, and a user's own optimizer
and evaluator kind, registered from code, run a tiny in-process experiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.evaluate import (
    EvalResult,
    Evaluator,
    build_evaluator,
    evaluator_class,
    register_evaluator,
)
from evomerge.evaluate.base import SpecModel, Split
from evomerge.evaluate.subset import Subset
from evomerge.optim import (
    OPTIMIZERS,
    check_options,
    make_optimizer,
    optimizer_class,
    register_optimizer,
)
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.options import Option
from evomerge.registry import Registry
from tests.run_helpers import rows
from tests.test_run import experiment, score, write_exp

# ---- a user's optimizer and evaluator kind ----------------------------------------------------


class Sweep(Optimizer):
    """Uniform draws in the bounds, one per ask: the smallest optimizer a user might write."""

    name = "test_sweep"
    OPTIONS = {"batch": Option(2, "int", low=1)}

    def natural_batch(self) -> int:
        return int(self.options["batch"])

    def _propose(self, n: int) -> list[Candidate]:
        return [Candidate(id=(cid := self._new_id()), generation=cid // self.natural_batch(), genome=self.rng.uniform(self.lower, self.upper)) for _ in range(n)]

    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        return None


class LogitSpec(SpecModel):
    kind: Literal["test_logits"]
    scale: float = 1.0


class LogitEvaluator(Evaluator):
    """`tests.test_run:score` as an evaluator kind of its own."""

    kind = "test_logits"
    spec_model = LogitSpec
    PER_SAMPLE = True
    spec: LogitSpec

    def objective_directions(self) -> dict[str, bool]:
        return {"acc": True}

    def _evaluate(self, model: Any, tokenizer: Any, split: Split, subset: Subset | None, shard: tuple[int, int] | None) -> EvalResult:
        out = score(model, tokenizer, split, subset, shard)
        per = np.asarray(out["per_sample"]["t"]) * self.spec.scale
        return EvalResult(objectives={"acc": float(per.mean())}, higher_is_better={"acc": True}, per_sample={"t": per}, counts={"t": len(per)})


# ---- unknown names ------------------------------------------------------------------------------


def test_an_unknown_optimizer_or_evaluator_kind_is_one_line_listing_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_options("bayes", {})
    assert info.value.field == "optimizer" and "\n" not in str(info.value)
    assert str(info.value).endswith("unknown optimizer 'bayes'; valid: " + ", ".join(OPTIMIZERS))
    assert {"cmaes", "grid", "m2n2", "optuna", "random"} <= set(OPTIMIZERS)
    with pytest.raises(ConfigError) as info:
        build_evaluator({"kind": "lm_evl", "tasks": ["zoo_add"]})
    assert info.value.field == "kind" and "unknown evaluator kind 'lm_evl'; valid: lm_eval, classification, python" in str(info.value)
    with pytest.raises(ConfigError, match="missing; valid: lm_eval, classification, python"):
        evaluator_class(None)  # type: ignore[arg-type]

    from evomerge.config import load_experiment, resolve_experiment

    file = write_exp(tmp_path / "e.yaml", experiment({"base": tmp_path, "a": tmp_path, "b": tmp_path}))
    with pytest.raises(ConfigError) as info:
        resolve_experiment(load_experiment(file, ["stages.ps.optimizer.name=bayes"]), file=str(file))
    assert info.value.field == "stages[0].optimizer" and "valid: cmaes, grid, m2n2, optuna, random" in info.value.message


def test_registering_checks_the_entry() -> None:
    reg: Registry[Optimizer] = Registry("optimizer", Optimizer, field="optimizer")
    with pytest.raises(ValueError, match="not 'package.module:Class'"):
        reg.register("x", "no_colon")
    with pytest.raises(TypeError, match="not a subclass of Optimizer"):
        reg.register("x", dict)  # type: ignore[arg-type]
    reg.register("x", "tests.test_registry:Sweep")
    reg.register("x", "tests.test_registry:Sweep")  # the same entry again is no change
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", Sweep)
    reg.register("x", Sweep, replace=True)
    assert reg.get("x") is Sweep
    reg.register("broken", "tests.no_such_module:Thing")
    with pytest.raises(ConfigError, match=r"optimizer 'broken' \(tests.no_such_module:Thing\) cannot be imported: ModuleNotFoundError") as info:
        reg.get("broken")
    assert info.value.field == "optimizer"
    reg.register("not_an_optimizer", "tests.test_registry:LogitSpec")
    with pytest.raises(ConfigError, match="is not a subclass of Optimizer"):
        reg.get("not_an_optimizer")


# ---- lazy entries, no import cycle --------------------------------------------------------------


def test_the_registries_import_no_optimizer_or_evaluator_until_used() -> None:
    """evaluate.base imports no kind; listing names imports no optimizer or kind module."""
    code = (
        "import sys\n"
        "import evomerge.evaluate.base, evomerge.evaluate, evomerge.optim, evomerge.config\n"
        "from evomerge.optim import OPTIMIZERS\n"
        "from evomerge.evaluate import EVALUATORS\n"
        "names = list(OPTIMIZERS) + list(EVALUATORS)\n"
        "mods = ['evomerge.optim.cmaes', 'evomerge.optim.m2n2', 'evomerge.optim.optuna_study', 'evomerge.optim.simple',\n"
        "        'evomerge.evaluate.lmeval', 'evomerge.evaluate.classification', 'evomerge.evaluate.pyfunc', 'torch', 'optuna']\n"
        "print([m for m in mods if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_evaluate_has_no_import_cycle() -> None:
    """Within evomerge/evaluate: base imports no evaluator kind, and the imports form no cycle
    (a module importing the package itself depends on its __init__)."""
    import ast

    import evomerge.evaluate

    folder = Path(evomerge.evaluate.__file__).parent
    graph: dict[str, set[str]] = {}
    for file in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name == "evomerge.evaluate" or name.startswith("evomerge.evaluate."):
                    deps.add(name.split(".")[2] if name.count(".") >= 2 else "__init__")
        graph[file.stem] = deps - {file.stem}
    assert graph["base"] <= {"result", "subset"}
    assert "base" in graph["registry"] and not graph["registry"] & {"lmeval", "classification", "pyfunc"}

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        for dep in graph.get(node, ()):
            visit(dep, (*path, node))

    for module in graph:
        visit(module, ())


def test_capabilities_are_declared_by_the_classes() -> None:
    assert optimizer_class("m2n2").searches_space({"mode": "model"}) is False
    assert optimizer_class("m2n2").searches_space({}) and optimizer_class("cmaes").searches_space({"mode": "model"})
    assert optimizer_class("m2n2").NEEDS_PER_SAMPLE and not optimizer_class("cmaes").NEEDS_PER_SAMPLE
    assert optimizer_class("optuna").keeps_run_files({}) and not optimizer_class("optuna").keeps_run_files({"storage": "sqlite://"})
    assert not optimizer_class("random").keeps_run_files({})
    builtin = ["cmaes", "grid", "m2n2", "optuna", "random"]
    assert [n for n in builtin if optimizer_class(n).MULTI_OBJECTIVE] == ["grid", "optuna", "random"]
    assert [k for k in ("lm_eval", "classification", "python") if evaluator_class(k).SHARDABLE] == ["lm_eval", "classification"]
    assert all(evaluator_class(k).kind == k for k in ("lm_eval", "classification", "python"))
    with pytest.raises(ConfigError, match="for a Pareto search use grid, optuna, random"):
        make_optimizer("cmaes", dim=2, bounds=(0, 1), x0=None, seed=0, objectives={"a": True, "b": True}, multi_objective=True)


# ---- a user's own optimizer and evaluator kind in a run -----------------------------------------


def test_a_user_registered_optimizer_and_evaluator_run_in_process(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from evomerge.run.driver import start_run

    register_optimizer("test_sweep", "tests.test_registry:Sweep", replace=True)  # lazy, by its module
    register_evaluator("test_logits", LogitEvaluator, replace=True)  # the class itself
    opt = make_optimizer("test_sweep", dim=3, bounds=(0, 1), x0=None, seed=0, objectives={"acc": True}, batch=3)
    assert isinstance(opt, Sweep) and len(opt.ask()) == 3
    with pytest.raises(ConfigError, match="optimizer 'test_sweep' has no option 'popsize'; valid: batch"):
        check_options("test_sweep", {"popsize": 4})

    exp = experiment(llama_family)
    exp["stages"][0].update(optimizer={"name": "test_sweep", "batch": 2}, evaluator={"kind": "test_logits", "scale": 0.5}, budget={"evaluations": 4})
    run = tmp_path / "run"
    start_run(write_exp(tmp_path / "e.yaml", exp), out=run, echo=lambda _: None)
    search = rows(run, split="search")
    assert len(search) == 4 and all(r.status == "ok" for r in search)
    assert all(0 < r.objectives["acc"] <= 0.5 for r in search)  # scaled by the spec's 0.5
    assert rows(run, split="holdout") and (run / "best" / "scores.json").is_file()

    # the optimizer needs per-sample scores: an evaluator kind that never has them is refused up front
    class NoSamples(LogitEvaluator):
        PER_SAMPLE = False

    register_evaluator("test_logits", NoSamples, replace=True)
    try:
        exp["stages"][0].update(optimizer={"name": "m2n2", "n_init": 2}, evaluator={"kind": "test_logits"})
        with pytest.raises(ConfigError, match="learns from per-sample scores; evaluator kind 'test_logits' reports none") as info:
            start_run(write_exp(tmp_path / "m.yaml", exp), out=tmp_path / "m", echo=lambda _: None)
        assert info.value.field == "stages[0].evaluator" and not (tmp_path / "m").exists()
    finally:
        register_evaluator("test_logits", LogitEvaluator, replace=True)


def test_a_plugin_registers_an_optimizer_and_an_evaluator_kind_for_the_cli(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """`evomerge run --local` in a fresh process: the names are unknown until EVOMERGE_PLUGINS's
    module registers them; an unknown optimizer still lists the valid ones, plugins included."""
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from evomerge.evaluate import register_evaluator\n"
        "from evomerge.optim import register_optimizer\n"
        "register_optimizer('test_sweep', 'tests.test_registry:Sweep')\n"
        "register_evaluator('test_logits', 'tests.test_registry:LogitEvaluator')\n"
    )
    exp = experiment(llama_family)
    exp["stages"][0].update(optimizer={"name": "test_sweep", "batch": 2}, evaluator={"kind": "test_logits"}, budget={"evaluations": 4})
    file = write_exp(tmp_path / "e.yaml", exp)
    repo = Path(__file__).resolve().parents[1]

    def run(out: str, *sets: str, plugins: str = str(plugin)) -> subprocess.CompletedProcess:
        env = {**os.environ, "EVOMERGE_PLUGINS": plugins}
        args = [sys.executable, "-m", "evomerge.cli", "run", str(file), "--local", "--out", str(tmp_path / out)]
        return subprocess.run([*args, *(f"--set={s}" for s in sets)], cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    done = run("run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(rows(tmp_path / "run", split="search")) == 4
    refused = run("bad", "stages.ps.optimizer.name=bayes")
    assert refused.returncode == 2 and "unknown optimizer 'bayes'; valid: cmaes, grid, m2n2, optuna, random, test_sweep" in refused.stderr
    unplugged = run("none", plugins="")
    assert unplugged.returncode == 2 and "unknown optimizer 'test_sweep'; valid: cmaes, grid, m2n2, optuna, random" in unplugged.stderr
    broken = run("broken", plugins="no_such_plugin_module")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "stages[0].optimizer: plugin no_such_plugin_module failed to import: ModuleNotFoundError" in broken.stderr
