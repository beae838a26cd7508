"""WorkerCore in process (what every Ray actor and the local pool run): no Ray needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.evaluate.result import EvalResult
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.recipe import Recipe
from evomerge.run.jobs import Job
from evomerge.run.worker_core import WorkerCore
from evomerge.run.worker_store import pack_source, unpack

TIES = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.6, density: 0.5}\n  - model: b\n    parameters: {weight: 0.4, density: 0.7}\ndtype: float32\n"
PATH = "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 3]}]\n  - sources: [{model: b, layer_range: [2, 3]}]\ndtype: float32\n"


class Logits:
    """The mean logit of a fixed batch; `subset` may ask for NaN or an exception."""

    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}

    def evaluate(self, model, tokenizer, split, subset=None, shard=None) -> EvalResult:
        if subset == "raise":
            raise RuntimeError("evaluator broke")
        ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
        value = math.nan if subset == "nan" else float(model(ids).logits.double().mean())
        return EvalResult({"score": value}, {"score": True}, per_sample={"p": np.array([value])})


@pytest.fixture(scope="module")
def sources(llama_family) -> dict[str, str]:
    return {name: str(path) for name, path in llama_family.items()}


def test_core_scores_the_merge_as_written_to_disk(sources, tmp_path):
    core = WorkerCore(sources, Logits)
    recipe = Recipe.from_string(TIES)
    result = core.run(Job("j", recipe, "search"))
    written = write_model(recipe, SourcePool(aliases=sources), tmp_path / "merged")
    with torch.no_grad():
        expected = Logits().evaluate(AutoModelForCausalLM.from_pretrained(written), None, "search")
    assert result.error is None
    assert result.objectives["score"] == pytest.approx(expected.objectives["score"], rel=1e-6)


def test_one_resident_skeleton_per_architecture(sources):
    core = WorkerCore(sources, Logits)
    ties, path = Recipe.from_string(TIES), Recipe.from_string(PATH)
    core.run(Job("1", ties, "search"))
    model = core.model
    core.run(Job("2", Recipe.from_string(TIES.replace("0.6", "0.2")), "search"))
    assert core.model is model and core.models_built == 1  # same architecture: weights copied in
    assert core.sparsifier.rank_computations == 2 * len(list(model.state_dict()))  # ranks once per source tensor
    deeper = core.run(Job("3", path, "search"))
    assert deeper.error is None and core.model.config.num_hidden_layers == 4 and core.models_built == 2
    assert core.model_bytes() > 0


def test_failures_come_back_as_failed_results(sources):
    core = WorkerCore(sources, Logits)
    recipe = Recipe.from_string(TIES)
    broken = core.run(Job("x", recipe, "search", "raise"))
    assert "evaluator broke" in broken.error and broken.objectives == {"score": -math.inf}
    nan = core.run(Job("n", recipe, "search", "nan"))
    assert "nan" in nan.error.lower() and nan.failed
    # a recipe built in code skips the parse-time checks; the plan's own range check fails it
    out_of_range = recipe.model_copy(deep=True)
    out_of_range.models[0].parameters["density"] = 1.5
    bad = core.run(Job("b", out_of_range, "search"))
    assert bad.failed and "density" in bad.error
    assert core.run(Job("ok", recipe, "search")).error is None


def test_adopted_tensors_give_the_same_result(sources):
    """Sources adopted from packed (object-store style) read-only arrays merge identically."""
    packed = {ref: pack_source(ref, path, lambda a: a.copy()) for ref, path in sources.items()}
    for entry in packed.values():
        for array in entry["objects"]:
            array.flags.writeable = False  # as the object store hands them out
    tensors = {ref: unpack(p["index"], p["objects"]) for ref, p in packed.items()}
    shared = WorkerCore(sources, Logits, tensors=tensors)
    plain = WorkerCore(sources, Logits)
    for text in (TIES, PATH):
        job = Job("j", Recipe.from_string(text), "search")
        assert shared.run(job).objectives == plain.run(job).objectives


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_magnitude_tables_sort_like_the_bit_patterns(dtype):
    """The cached magnitude tables (numpy's in-place sort) order |delta| as float32 bit
    patterns do: ascending, +0 first, +inf then NaN last; the caller's tensor is untouched."""
    from evomerge.merge.sparsify import sorted_magnitudes

    delta = torch.randn(5000, generator=torch.Generator().manual_seed(3)).to(dtype)
    delta[[5, 7, 9, 11]] = torch.tensor([math.nan, -math.inf, -0.0, 0.0]).to(dtype)
    before = delta.clone()
    table = sorted_magnitudes(delta)
    expected = torch.sort(delta.abs().float().view(torch.int32)).values.view(torch.float32)
    assert table.dtype == torch.float32 and table.shape == (5000,)
    torch.testing.assert_close(table, expected, rtol=0, atol=0, equal_nan=True)  # NaN payloads may differ
    assert not torch.signbit(table).any()
    assert torch.equal(delta.isnan(), before.isnan()) and torch.equal(delta.nan_to_num(), before.nan_to_num())
