"""Bad inputs to the real `evomerge` CLI, each answered by ONE line and exit code 2.

Every case builds its inputs in a directory of its own (the working directory while it runs),
from small checkpoints and one finished run made once per module, runs the CLI in this process
(click's CliRunner; any exception other than SystemExit is shown as a traceback) and checks:

- the exit code is 2 (a SystemExit, not an exception);
- stderr is exactly one line, starting with ``error: ``;
- that line names the file (and the field, where the input has one), and no pydantic noise;
- ``Traceback`` appears nowhere in stdout or stderr;
- nothing was touched: every file of the case's directory and of the shared inputs has the
  same size, mtime and hash afterwards, and no file or directory appeared or went away.

The cases cover recipes, experiments, ``--set`` values, damaged run directories, damaged model
directories, ``--out`` and ``--max-shard-size`` values and ``space describe``. Set
``EVOMERGE_BAD_INPUTS_LOG=DIR`` to keep each case's command, exit code, output and verdict in
``DIR/CASE.log`` (then ``grep -c Traceback DIR/*.log``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from tests.conftest import write_llama
from tests.test_run import EVALUATOR, experiment  # one PS stage over base + a, b; a cheap evaluator

NAN, INF = math.nan, math.inf


# ---- shared inputs (built once per module) ------------------------------------------------------


@dataclass
class Shared:
    fam: dict[str, Path]  # base + a, b, c: 3-layer Llama checkpoints
    qwen: Path  # a Qwen2 checkpoint with the Llama family's shapes
    wide: Path  # a Llama checkpoint with intermediate size 48 (the family has 32)
    run: Path  # a finished one-stage PS run over base + a, b
    roots: tuple[Path, ...]  # every shared directory (snapshotted around each case)


@pytest.fixture(scope="module")
def shared(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("bad-inputs-shared")
    qwen = write_llama(root / "qwen", seed=11, arch="qwen2")
    wide = write_llama(root / "wide", seed=12, intermediate=48)
    exp_file = root / "exp.yaml"
    exp_file.write_text(yaml.safe_dump(experiment(llama_family), sort_keys=False))
    run = root / "run"
    result = CliRunner().invoke(main, ["run", str(exp_file), "--out", str(run), "--local"])
    assert result.exit_code == 0, (result.output, result.exception)
    return Shared(llama_family, qwen, wide, run, (root, llama_family["base"].parent))


# ---- the context a case builds its inputs in ------------------------------------------------------


@dataclass
class Ctx:
    tmp: Path
    shared: Shared

    @property
    def fam(self) -> dict[str, Path]:
        return self.shared.fam

    def write(self, name: str, content: str | bytes | dict | list) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(yaml.safe_dump(content, sort_keys=False))
        return path

    def model(self, name: str = "m", src: str = "a") -> Path:
        """A copy of a family model, to damage."""
        return Path(shutil.copytree(self.fam[src], self.tmp / name))

    def run(self) -> Path:
        """A copy of the finished run, to damage."""
        return Path(shutil.copytree(self.shared.run, self.tmp / "run"))

    def ties(self, *models: str | Path, **params: Any) -> dict:
        """A TIES recipe over base + models (default a, b); `params` replace models[0]'s."""
        models = models or (self.fam["a"], self.fam["b"])
        entries = [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models]
        entries[0]["parameters"].update(params)
        return {"merge_method": "ties", "base_model": str(self.fam["base"]), "models": entries, "dtype": "float32"}

    def method(self, method: str, **params: Any) -> dict:
        """`ties()` with another merge method."""
        return {**self.ties(**params), "merge_method": method}

    def slices(self, *ranges: tuple[str, list]) -> dict:
        return {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(self.fam[m]), "layer_range": r}]} for m, r in ranges],
            "dtype": "float32",
        }


@dataclass
class Bad:
    """What to run and what the one line must say."""

    args: list[Any]
    file: Path | str | None  # the file (or directory, or name) the line must name
    field: str | tuple[str, ...] | None = None  # the field it must name (one of these spellings), where there is one
    says: tuple[str, ...] = ()  # more text the line must hold (what would be valid, what to do)


@dataclass
class Case:
    id: str
    owner: str  # who fixes the code behind it (see /work/notes/TEAM.md)
    build: Callable[[Ctx], Bad]


CASES: list[Case] = []


def case(case_id: str, owner: str) -> Callable[[Callable[[Ctx], Bad]], Callable[[Ctx], Bad]]:
    def register(build: Callable[[Ctx], Bad]) -> Callable[[Ctx], Bad]:
        CASES.append(Case(case_id, owner, build))
        return build

    return register


# ---- recipes: `evomerge merge RECIPE --out OUT` -----------------------------------------------------


def _recipe_case(case_id: str, owner: str, make: Callable[[Ctx], dict | list | str | bytes], field_: str | None, *says: str) -> None:
    def build(ctx: Ctx) -> Bad:
        path = ctx.write("recipe.yaml", make(ctx))
        return Bad(["merge", path, "--out", ctx.tmp / "out"], path, field_, says)

    CASES.append(Case(case_id, owner, build))


def _text(template: str) -> Callable[[Ctx], str]:
    return lambda ctx: template.format(base=ctx.fam["base"], a=ctx.fam["a"], b=ctx.fam["b"])


def _with(make: Callable[[Ctx], dict], change: Callable[[dict], Any]) -> Callable[[Ctx], dict]:
    def changed(ctx: Ctx) -> dict:
        recipe = make(ctx)
        change(recipe)
        return recipe

    return changed


_ties = lambda ctx: ctx.ties()  # noqa: E731

