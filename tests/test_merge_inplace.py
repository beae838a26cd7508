"""Merging straight into resident tensors: `out=` in the methods, `engine.merge_into`, WorkerCore.

What is asserted: the values are exactly those of `materialize` (bit for bit), the resident
parameters keep their storage from job to job, each method that says it can write into `out`
does (and falls back to a new tensor when `out` cannot hold the result), and merging a large
tensor into a resident target does not raise the process's peak memory by a tensor's size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.evaluate.result import EvalResult
from evomerge.merge.engine import (
    iter_merged,
    materialize,
    merge_into,
    plan_merge,
    single_threaded_torch,
)
from evomerge.merge.methods import METHODS, MergeContext, accepts_out, get_method
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import CachedSparsifier
from evomerge.recipe import Recipe
from evomerge.run.jobs import Job
from evomerge.run.worker_core import WorkerCore

from .conftest import write_llama


def ties(weights=(0.6, 0.4, 0.5), densities=(0.5, 0.7, 0.3), method: str = "ties", extra: str = "") -> Recipe:
    models = "".join(
        f"  - model: {m}\n    parameters: {{weight: {w}, density: {d}{extra}}}\n"
        for m, w, d in zip("abc", weights, densities, strict=True)
    )
    return Recipe.from_string(
        f"merge_method: {method}\nbase_model: base\nparameters: {{normalize: true}}\nmodels:\n{models}dtype: float32\n"
    )


class Constant:
    """An evaluator that only looks at nothing: the test reads the resident model itself."""

    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}

    def evaluate(self, model, tokenizer, split, subset=None, shard=None) -> EvalResult:
        return EvalResult({"score": 0.0}, {"score": True}, per_sample={"p": np.array([0.0])})


@pytest.fixture(scope="module")
def sources(llama_family) -> dict[str, str]:
    return {name: str(path) for name, path in llama_family.items()}


def test_worker_core_merges_into_its_skeleton_exactly_as_materialize(sources):
    core = WorkerCore(sources, Constant)
    recipes = [
        ties(),
        ties((0.2, 1.1, 0.7), (0.9, 0.25, 1.0)),
        ties(method="dare_ties"),
        ties(method="breadcrumbs_ties", extra=", gamma: 0.05"),
        Recipe.from_string(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.3}\n"
            "  - model: b\n    parameters: {weight: 0.9}\ndtype: float32\n"
        ),
    ]
    pointers = None
    for i, recipe in enumerate(recipes):
        assert core.run(Job(str(i), recipe, "search")).error is None
        params = dict(core.model.state_dict(keep_vars=True))
        now = {name: p.data_ptr() for name, p in params.items()}
        assert pointers is None or now == pointers  # the same storage, written in place, every job
        pointers = now
        expected = materialize(recipe, SourcePool(aliases=sources))
        assert set(expected) == set(params)
        for name, tensor in expected.items():
            assert torch.equal(params[name].detach(), tensor), (i, name)
    assert core.models_built == 1


def test_merge_into_writes_each_target_and_follows_tied_targets_in_plan_order(sources):
    pool = SourcePool(aliases=sources)
    plan = plan_merge(ties(), pool)
    expected = materialize(ties(), pool)
    targets = {name: torch.zeros_like(t) for name, t in expected.items()}
    # tie the head to the embeddings: both names write one tensor, the later task wins
    targets["lm_head.weight"] = targets["model.embed_tokens.weight"]
    pointers = {name: t.data_ptr() for name, t in targets.items()}
    written = list(merge_into(plan, pool, targets, CachedSparsifier()))
    assert written == [task.name for task in plan.tasks]
    assert {name: t.data_ptr() for name, t in targets.items()} == pointers
    order = [task.name for task in plan.tasks]
    last = max(("lm_head.weight", "model.embed_tokens.weight"), key=order.index)
    for name, tensor in expected.items():
        want = expected[last] if name in ("lm_head.weight", "model.embed_tokens.weight") else tensor
        assert torch.equal(targets[name], want), name
    # a target of another dtype is filled by a cast copy
    half = {name: torch.zeros_like(t, dtype=torch.bfloat16) for name, t in expected.items()}
    list(merge_into(plan, pool, half))
    assert all(torch.equal(half[n], t.to(torch.bfloat16)) for n, t in expected.items())


METHOD_CASES = {
    "linear": (None, {"weight": 0.7}, {}),
    "slerp": ("base", {}, {"t": 0.3}),
    "passthrough": (None, {"scale": 0.5}, {}),
    "task_arithmetic": ("base", {"weight": 0.6}, {}),
    "ties": ("base", {"weight": 0.6, "density": 0.4}, {}),
    "dare_ties": ("base", {"weight": 0.6, "density": 0.4}, {}),
    "dare_linear": ("base", {"weight": 0.6, "density": 0.4}, {}),
    "breadcrumbs": ("base", {"weight": 0.6, "density": 0.4, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ("base", {"weight": 0.6, "density": 0.4, "gamma": 0.05}, {}),
    "della": ("base", {"weight": 0.6, "density": 0.4, "epsilon": 0.1}, {}),
    "della_linear": ("base", {"weight": 0.6, "density": 0.4, "epsilon": 0.1}, {}),
}


@pytest.fixture()
def one_thread():
    """As the engine runs the methods (a torch thread team spins on a busy machine)."""
    with single_threaded_torch():
        yield


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_methods_write_into_out_or_fall_back_with_the_same_values(name: str, dtype: torch.dtype, one_thread) -> None:
    method = get_method(name)
    assert accepts_out(method)
    gen = torch.Generator().manual_seed(7)
    shape = (200, 400)  # more than one kernel chunk
    base = torch.randn(shape, generator=gen).to(dtype)
    others = [(base.float() + 0.1 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3)]
    uses_base, per_model, params = METHOD_CASES[name]
    inputs = others[:1] if name in ("slerp", "passthrough") else others
    if name == "linear":
        inputs = [base, *others]
    model_params = [dict(per_model) for _ in inputs]
    base_arg = base if uses_base else None

    def merge(out=None):
        ctx = MergeContext("model.layers.0.mlp.up_proj.weight", [(f"m{i}", "t", "b") for i in range(len(inputs))],
                           CachedSparsifier(), seed=3)
        kwargs = {} if out is None else {"out": out}
        return method.merge(base_arg, inputs, model_params, params, ctx, **kwargs)

    plain = merge()
    out = torch.full(shape, math.nan, dtype=plain.dtype)
    got = merge(out)
    assert torch.equal(got, plain)
    # linear and slerp accumulate half precision in float32: a half-precision out gets a copy
    assert (got.data_ptr() == out.data_ptr()) == (dtype == torch.float32 or name not in ("linear", "slerp"))
    wrong = torch.empty(shape, dtype=torch.float64)  # cannot hold the result as computed
    other = merge(wrong)
    assert other.data_ptr() != wrong.data_ptr() and torch.equal(other, plain)
    strided = torch.empty((shape[1], shape[0]), dtype=plain.dtype).t()  # not contiguous
    assert merge(strided).data_ptr() != strided.data_ptr()
    if uses_base:  # never into an input it reads
        aliased = base.clone() if base.dtype == plain.dtype else None
        if aliased is not None:
            res = method.merge(aliased, inputs, model_params, params,
                               MergeContext("x", [(f"m{i}", "t", "b") for i in range(len(inputs))], CachedSparsifier(), 3),
                               out=aliased)
            assert res.data_ptr() != aliased.data_ptr()


def test_every_registered_method_says_whether_it_writes_out() -> None:
    assert {name for name, m in METHODS.items() if accepts_out(m)} >= set(METHOD_CASES)
    assert not accepts_out(METHODS["model_stock"])  # computes whole-tensor statistics: a new tensor


# ---- memory: a resident target costs no full-size temporary --------------------------------


def _private() -> tuple[int, int]:
    """(now, peak) private bytes of this process, as the workers meter them (Linux)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
    peak = fields["VmHWM"] - fields.get("RssFile", 0) - fields.get("RssShmem", 0)
    return fields["RssAnon"], max(fields["RssAnon"], peak)