RECIPES: list[tuple] = [
    # file and syntax
    ("recipe-yaml-syntax", "B", _text("merge_method: ties\nmodels: [{{model: {a}\n"), None),
    ("recipe-yaml-tab-indent", "B", _text("merge_method: linear\nmodels:\n\t- model: {a}\n"), None),
    ("recipe-random-bytes", "B", lambda ctx: bytes(range(256)) * 4, None),
    ("recipe-a-list", "B", lambda ctx: [ctx.ties()], None),
    ("recipe-a-scalar", "B", lambda ctx: "just a string\n", None),
    ("recipe-empty-file", "B", lambda ctx: "", "merge_method"),
    ("recipe-unknown-top-field", "B", _with(_ties, lambda r: r.update(modles=[])), "modles"),
    ("recipe-unknown-method", "B", _with(_ties, lambda r: r.update(merge_method="tie")), "merge_method", "ties"),
    ("recipe-method-a-list", "B", _with(_ties, lambda r: r.update(merge_method=["ties"])), "merge_method"),
    ("recipe-method-missing", "B", _with(_ties, lambda r: r.pop("merge_method")), "merge_method"),
    ("recipe-models-and-slices", "B", _with(_ties, lambda r: r.update(slices=[{"sources": [{"model": r["base_model"], "layer_range": [0, 1]}]}])), "models"),
    # parameter values
    ("recipe-weight-nan", "B", lambda ctx: ctx.ties(weight=NAN), "models[0].parameters.weight"),
    ("recipe-weight-inf", "B", lambda ctx: ctx.ties(weight=INF), "models[0].parameters.weight"),
    ("recipe-weight-minus-inf", "B", lambda ctx: ctx.ties(weight=-INF), "models[0].parameters.weight"),
    ("recipe-weight-a-word", "B", lambda ctx: ctx.ties(weight="heavy"), "models[0].parameters.weight"),
    ("recipe-weight-null", "B", lambda ctx: ctx.ties(weight=None), "models[0].parameters.weight"),
    ("recipe-weight-gradient-nan", "B", lambda ctx: ctx.ties(weight=[0.5, NAN, 1.0]), "models[0].parameters.weight"),
    ("recipe-weight-gradient-empty", "B", lambda ctx: ctx.ties(weight=[]), "models[0].parameters.weight"),
    ("recipe-weight-filter-nan", "B", lambda ctx: ctx.ties(weight=[{"filter": "mlp", "value": NAN}, {"value": 1.0}]), "models[0].parameters.weight"),
    ("recipe-weight-filter-no-value", "B", lambda ctx: ctx.ties(weight=[{"filter": "mlp"}]), "models[0].parameters.weight"),
    ("recipe-weight-nested-mapping", "B", lambda ctx: ctx.ties(weight={"a": {"b": 1}}), "models[0].parameters.weight"),
    ("recipe-global-weight-inf", "B", _with(_ties, lambda r: r.update(parameters={"weight": INF})), "parameters.weight"),
    ("recipe-density-above-1", "B", lambda ctx: ctx.ties(density=1.5), "models[0].parameters.density"),
    ("recipe-density-negative", "B", lambda ctx: ctx.ties(density=-0.1), "models[0].parameters.density"),
    ("recipe-density-nan", "B", lambda ctx: ctx.ties(density=NAN), "models[0].parameters.density"),
    ("recipe-density-a-word", "B", lambda ctx: ctx.ties(density="half"), "models[0].parameters.density"),
    ("recipe-density-gradient-out-of-range", "B", lambda ctx: ctx.ties(density=[0.2, 3.0]), "models[0].parameters.density"),
    ("recipe-lambda-inf", "B", _with(_ties, lambda r: r.update(parameters={"lambda": INF})), "parameters.lambda"),
    ("recipe-normalize-a-word", "B", _with(_ties, lambda r: r.update(parameters={"normalize": "yes please"})), "parameters.normalize"),
    ("recipe-slerp-t-above-1", "B", _text("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: 2.0}}\n"), "parameters.t"),
    ("recipe-slerp-t-nan", "B", _text("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: .nan}}\n"), "parameters.t"),
    ("recipe-della-epsilon-negative", "B", lambda ctx: ctx.method("della", density=0.5, epsilon=-0.2), "models[0].parameters.epsilon"),
    ("recipe-breadcrumbs-gamma-above-1", "B", lambda ctx: ctx.method("breadcrumbs", density=0.5, gamma=1.5), "models[0].parameters.gamma"),
    # parameter names and structure
    # (`rescale` on ties is valid: mergekit 0.1.5 takes it, README's method table)
    ("recipe-ties-gamma", "B", lambda ctx: ctx.ties(gamma=0.1), "models[0].parameters.gamma", "density"),
    ("recipe-linear-density", "B", lambda ctx: {"merge_method": "linear", "models": [{"model": str(ctx.fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}}]}, "models[0].parameters.density"),
    ("recipe-slerp-weight", "B", _text("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 0.5}}}}]\nparameters: {{t: 0.5}}\n"), "models[0].parameters.weight"),
    ("recipe-unknown-param", "B", lambda ctx: ctx.ties(wieght=1.0), "models[0].parameters.wieght", "weight"),
    ("recipe-params-a-list", "B", _with(_ties, lambda r: r["models"][0].update(parameters=[1, 2])), "models[0].parameters"),
    ("recipe-models-empty-linear", "B", lambda ctx: {"merge_method": "linear", "models": []}, "models"),
    ("recipe-models-empty-ties", "B", _with(_ties, lambda r: r.update(models=[])), "models"),
    ("recipe-models-empty-task-arithmetic", "B", lambda ctx: {"merge_method": "task_arithmetic", "base_model": str(ctx.fam["base"]), "models": []}, "models"),
    ("recipe-models-a-mapping", "B", _with(_ties, lambda r: r.update(models={"model": r["base_model"]})), "models"),
    ("recipe-model-entry-without-model", "B", _with(_ties, lambda r: r["models"][1].pop("model")), "models[1].model"),
    ("recipe-model-null", "B", _with(_ties, lambda r: r["models"][1].update(model=None)), "models[1].model"),
    ("recipe-model-a-number", "B", _with(_ties, lambda r: r["models"][1].update(model=7)), "models[1].model"),
    ("recipe-model-missing-path", "B", _with(_ties, lambda r: r["models"][1].update(model="./no/such/model")), "models[1].model", "./no/such/model"),
    ("recipe-model-stage-ref", "B", _with(_ties, lambda r: r["models"][1].update(model="stage:ps")), "models[1].model", "stage:ps"),
    ("recipe-model-archive-ref", "B", _with(_ties, lambda r: r["models"][1].update(model="archive:3")), "models[1].model", "archive:3"),
    ("recipe-model-empty-string", "E", _with(_ties, lambda r: r["models"][1].update(model="")), "models[1].model"),
    ("recipe-model-zoo-unknown-preset", "E", _with(_ties, lambda r: r["models"][1].update(model="zoo:huge/add")), "models[1].model", "tiny"),
    ("recipe-model-zoo-unknown-name", "E", _with(_ties, lambda r: r["models"][1].update(model="zoo:tiny/multiply")), "models[1].model", "zoo:tiny/add"),
    ("recipe-model-hub-id-not-cached", "E", _with(_ties, lambda r: r["models"][1].update(model="nobody-xyz/not-a-model")), "models[1].model", "nobody-xyz/not-a-model"),
    ("recipe-ties-without-base", "B", _with(_ties, lambda r: r.pop("base_model")), "base_model"),
    ("recipe-base-missing-path", "B", _with(_ties, lambda r: r.update(base_model="/no/such/base")), "base_model", "/no/such/base"),
    ("recipe-passthrough-two-models", "B", lambda ctx: {"merge_method": "passthrough", "models": [{"model": str(ctx.fam["a"])}, {"model": str(ctx.fam["b"])}]}, "models"),
    ("recipe-slerp-three-models", "B", _text("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.5}}\n"), "models"),
    # dtypes, tokenizer, evomerge block
    ("recipe-dtype-typo", "B", _with(_ties, lambda r: r.update(dtype="float33")), "dtype", "float32"),
    ("recipe-dtype-fp16", "B", _with(_ties, lambda r: r.update(dtype="fp16")), "dtype", "float16"),
    ("recipe-dtype-a-number", "B", _with(_ties, lambda r: r.update(dtype=32)), "dtype"),
    ("recipe-out-dtype-typo", "B", _with(_ties, lambda r: r.update(out_dtype="bf16")), "out_dtype", "bfloat16"),
    ("recipe-tokenizer-source-nonsense", "B", _with(_ties, lambda r: r.update(tokenizer_source="no such tokenizer!")), "tokenizer_source"),
    ("recipe-tokenizer-source-missing-dir", "B", _with(_ties, lambda r: r.update(tokenizer_source="./no/tokenizer/here")), "tokenizer_source"),
    ("recipe-tokenizer-source-a-number", "B", _with(_ties, lambda r: r.update(tokenizer_source=5)), "tokenizer_source"),
    ("recipe-tokenizer-source-a-list", "B", _with(_ties, lambda r: r.update(tokenizer_source=["base"])), "tokenizer_source"),
    ("recipe-chat-template-a-number", "B", _with(_ties, lambda r: r.update(chat_template=5)), "chat_template"),
    ("recipe-evomerge-seed-a-word", "B", _with(_ties, lambda r: r.update(evomerge={"seed": "lucky"})), "evomerge.seed"),
    ("recipe-evomerge-not-a-mapping", "B", _with(_ties, lambda r: r.update(evomerge=[1])), "evomerge"),
    ("recipe-allow-mixed-a-word", "B", _with(_ties, lambda r: r.update(evomerge={"allow_mixed_architectures": "maybe"})), "evomerge.allow_mixed_architectures"),
    # slices and layer ranges
    ("recipe-slices-empty", "B", lambda ctx: {"merge_method": "passthrough", "slices": []}, "slices"),
    ("recipe-slice-sources-empty", "B", lambda ctx: {"merge_method": "passthrough", "slices": [{"sources": []}]}, "slices[0].sources"),
    ("recipe-layer-range-reversed", "B", lambda ctx: ctx.slices(("a", [2, 1])), "slices[0].sources[0].layer_range"),
    ("recipe-layer-range-negative", "B", lambda ctx: ctx.slices(("a", [-1, 2])), "slices[0].sources[0].layer_range"),
    ("recipe-layer-range-beyond-layers", "B", lambda ctx: ctx.slices(("a", [0, 2]), ("b", [1, 9])), "slices[1].sources[0].layer_range", "3"),
    ("recipe-layer-range-one-number", "B", lambda ctx: ctx.slices(("a", [1])), "slices[0].sources[0].layer_range"),
    ("recipe-layer-range-words", "B", lambda ctx: ctx.slices(("a", ["first", "last"])), "slices[0].sources[0].layer_range"),
    ("recipe-layer-ranges-differ", "B", lambda ctx: {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(ctx.fam["a"]), "layer_range": [0, 2], "parameters": {"weight": 1}},
        {"model": str(ctx.fam["b"]), "layer_range": [0, 3], "parameters": {"weight": 1}}]}]}, "slices[0].sources"),
    # sources that do not fit together
    ("recipe-mixed-architectures", "B", lambda ctx: ctx.ties(ctx.fam["a"], ctx.shared.qwen), None, "allow_mixed_architectures"),
    ("recipe-shapes-disagree", "B", lambda ctx: ctx.ties(ctx.fam["a"], ctx.shared.wide), None, "different shapes"),
]
for _row in RECIPES:
    _recipe_case(*_row)


@case("recipe-missing-file", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["merge", ctx.tmp / "nope.yaml", "--out", ctx.tmp / "out"], ctx.tmp / "nope.yaml")


@case("recipe-is-a-directory", "B")
def _(ctx: Ctx) -> Bad:
    (ctx.tmp / "recipe.yaml").mkdir()
    return Bad(["merge", ctx.tmp / "recipe.yaml", "--out", ctx.tmp / "out"], ctx.tmp / "recipe.yaml")


# ---- --out and --max-shard-size -----------------------------------------------------------------


def _good_recipe(ctx: Ctx) -> Path:
    return ctx.write("recipe.yaml", ctx.ties())


@case("out-merge-names-a-file", "A")
def _(ctx: Ctx) -> Bad:
    out = ctx.write("out", "not a directory\n")
    return Bad(["merge", _good_recipe(ctx), "--out", out], out)


@case("out-merge-foreign-nonempty-dir", "A")
def _(ctx: Ctx) -> Bad:
    ctx.write("d/keep", "x\n")
    return Bad(["merge", _good_recipe(ctx), "--out", ctx.tmp / "d"], ctx.tmp / "d")


@case("out-merge-working-directory", "A")
def _(ctx: Ctx) -> Bad:
    ctx.write("keep.txt", "mine\n")
    return Bad(["merge", _good_recipe(ctx), "--out", "."], ".")


@case("out-merge-over-a-source-model", "A")
def _(ctx: Ctx) -> Bad:
    model = ctx.model("victim")
    return Bad(["merge", _good_recipe(ctx), "--out", model], model)


@case("out-merge-parent-is-a-file", "A")
def _(ctx: Ctx) -> Bad:
    ctx.write("blocker", "x\n")
    return Bad(["merge", _good_recipe(ctx), "--out", ctx.tmp / "blocker" / "model"], ctx.tmp / "blocker")


@case("out-export-into-the-run-itself", "A")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    return Bad(["export", run, "--out", run], run)


@case("out-export-inside-the-run", "A")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    return Bad(["export", run, "--out", run / "checkpoint"], run / "checkpoint")


@case("out-export-names-a-file", "A")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    out = ctx.write("out", "x\n")
    return Bad(["export", run, "--out", out], out)


@case("out-export-foreign-nonempty-dir", "A")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    ctx.write("d/keep", "x\n")
    return Bad(["export", run, "--out", ctx.tmp / "d"], ctx.tmp / "d")


@case("out-run-names-a-file", "C")
def _(ctx: Ctx) -> Bad:
    out = ctx.write("out", "x\n")
    return Bad(["run", ctx.write("exp.yaml", experiment(ctx.fam)), "--out", out], out)


@case("out-run-foreign-nonempty-dir", "A")
def _(ctx: Ctx) -> Bad:
    ctx.write("d/keep", "x\n")
    return Bad(["run", ctx.write("exp.yaml", experiment(ctx.fam)), "--out", ctx.tmp / "d"], ctx.tmp / "d")


@case("out-report-names-a-file", "C")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    out = ctx.write("out", "x\n")
    return Bad(["report", run, "--out", out], out)


for _size, _owner in [("lots", "A"), ("-5GB", "A"), ("0", "A"), ("0MB", "A"), ("5XB", "A"), ("infGB", "A"), ("nanGB", "A"), ("", "A"), ("1e400GB", "A")]:

    def _shard_case(ctx: Ctx, size: str = _size) -> Bad:
        return Bad(["merge", _good_recipe(ctx), "--out", ctx.tmp / "out", "--max-shard-size", size], None, "--max-shard-size")

    CASES.append(Case(f"max-shard-size-{_size or 'empty'}", _owner, _shard_case))


# ---- experiments: `evomerge run EXP --out RUN` ------------------------------------------------------


@dataclass
class Whole:
    """A change that replaces the whole experiment file (other changes edit it in place)."""

    content: str | bytes | list


def _exp_case(
    case_id: str, owner: str, change: Callable[[Ctx, dict], Any], field_: str | tuple[str, ...] | None, *says: str,
    sets: tuple[str, ...] = (), names_file: bool = True,
) -> None:
    def build(ctx: Ctx) -> Bad:
        exp = experiment(ctx.fam)
        replaced = change(ctx, exp)
        path = ctx.write("exp.yaml", replaced.content if isinstance(replaced, Whole) else exp)
        args = ["run", path, "--out", ctx.tmp / "run", *[x for s in sets for x in ("--set", s)]]
        return Bad(args, path if names_file else None, field_, says)

    CASES.append(Case(case_id, owner, build))


def _stage(exp: dict) -> dict:
    return exp["stages"][0]