def _growth(fn) -> int:
    """How far this process's private memory peaks above where it stands before ``fn()``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # restart the peak (VmHWM)
    before = _private()[0]
    fn()
    return _private()[1] - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak reset")
def test_merging_a_large_tensor_into_a_resident_target_costs_no_tensor_sized_temporary(tmp_path: Path) -> None:
    vocab, hidden = 65536, 64  # embeddings and head: 4M elements, 16 MiB each in float32
    base = write_llama(tmp_path / "base", seed=0, layers=1, hidden=hidden, intermediate=16, vocab=vocab)
    paths = {"base": base, **{m: write_llama(tmp_path / m, seed=i + 1, layers=1, hidden=hidden, intermediate=16,
                                              vocab=vocab, base=base) for i, m in enumerate("abc")}}
    pool = SourcePool(aliases=paths, resident=True)
    recipe = ties()
    plan = plan_merge(recipe, pool)
    sparsifier = CachedSparsifier()
    targets = {task.name: torch.zeros(pool.get("base").get(task.name).shape) for task in plan.tasks}
    list(merge_into(plan, pool, targets, sparsifier))  # rank tables and sources now resident
    size = vocab * hidden * 4
    in_place = _growth(lambda: list(merge_into(plan_merge(ties((0.3, 0.9, 0.6)), pool), pool, targets, sparsifier)))

    def copy_results() -> None:  # the old way: a new tensor per output, then copied
        for name, tensor in iter_merged(plan_merge(ties((0.3, 0.9, 0.6)), pool), pool, sparsifier):
            targets[name].copy_(tensor)

    copied = _growth(copy_results)
    assert in_place < size // 4 < size <= copied, (in_place, copied)
    expected = materialize(ties((0.3, 0.9, 0.6)), pool, sparsifier)
    assert all(torch.equal(targets[name], tensor) for name, tensor in expected.items())