EXPERIMENTS: list[tuple] = [
    ("exp-yaml-syntax", "B", lambda ctx, e: Whole("name: bad\nstages: [\n"), None),
    ("exp-random-bytes", "B", lambda ctx, e: Whole(bytes(range(256)) * 4), None),
    ("exp-a-list", "B", lambda ctx, e: Whole([e]), None),
    ("exp-empty-file", "B", lambda ctx, e: Whole(""), None),
    ("exp-unknown-field", "B", lambda ctx, e: e.update(colour="red"), "colour"),
    ("exp-name-a-path", "B", lambda ctx, e: e.update(name="../escape"), "name"),
    ("exp-seed-a-word", "B", lambda ctx, e: e.update(seed="lucky"), "seed"),
    ("exp-seed-a-fraction", "B", lambda ctx, e: e.update(seed=1.5), "seed"),
    ("exp-sources-empty", "B", lambda ctx, e: e["models"].update(sources=[]), "models.sources"),
    ("exp-sources-a-string", "B", lambda ctx, e: e["models"].update(sources=str(ctx.fam["a"])), "models.sources"),
    ("exp-source-missing-path", "B", lambda ctx, e: e["models"]["sources"].append(str(ctx.tmp / "gone")), "models.sources[2]", "does not exist"),
    ("exp-source-zoo-unknown-name", "E", lambda ctx, e: e["models"]["sources"].append("zoo:tiny/multiply"), "models.sources[2]", "zoo:tiny/add"),
    ("exp-source-empty-string", "E", lambda ctx, e: e["models"]["sources"].append(""), "models.sources[2]"),
    ("exp-base-missing-for-ties", "B", lambda ctx, e: e["models"].pop("base"), "base"),
    ("exp-stages-empty", "B", lambda ctx, e: e.update(stages=[]), "stages"),
    ("exp-stages-missing", "B", lambda ctx, e: e.pop("stages"), "stages"),
    ("exp-stage-unknown-field", "B", lambda ctx, e: _stage(e).update(colour=1), "stages[0].colour"),
    ("exp-stage-names-twice", "B", lambda ctx, e: e["stages"].append(dict(_stage(e))), "stages[1]"),
    ("exp-stage-ref-not-earlier", "B", lambda ctx, e: _stage(e).update(models=["stage:later"]), "stages[0]", "stage:later"),
    ("exp-optimizer-unknown", "B", lambda ctx, e: _stage(e).update(optimizer={"name": "adam"}), "stages[0].optimizer", "cmaes"),
    ("exp-optimizer-option-unknown", "B", lambda ctx, e: _stage(e)["optimizer"].update(popsiz=4), "stages[0].optimizer.popsiz", "popsize"),
    ("exp-optimizer-a-number", "B", lambda ctx, e: _stage(e).update(optimizer=5), "stages[0].optimizer"),
    ("exp-popsize-a-word", "B", lambda ctx, e: _stage(e)["optimizer"].update(popsize="abc"), "stages[0].optimizer.popsize"),
    ("exp-popsize-zero", "B", lambda ctx, e: _stage(e)["optimizer"].update(popsize=0), "stages[0].optimizer.popsize"),
    ("exp-popsize-negative", "B", lambda ctx, e: _stage(e)["optimizer"].update(popsize=-3), "stages[0].optimizer.popsize"),
    ("exp-popsize-a-fraction", "B", lambda ctx, e: _stage(e)["optimizer"].update(popsize=2.5), "stages[0].optimizer.popsize"),
    ("exp-sigma0-nan", "B", lambda ctx, e: _stage(e)["optimizer"].update(sigma0=NAN), "stages[0].optimizer.sigma0"),
    ("exp-sigma0-negative", "B", lambda ctx, e: _stage(e)["optimizer"].update(sigma0=-1.0), "stages[0].optimizer.sigma0"),
    ("exp-budget-empty", "B", lambda ctx, e: _stage(e).update(budget={}), "stages[0].budget"),
    ("exp-budget-zero", "B", lambda ctx, e: _stage(e).update(budget={"evaluations": 0}), "stages[0].budget.evaluations"),
    ("exp-budget-a-word", "B", lambda ctx, e: _stage(e).update(budget={"evaluations": "many"}), "stages[0].budget.evaluations"),
    ("exp-budget-seconds-negative", "B", lambda ctx, e: _stage(e).update(budget={"seconds": -5}), "stages[0].budget.seconds"),
    ("exp-budget-seconds-nan", "B", lambda ctx, e: _stage(e).update(budget={"seconds": NAN}), "stages[0].budget.seconds"),
    ("exp-holdout-top-k-negative", "B", lambda ctx, e: _stage(e).update(holdout_top_k=-1), "stages[0].holdout_top_k"),
    ("exp-space-unknown", "B", lambda ctx, e: _stage(e).update(space="ps_nope"), "stages[0].space", "ps_ties"),
    ("exp-space-path-missing", "B", lambda ctx, e: _stage(e).update(space="./spaces/missing.yaml"), "stages[0].space"),
    ("exp-space-override-unknown", "B", lambda ctx, e: _stage(e).update(space_overrides={"layer_grups": 2}), "stages[0].space_overrides.layer_grups"),
    ("exp-space-override-layer-groups-zero", "B", lambda ctx, e: _stage(e).update(space_overrides={"layer_groups": 0}), "stages[0].space_overrides.layer_groups"),
    ("exp-space-genes-low-above-high", "B", lambda ctx, e: _stage(e).update(space={"kind": "ps", "method": "ties", "genes": {"weight": {"low": 1, "high": 0}, "density": {"low": 0.1, "high": 1}}}), "stages[0].space.genes.weight"),
    ("exp-space-genes-nan", "B", lambda ctx, e: _stage(e).update(space={"kind": "ps", "method": "ties", "genes": {"weight": {"low": NAN, "high": 1}, "density": {"low": 0.1, "high": 1}}}), "stages[0].space.genes.weight"),
    ("exp-space-density-genes-out-of-range", "B", lambda ctx, e: _stage(e).update(space={"kind": "ps", "method": "ties", "genes": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 4}}}), "stages[0].space.genes.density"),
    ("exp-space-method-unknown", "B", lambda ctx, e: _stage(e).update(space={"kind": "ps", "method": "tie", "genes": {"weight": {"low": 0, "high": 1}}}), "stages[0].space.method"),
    ("exp-space-kind-unknown", "B", lambda ctx, e: _stage(e).update(space={"kind": "galaxy"}), "stages[0].space.kind"),
    ("exp-evaluator-unknown", "B", lambda ctx, e: _stage(e).update(evaluator="zoo_nope"), "stages[0].evaluator", "zoo_all"),
    ("exp-evaluator-kind-unknown", "B", lambda ctx, e: _stage(e).update(evaluator={"kind": "nope"}), "stages[0].evaluator.kind"),
    ("exp-evaluator-callable-missing", "B", lambda ctx, e: _stage(e)["evaluator"].update(callable="no_such_module:score"), "stages[0].evaluator.callable"),
    ("exp-evaluator-callable-no-colon", "E", lambda ctx, e: _stage(e)["evaluator"].update(callable="tests.test_bad_inputs.score"), "stages[0].evaluator.callable"),
    ("exp-evaluator-callable-no-such-function", "E", lambda ctx, e: _stage(e)["evaluator"].update(callable="tests.test_bad_inputs:no_such_fn"), "stages[0].evaluator.callable", "no_such_fn"),
    ("exp-evaluator-callable-file-missing", "E", lambda ctx, e: _stage(e)["evaluator"].update(callable="./nope.py:score"), "stages[0].evaluator.callable", "nope.py"),
    ("exp-evaluator-callable-import-fails", "E", lambda ctx, e: (ctx.write("boom.py", "raise RuntimeError('boom at import')\n"), _stage(e)["evaluator"].update(callable=f"{ctx.tmp / 'boom.py'}:score"))[1], "stages[0].evaluator.callable", "boom at import"),
    ("exp-evaluator-objectives-empty", "E", lambda ctx, e: _stage(e)["evaluator"].update(objectives={}), "stages[0].evaluator.objectives"),
    ("exp-evaluator-objectives-a-list", "E", lambda ctx, e: _stage(e)["evaluator"].update(objectives=["acc"]), "stages[0].evaluator.objectives"),
    ("exp-evaluator-args-a-number", "E", lambda ctx, e: _stage(e)["evaluator"].update(args=5), "stages[0].evaluator.args"),
    ("exp-evaluator-classification-batch-zero", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "classification", "batch_size": 0}), "stages[0].evaluator.batch_size"),
    ("exp-evaluator-classification-same-splits", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "classification", "splits": {"search": "test", "holdout": "test"}}), "stages[0].evaluator.splits"),
    ("exp-evaluator-lmeval-tasks-empty", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "lm_eval", "tasks": []}), "stages[0].evaluator.tasks"),
    ("exp-evaluator-lmeval-task-unknown-key", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "lm_eval", "tasks": [{"task": "t", "metrc": "acc"}]}), ("stages[0].evaluator.tasks.0.metrc", "stages[0].evaluator.tasks[0].metrc")),
    ("exp-evaluator-lmeval-weight-inf", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "lm_eval", "tasks": [{"task": "t", "weight": INF}]}), ("stages[0].evaluator.tasks.0.weight", "stages[0].evaluator.tasks[0].weight")),
    ("exp-evaluator-lmeval-limit-zero", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "lm_eval", "tasks": ["t"], "limit": 0}), "stages[0].evaluator.limit"),
    ("exp-evaluator-lmeval-subsample-size-zero", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "lm_eval", "tasks": ["t"], "subsample": {"size": 0}}), "stages[0].evaluator.subsample.size"),
    ("exp-evaluator-lmeval-holdout-fraction-nan", "E", lambda ctx, e: _stage(e).update(evaluator={"kind": "lm_eval", "tasks": [{"task": "t", "partition": {"holdout_fraction": NAN}}]}), ("stages[0].evaluator.tasks.0.partition.holdout_fraction", "stages[0].evaluator.tasks[0].partition.holdout_fraction")),
    ("exp-evaluator-override-unknown", "B", lambda ctx, e: _stage(e).update(evaluator_overrides={"limt": 3}), "stages[0].evaluator_overrides.limt"),
    ("exp-ray-workers-negative", "B", lambda ctx, e: e.update(ray={"workers": -1}), "ray.workers"),
    ("exp-ray-workers-a-word", "B", lambda ctx, e: e.update(ray={"workers": "two"}), "ray.workers"),
    ("exp-dtype-typo", "B", lambda ctx, e: e.update(dtype="float33"), "dtype"),
    ("exp-device-typo", "B", lambda ctx, e: e.update(device="tpu"), "device"),
    ("exp-allow-pickle-a-word", "B", lambda ctx, e: e.update(allow_pickle="maybe"), "allow_pickle"),
    ("exp-baseline-weight-nan", "B", lambda ctx, e: e.update(baselines=[{"name": "b", "recipe": ctx.ties(weight=NAN)}]), "baselines[0].recipe"),
    ("exp-baseline-unknown-method", "B", lambda ctx, e: e.update(baselines=[{"name": "b", "recipe": {**ctx.ties(), "merge_method": "tie"}}]), "baselines[0].recipe.merge_method"),
    ("exp-mixed-architectures", "B", lambda ctx, e: e["models"]["sources"].append(str(ctx.shared.qwen)), None, "allow_mixed_architectures"),
    # --set
    ("set-popsize-a-word", "B", lambda ctx, e: None, ("stages.ps.optimizer.popsize", "stages[0].optimizer.popsize"), {"sets": ("stages.ps.optimizer.popsize=abc",)}),
    ("set-not-key-value", "B", lambda ctx, e: None, "--set", {"sets": ("stages.ps.budget.evaluations",), "names_file": False}),
    ("set-empty-key", "B", lambda ctx, e: None, "--set", {"sets": ("=5",), "names_file": False}),
    ("set-unknown-stage", "B", lambda ctx, e: None, "--set", {"sets": ("stages.nope.budget.evaluations=3",), "names_file": False}),
    ("set-index-out-of-range", "B", lambda ctx, e: None, "--set", {"sets": ("stages.5.budget.evaluations=3",), "names_file": False}),
    ("set-seed-a-word", "B", lambda ctx, e: None, "seed", {"sets": ("seed=lucky",)}),
    ("set-sources-a-number", "B", lambda ctx, e: None, "models.sources", {"sets": ("models.sources=5",)}),
    ("set-unknown-top-field", "B", lambda ctx, e: None, "colour", {"sets": ("colour=red",)}),
    ("set-budget-negative", "B", lambda ctx, e: None, ("stages.ps.budget.evaluations", "stages[0].budget.evaluations"), {"sets": ("stages.ps.budget.evaluations=-4",)}),
    ("set-sigma0-nan", "B", lambda ctx, e: None, ("stages.ps.optimizer.sigma0", "stages[0].optimizer.sigma0"), {"sets": ("stages.ps.optimizer.sigma0=.nan",)}),
    ("set-value-broken-yaml", "B", lambda ctx, e: None, "ray.workers", {"sets": ("ray.workers=[1",)}),
    ("set-through-a-scalar", "B", lambda ctx, e: None, "--set", {"sets": ("seed.value=1",), "names_file": False}),
    ("set-density-gene-out-of-range", "B", lambda ctx, e: None, "density", {"sets": ("stages.ps.space_overrides.genes.density.high=7",)}),
]
for _row in EXPERIMENTS:
    _extra = _row[-1] if isinstance(_row[-1], dict) else {}
    _exp_case(*(_row[:-1] if _extra else _row), **_extra)


def _evaluator_file_case(case_id: str, content: str | bytes) -> None:
    def build(ctx: Ctx) -> Bad:
        evaluator = ctx.write("ev.yaml", content)
        exp = experiment(ctx.fam)
        exp["stages"][0]["evaluator"] = str(evaluator)
        return Bad(["run", ctx.write("exp.yaml", exp), "--out", ctx.tmp / "run"], evaluator)

    CASES.append(Case(case_id, "E", build))


_evaluator_file_case("exp-evaluator-file-broken-yaml", "kind: python\ncallable: [\n")
_evaluator_file_case("exp-evaluator-file-random-bytes", bytes(range(256)) * 4)
_evaluator_file_case("exp-evaluator-file-a-list", "- kind: python\n")
_evaluator_file_case("exp-evaluator-file-empty", "")
_evaluator_file_case("exp-evaluator-file-unknown-key", yaml.safe_dump({**EVALUATOR, "limitt": 3}))


@case("exp-evaluator-file-missing", "E")
def _(ctx: Ctx) -> Bad:
    exp = experiment(ctx.fam)
    exp["stages"][0]["evaluator"] = str(ctx.tmp / "no-such-evaluator.yaml")
    return Bad(["run", ctx.write("exp.yaml", exp), "--out", ctx.tmp / "run"], ctx.tmp / "no-such-evaluator.yaml", "stages[0].evaluator")


@case("exp-missing-file", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["run", ctx.tmp / "missing.yaml", "--out", ctx.tmp / "run"], ctx.tmp / "missing.yaml")


@case("exp-unknown-builtin-name", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["run", "no_such_experiment", "--out", ctx.tmp / "run"], "no_such_experiment", None, ("tiny_ps",))


@case("exp-is-a-directory", "B")
def _(ctx: Ctx) -> Bad:
    (ctx.tmp / "exp.yaml").mkdir()
    return Bad(["run", ctx.tmp / "exp.yaml", "--out", ctx.tmp / "run"], ctx.tmp / "exp.yaml")


@case("resume-set-seed-refused", "C")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    return Bad(["resume", run, "--set", "seed=5", "--local"], run, "seed")


@case("resume-set-budget-a-word", "C")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    return Bad(["resume", run, "--set", "stages.ps.budget.evaluations=lots", "--local"], run, ("stages.ps.budget.evaluations", "stages[0].budget.evaluations"))


@case("resume-set-unknown-stage", "C")
def _(ctx: Ctx) -> Bad:
    run = ctx.run()
    return Bad(["resume", run, "--set", "stages.nope.budget.evaluations=9", "--local"], run, "--set")


# ---- damaged run directories: status / resume / export / report -------------------------------


def _random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _put(path: Path, content: str | bytes) -> Path:
    """Write `content` over `path`; returns `path`, the file the error must name."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _replace_with_dir(path: Path) -> Path:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")
    return path


def _sql(path: Path, *statements: str) -> Path:
    conn = sqlite3.connect(str(path))
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


CKPT = Path("checkpoint") / "state.json"
RUN_DAMAGES: list[tuple[str, str, Callable[[Path], Path], tuple[str, ...]]] = [
    # (id, owner, damage(run) -> the file the line must name, commands)
    ("checkpoint-random-bytes", "C", lambda r: _put(r / CKPT, _random_bytes()), ("status", "resume", "export")),
    ("checkpoint-truncated", "C", lambda r: _truncate(r / CKPT), ("status", "resume", "export")),
    ("checkpoint-empty", "C", lambda r: _truncate(r / CKPT, 0), ("status", "resume")),
    ("checkpoint-a-json-list", "C", lambda r: _put(r / CKPT, "[1, 2]"), ("status", "resume")),
    ("checkpoint-wrong-format", "C", lambda r: _put(r / CKPT, '{"format": "other/9"}'), ("resume",)),
    ("checkpoint-is-a-directory", "C", lambda r: _replace_with_dir(r / CKPT), ("status", "resume")),
    ("experiment-corrupt-yaml", "C", lambda r: _put(r / "experiment.yaml", "name: [unclosed\n  - x: {\n"), ("status", "resume", "export", "report")),
    ("experiment-random-bytes", "C", lambda r: _put(r / "experiment.yaml", _random_bytes()), ("status", "resume")),
    ("experiment-truncated", "C", lambda r: _truncate(r / "experiment.yaml", 0.3), ("status", "resume")),
    ("experiment-empty", "C", lambda r: _truncate(r / "experiment.yaml", 0), ("status", "resume")),
    ("experiment-not-a-mapping", "C", lambda r: _put(r / "experiment.yaml", "- 1\n- 2\n"), ("status", "resume")),
    ("experiment-schema-broken", "C", lambda r: _put(r / "experiment.yaml", yaml.safe_dump({**yaml.safe_load((r / "experiment.yaml").read_text()), "stages": 3})), ("status", "resume")),
    ("experiment-missing", "C", lambda r: (r / "experiment.yaml").unlink() or r, ("status", "resume", "export", "report")),
    ("ledger-random-bytes", "C", lambda r: _put(r / "ledger.sqlite", _random_bytes(8192)), ("status", "resume", "export", "report")),
    ("ledger-truncated", "C", lambda r: _truncate(r / "ledger.sqlite", 0.6), ("status", "resume", "export")),
    ("ledger-empty", "C", lambda r: _truncate(r / "ledger.sqlite", 0), ("status", "resume")),
    ("ledger-missing", "C", lambda r: (r / "ledger.sqlite").unlink() or r, ("status", "resume", "export")),
    ("ledger-lost-rows", "C", lambda r: _sql(r / "ledger.sqlite", "DELETE FROM evaluations WHERE candidate_id IN (0, 1)"), ("status", "resume")),
    ("ledger-table-dropped", "C", lambda r: _sql(r / "ledger.sqlite", "DROP TABLE evaluations"), ("status", "resume")),
    ("ledger-is-a-directory", "C", lambda r: _replace_with_dir(r / "ledger.sqlite"), ("status",)),
]


def _run_case(damage_id: str, owner: str, damage: Callable[[Path], Path], command: str) -> None:
    def build(ctx: Ctx) -> Bad:
        run = ctx.run()
        file = damage(run)
        args = [command, run, *(["--local"] if command == "resume" else [])]
        return Bad(args, file)

    CASES.append(Case(f"run-{damage_id}-{command}", owner, build))


for _id, _owner, _damage, _commands in RUN_DAMAGES:
    for _command in _commands:
        _run_case(_id, _owner, _damage, _command)

_NOT_RUNS: list[tuple[str, Callable[[Ctx], Path]]] = [
    ("a-file", lambda ctx: ctx.write("run", "not a run\n")),
    ("missing", lambda ctx: ctx.tmp / "no-run-here"),
    ("empty-dir", lambda ctx: (ctx.tmp / "empty").mkdir() or ctx.tmp / "empty"),
    ("a-model-dir", lambda ctx: ctx.model()),
]
for _name, _make in _NOT_RUNS:
    for _command in ("status", "resume", "export", "report"):

        def _not_run(ctx: Ctx, make: Callable[[Ctx], Path] = _make, command: str = _command) -> Bad:
            path = make(ctx)
            return Bad([command, path, *(["--local"] if command == "resume" else [])], path)

        CASES.append(Case(f"run-dir-{_name}-{_command}", "C", _not_run))


# ---- damaged model directories ------------------------------------------------------------------


def _st_split(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _st_join(file: Path, header: Any, body: bytes) -> Path:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return file


def _st_edit(model: Path, edit: Callable[[dict], Any]) -> Path:
    file = model / "model.safetensors"
    header, body = _st_split(file)
    edit(header)
    return _st_join(file, header, body)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _state(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model / "model.safetensors"))


def _sharded(model: Path) -> Path:
    """Turn the model's single file into two shards + index; returns the second shard."""
    from safetensors.torch import save_file

    full = _state(model)
    (model / "model.safetensors").unlink()
    names = sorted(full)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), start=1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({k: full[k] for k in part}, str(model / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (model / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model / "model-00002-of-00002.safetensors"


def _pickled(model: Path, *, legacy: bool = False, obj: Any = None) -> Path:
    import torch

    state = _state(model)
    (model / "model.safetensors").unlink()
    file = model / "pytorch_model.bin"
    torch.save(state if obj is None else obj, file, _use_new_zipfile_serialization=not legacy)
    return file


class NotATensor:
    """Something a weights-only unpickler refuses."""


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


def _index_missing_shard(m: Path) -> Path:
    _sharded(m).unlink()
    return m / "model-00002-of-00002.safetensors"


def _index_names_absent_tensor(m: Path) -> Path:
    _sharded(m)
    index = json.loads((m / INDEX).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (m / INDEX).write_text(json.dumps(index))
    return m / "model-00001-of-00002.safetensors"


def _pickle_index_missing_shard(m: Path) -> Path:
    """Two pickle shards and their index; the second shard is not there."""
    import torch

    state = _state(m)
    (m / ST).unlink()
    names = sorted(state)
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save({k: state[k] for k in names[::2]}, m / first)
    weight_map = {**dict.fromkeys(names[::2], first), **dict.fromkeys(names[1::2], second)}
    (m / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return m / second


def _drop_tensor(m: Path) -> Path:
    from safetensors.torch import save_file

    state = _state(m)
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    return m


ST, INDEX = "model.safetensors", "model.safetensors.index.json"
MODEL_DAMAGES: list[tuple[str, str, Callable[[Path], Path], tuple[str, ...]]] = [
    # (id, owner, damage(model dir) -> the file the line must name, extra merge args)
    ("config-missing", "E", lambda m: _unlink(m / "config.json"), ()),
    ("config-not-json", "E", lambda m: _put(m / "config.json", "{not json"), ()),
    ("config-empty", "E", lambda m: _truncate(m / "config.json", 0), ()),
    ("config-a-list", "E", lambda m: _put(m / "config.json", "[1, 2]"), ()),
    ("config-random-bytes", "E", lambda m: _put(m / "config.json", _random_bytes()), ()),
    ("config-is-a-directory", "E", lambda m: _replace_with_dir(m / "config.json"), ()),
    ("config-layers-a-word", "E", lambda m: _put(m / "config.json", json.dumps({**json.loads((m / "config.json").read_text()), "num_hidden_layers": "three"})), ()),
    ("safetensors-truncated", "E", lambda m: _truncate(m / ST, 0.7), ()),
    ("safetensors-empty", "E", lambda m: _truncate(m / ST, 0), ()),
    ("safetensors-5-bytes", "E", lambda m: _put(m / ST, b"\x01\x02\x03\x04\x05"), ()),
    ("safetensors-random-bytes", "E", lambda m: _put(m / ST, _random_bytes()), ()),
    ("safetensors-header-garbage", "E", lambda m: _put(m / ST, struct.pack("<Q", 64) + _random_bytes(64) + b"\0" * 256), ()),
    ("safetensors-header-longer-than-file", "E", lambda m: _put(m / ST, struct.pack("<Q", 10_000) + b"{}"), ()),
    ("safetensors-header-not-a-mapping", "E", lambda m: _st_join(m / ST, [1, 2, 3], b""), ()),
    ("safetensors-header-entry-without-offsets", "E", lambda m: _st_edit(m, lambda h: h[_first_tensor(h)].pop("data_offsets")), ()),
    ("safetensors-header-unknown-dtype", "E", lambda m: _st_edit(m, lambda h: h[_first_tensor(h)].update(dtype="Q17")), ()),
    ("safetensors-header-shape-vs-bytes", "E", lambda m: _st_edit(m, lambda h: h[_first_tensor(h)].update(shape=[999, 999])), ()),
    ("safetensors-header-offsets-past-end", "E", lambda m: _st_edit(m, lambda h: h[_first_tensor(h)].update(data_offsets=[0, 10**9])), ()),
    ("safetensors-is-a-directory", "E", lambda m: _replace_with_dir(m / ST), ()),
    ("index-missing-shard", "E", _index_missing_shard, ()),
    ("index-not-json", "E", lambda m: _sharded(m) and _put(m / INDEX, "{{{"), ()),
    ("index-without-weight-map", "E", lambda m: _sharded(m) and _put(m / INDEX, '{"metadata": {}}'), ()),
    ("index-shard-truncated", "E", lambda m: _truncate(_sharded(m), 0.5), ()),
    ("index-names-absent-tensor", "E", _index_names_absent_tensor, ()),
    ("no-weights", "E", lambda m: _unlink(m / ST).parent, ()),
    ("pickle-without-allow-pickle", "E", lambda m: _pickled(m), ()),
    ("pickle-truncated", "E", lambda m: _truncate(_pickled(m), 0.5), ("--allow-pickle",)),
    ("pickle-legacy-truncated", "E", lambda m: _truncate(_pickled(m, legacy=True), 0.5), ("--allow-pickle",)),
    ("pickle-random-bytes", "E", lambda m: _put(_pickled(m), _random_bytes()), ("--allow-pickle",)),
    ("pickle-not-only-tensors", "E", lambda m: _pickled(m, obj={"w": NotATensor()}), ("--allow-pickle",)),
    ("pickle-index-missing-shard", "E", _pickle_index_missing_shard, ("--allow-pickle",)),
    ("source-lacks-a-tensor", "B", _drop_tensor, ()),
]


def _model_case(damage_id: str, owner: str, damage: Callable[[Path], Path], extra: tuple[str, ...]) -> None:
    def build(ctx: Ctx) -> Bad:
        model = ctx.model()
        file = damage(model)
        recipe = ctx.write("recipe.yaml", ctx.ties(ctx.fam["b"], model))
        says = ("--allow-pickle",) if damage_id == "pickle-without-allow-pickle" else ()
        return Bad(["merge", recipe, "--out", ctx.tmp / "out", *extra], file, None, says)

    CASES.append(Case(f"model-{damage_id}", owner, build))


for _row in MODEL_DAMAGES:
    _model_case(*_row)


@case("model-ref-is-a-file", "E")
def _(ctx: Ctx) -> Bad:
    file = ctx.write("weights.safetensors", _random_bytes())
    return Bad(["merge", ctx.write("recipe.yaml", ctx.ties(ctx.fam["b"], file)), "--out", ctx.tmp / "out"], file, "models[1].model")


# `run` reads its sources before anything starts: the same damage, named by experiment field.
for _damage_id in ("config-not-json", "safetensors-truncated", "safetensors-header-garbage", "pickle-without-allow-pickle"):
    _damage = next(d for i, _, d, _ in MODEL_DAMAGES if i == _damage_id)

    def _run_model(ctx: Ctx, damage: Callable[[Path], Path] = _damage, damage_id: str = _damage_id) -> Bad:
        model = ctx.model()
        file = damage(model)
        exp = experiment(ctx.fam)
        exp["models"]["sources"][1] = str(model)
        says = ("allow_pickle: true",) if damage_id == "pickle-without-allow-pickle" else ()
        return Bad(["run", ctx.write("exp.yaml", exp), "--out", ctx.tmp / "run"], file, "models.sources[1]", says)

    CASES.append(Case(f"run-source-{_damage_id}", "E", _run_model))

# `space describe` opens its models too.
for _damage_id in ("config-missing", "config-not-json", "safetensors-truncated", "no-weights"):
    _damage = next(d for i, _, d, _ in MODEL_DAMAGES if i == _damage_id)

    def _describe_model(ctx: Ctx, damage: Callable[[Path], Path] = _damage) -> Bad:
        model = ctx.model()
        file = damage(model)
        return Bad(["space", "describe", "dfs", "--models", f"{ctx.fam['a']},{model}"], file, "--models")

    CASES.append(Case(f"describe-{_damage_id}", "E", _describe_model))


@case("describe-space-unknown", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["space", "describe", "ps_nope", "--models", f"{ctx.fam['a']},{ctx.fam['b']}"], "ps_nope", None, ("ps_ties",))


@case("describe-space-file-broken-yaml", "B")
def _(ctx: Ctx) -> Bad:
    path = ctx.write("space.yaml", "kind: ps\ngenes: {weight: [\n")
    return Bad(["space", "describe", path, "--models", f"{ctx.fam['a']},{ctx.fam['b']}"], path)


@case("describe-models-missing", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["space", "describe", "dfs", "--models", f"{ctx.fam['a']},{ctx.tmp / 'gone'}"], ctx.tmp / "gone", "--models")


@case("describe-models-empty", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["space", "describe", "dfs", "--models", " , "], None, "--models")


@case("describe-ties-without-base", "B")
def _(ctx: Ctx) -> Bad:
    return Bad(["space", "describe", "ps_ties", "--models", f"{ctx.fam['a']},{ctx.fam['b']}"], None, "--base")


# ---- running a case ----------------------------------------------------------------------------


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under the roots: files by size, mtime and hash."""
    seen: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirnames, filenames in os.walk(root):
            seen[dirpath] = ("dir",)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    seen[path] = ("link", os.readlink(path))
                    continue
                stat = os.stat(path)
                with open(path, "rb") as handle:
                    digest = hashlib.sha1(handle.read()).hexdigest()
                seen[path] = (stat.st_size, stat.st_mtime_ns, digest)
    return seen


def _sqlite_sidecar(path: str, state: tuple) -> bool:
    """SQLite's shared-memory file, or an empty write-ahead log: opening a WAL database read-only
    creates them, and they hold nothing of the user's."""
    return path.endswith("-shm") or (path.endswith("-wal") and state[0] == 0)


def _run_lock(path: str) -> bool:
    """A run directory's lock file: resume takes it before it reads the run (so that no second
    driver reads a state the first is writing), and it records who holds it."""
    return os.path.basename(path) == ".lock"


def _changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    out = [f"removed {p}" for p in before if p not in after]
    out += [f"created {p}" for p in after if p not in before and not (_sqlite_sidecar(p, after[p]) or _run_lock(p))]
    out += [f"changed {p}" for p in before if p in after and before[p] != after[p] and not _run_lock(p)]
    return out


def _names(line: str, file: Path | str, cwd: Path) -> bool:
    spellings = {str(file)}
    path = Path(file)
    if path.is_absolute() or (cwd / path).exists() or str(file).startswith((".", "/")):
        full = path if path.is_absolute() else cwd / path
        spellings |= {str(full), str(full.resolve()), os.path.relpath(full, cwd)}
    return any(s in line for s in spellings)


@dataclass
class Outcome:
    exit_code: int | None
    stdout: str
    stderr: str
    traceback: str


def _invoke(args: list[str]) -> Outcome:
    result = CliRunner().invoke(main, args)
    tb = ""
    code: int | None = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        code = None
    return Outcome(code, result.stdout, result.stderr, tb)


def _verdict(bad: Bad, out: Outcome, cwd: Path, changes: list[str]) -> list[str]:
    problems = []
    if out.exit_code != 2:
        problems.append(f"exit code {out.exit_code} (expected 2)" if out.exit_code is not None else "an exception escaped (exit 1)")
    lines = out.stderr.splitlines()
    if len(lines) != 1 or not out.stderr.endswith("\n"):
        problems.append(f"stderr has {len(lines)} lines (expected exactly one)")
    line = lines[-1] if lines else ""
    if not line.startswith("error: "):
        problems.append("the last stderr line does not start with 'error: '")
    if bad.file is not None and not _names(line, bad.file, cwd):
        problems.append(f"the line does not name the file {bad.file}")
    spellings = (bad.field,) if isinstance(bad.field, str) else bad.field or ()
    if spellings and not any(f in line for f in spellings):
        problems.append(f"the line does not name the field {' or '.join(map(repr, spellings))}")
    problems += [f"the line does not say {text!r}" for text in bad.says if text not in line]
    noise = [n for n in ("Value error, ", "pydantic", "errors.pydantic.dev", "input_value=") if n in line]
    if noise:
        problems.append(f"the line carries pydantic noise {noise}")
    if "Traceback" in out.stdout + out.stderr + out.traceback:
        problems.append("a traceback")
    problems += [f"touched: {c}" for c in changes]
    return problems


def _log(case_: Case, args: list[str], out: Outcome, problems: list[str]) -> None:
    folder = os.environ.get("EVOMERGE_BAD_INPUTS_LOG")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    verdict = "PASS" if not problems else "FAIL"
    text = [
        f"case: {case_.id}",
        f"owner: {case_.owner}",
        f"verdict: {verdict}",
        *[f"problem: {p}" for p in problems],
        f"command: evomerge {' '.join(args)}",
        f"exit code: {out.exit_code}",
        "--- stdout",
        out.stdout.rstrip(),
        "--- stderr",
        out.stderr.rstrip(),
    ]
    if out.traceback:
        text += ["--- exception", out.traceback.rstrip()]
    (Path(folder) / f"{case_.id}.log").write_text("\n".join(text) + "\n")


_IDS = [c.id for c in CASES]
assert len(set(_IDS)) == len(_IDS), "case ids must be unique"

# Issue 15's numbered findings that are bad inputs, and the cases that reproduce them. Not bad
# inputs after all: item 4's old-format .bin (it loads: test_old_format_pickle_loads_with_allow_pickle)
# and item 10's `rescale` on ties (mergekit 0.1.5 takes it; README's method table); item 4's full disk
# is test_a_full_disk_while_merging_is_one_line_and_leaves_nothing.
ISSUE_15 = {
    "1 --out deletes an existing directory": [
        "out-merge-foreign-nonempty-dir", "out-merge-working-directory", "out-export-into-the-run-itself", "out-export-foreign-nonempty-dir",
    ],
    "2 non-finite parameters": ["recipe-weight-nan", "recipe-weight-inf", "recipe-weight-minus-inf"],
    "3 a ledger that lost rows": ["run-ledger-lost-rows-status", "run-ledger-lost-rows-resume"],
    "4 tracebacks": [
        "set-popsize-a-word", "recipe-models-empty-linear", "out-merge-names-a-file",
        *(f"run-{damage}-{command}" for damage in ("checkpoint-random-bytes", "ledger-truncated") for command in ("status", "resume", "export")),
        *(f"run-experiment-corrupt-yaml-{command}" for command in ("status", "resume", "export")),
        *(f"run-ledger-random-bytes-{command}" for command in ("status", "resume", "export")),
    ],
    "5 mixed architectures": ["recipe-mixed-architectures", "exp-mixed-architectures"],
    "6 models: [] with a base": ["recipe-models-empty-ties", "recipe-models-empty-task-arithmetic"],
    "10 smaller": [
        "run-dir-empty-dir-report", "run-dir-a-model-dir-report", "exp-optimizer-option-unknown",
        "model-pickle-without-allow-pickle", "exp-name-a-path",  # the last: no pydantic "Value error, " prefix
    ],
}


def test_every_bad_input_of_the_issue_is_in_the_corpus() -> None:
    missing = [i for ids in ISSUE_15.values() for i in ids if i not in _IDS]
    assert not missing
    assert len(CASES) >= 60 + sum(len(ids) for ids in ISSUE_15.values())


@pytest.mark.parametrize("case_", CASES, ids=_IDS)
def test_bad_input_is_one_line_and_exit_2(case_: Case, shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "case"
    work.mkdir()
    monkeypatch.chdir(work)
    ctx = Ctx(work, shared)
    bad = case_.build(ctx)
    args = [str(a) for a in bad.args]
    before = _snapshot(work, *shared.roots)
    out = _invoke(args)
    changes = _changes(before, _snapshot(work, *shared.roots))
    problems = _verdict(bad, out, work, changes)
    _log(case_, args, out, problems)
    assert not problems, "\n".join([*problems, f"$ evomerge {' '.join(args)}", f"stdout: {out.stdout}", f"stderr: {out.stderr}", out.traceback])


# ---- the same through a real process, for a few cases ---------------------------------------------

REAL_PROCESS = ["recipe-yaml-syntax", "model-config-not-json", "run-checkpoint-random-bytes-status"]


@pytest.mark.parametrize("case_id", REAL_PROCESS)
def test_bad_input_in_a_real_process(case_id: str, shared: Shared, tmp_path: Path) -> None:
    """The console script, not CliRunner: nothing else reaches the terminal."""
    case_ = next(c for c in CASES if c.id == case_id)
    work = tmp_path / "case"
    work.mkdir()
    old = Path.cwd()
    os.chdir(work)
    try:
        bad = case_.build(Ctx(work, shared))
    finally:
        os.chdir(old)
    args = [str(a) for a in bad.args]
    before = _snapshot(work, *shared.roots)
    proc = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", *args], cwd=work, capture_output=True, text=True, timeout=300)
    out = Outcome(proc.returncode, proc.stdout, proc.stderr, "")
    problems = _verdict(bad, out, work, _changes(before, _snapshot(work, *shared.roots)))
    assert not problems, "\n".join([*problems, proc.stdout, proc.stderr])


def test_a_full_disk_while_merging_is_one_line_and_leaves_nothing(shared: Shared, tmp_path: Path) -> None:
    """A write that fails (here: past the file-size limit, EFBIG, as ENOSPC would) ends in one
    line naming the file, exit code 2, and no output or staging directory left behind."""
    import resource
    import signal

    work = tmp_path / "case"
    work.mkdir()
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(Ctx(work, shared).ties()))
    before = _snapshot(work, *shared.roots)

    def limit() -> None:  # in the child: files stop growing at 16 KiB, and writing past fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    args = ["merge", str(recipe), "--out", str(work / "out")]
    proc = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", *args], cwd=work, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    # The merge had started: its progress lines may come first; the error is one line after them.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("merging tensors: ")]
    stderr = "".join(line + "\n" for line in proc.stderr.splitlines() if line not in progress)
    bad = Bad(args, work, None, ("EFBIG",))
    problems = _verdict(bad, Outcome(proc.returncode, proc.stdout, stderr, ""), work, _changes(before, _snapshot(work, *shared.roots)))
    assert not problems, "\n".join([*problems, proc.stdout, proc.stderr])


# ---- not bad inputs: what the corpus' neighbours must still accept ------------------------------


def test_old_format_pickle_loads_with_allow_pickle(shared: Shared, tmp_path: Path) -> None:
    """A pre-1.6 (non-zip) `pytorch_model.bin` is a valid checkpoint: with --allow-pickle it is
    read (weights only, without memory-mapping, which that format cannot do) and merges."""
    import torch

    model = Path(shutil.copytree(shared.fam["a"], tmp_path / "legacy"))
    expected = _state(model)
    _pickled(model, legacy=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}))
    out = _invoke(["merge", str(recipe), "--out", str(tmp_path / "out"), "--allow-pickle"])
    assert out.exit_code == 0, (out.stdout, out.stderr, out.traceback)
    merged = _state(tmp_path / "out")
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor)
