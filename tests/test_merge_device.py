"""The merge engine on a device, and its memory budgets, checked on the CPU.

The kernels, masks and sparsifiers are one device-agnostic code path: what runs on a GPU
worker is what runs here with ``device="cpu"``. What is asserted:

- every method through the device path (`iter_merged(device=, staging=)`, `merge_into` into
  resident targets, a cache with or without budget) equals the reference path
  (`materialize`, one-shot masks) bit for bit, in float32 and in bfloat16;
- 16-bit merges accumulate in float32: within 2 ulp of the exact result (float64 from the
  same inputs and masks) on all but 2% of elements, as mergekit parity is judged;
- magnitude masks of 16-bit deltas (ranked by a histogram of their 2^15 magnitudes) keep
  exactly the ranks the rank convention says, ties by lower index, whole or chunk by chunk;
- a cache over its budget falls back per tensor to one-shot selection with the same masks,
  and holds no more than its budget; DARE/DELLA masks are the same from every sparsifier;
- a worker accounts for what each part holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.merge.device import DeviceSources
from evomerge.merge.engine import (
    iter_merged,
    materialize,
    merge_into,
    plan_merge,
    single_threaded_torch,
)
from evomerge.merge.methods import MergeContext, get_method
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import CachedSparsifier, OneShotSparsifier, make_noise
from evomerge.recipe import Recipe
from evomerge.run.worker_core import WorkerCore

from .conftest import write_llama

METHODS = {
    "linear": "weight: 0.4",
    "slerp": "",
    "passthrough": "scale: 0.5",
    "model_stock": "",
    "task_arithmetic": "weight: 0.6",
    "ties": "weight: 0.6, density: 0.4",
    "dare_ties": "weight: 0.6, density: 0.4",
    "dare_linear": "weight: 0.6, density: 0.4",
    "breadcrumbs": "weight: 0.6, density: 0.4, gamma: 0.05",
    "breadcrumbs_ties": "weight: 0.6, density: 0.4, gamma: 0.05",
    "della": "weight: 0.6, density: 0.4, epsilon: 0.1",
    "della_linear": "weight: 0.6, density: 0.4, epsilon: 0.1",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base + three fine-tunes; the embeddings and head (4096 x 16) are large enough for the
    histogram-ranked masks and for several kernel chunks."""
    root = tmp_path_factory.mktemp("device-family")
    base = write_llama(root / "base", seed=0, layers=1, vocab=4096)
    return {"base": base, **{m: write_llama(root / m, seed=i + 1, layers=1, vocab=4096, base=base)
                             for i, m in enumerate("abc")}}


def recipe(method: str, dtype: str, densities=(0.4, 0.7, 0.25)) -> Recipe:
    params = METHODS[method]
    if method in ("slerp", "passthrough"):
        models = ["a"]
    elif method == "linear":
        models = ["base", "a", "b"]
    else:
        models = ["a", "b", "c"]
    lines = []
    for m, d in zip(models, densities, strict=False):
        p = params.replace("density: 0.4", f"density: {d}")
        lines.append(f"  - model: {m}\n" + (f"    parameters: {{{p}}}\n" if p else ""))
    base = "" if method in ("linear", "passthrough") else "base_model: base\n"
    glob = "parameters: {t: 0.3}\n" if method == "slerp" else ""
    return Recipe.from_string(f"merge_method: {method}\n{base}{glob}models:\n{''.join(lines)}dtype: {dtype}\nevomerge: {{seed: 5}}\n")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_the_device_path_equals_the_reference(family, method: str, dtype: str) -> None:
    pool = SourcePool(aliases=family, resident=True)
    rec = recipe(method, dtype)
    expected = materialize(rec, pool)  # the reference path: default device, one-shot masks
    plan = plan_merge(rec, pool)
    staging = DeviceSources("cpu", budget_bytes=0)
    got = dict(iter_merged(plan, pool, CachedSparsifier(), device="cpu", staging=staging, workers=2))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].device.type == "cpu" and torch.equal(got[name], tensor), (method, name)
    targets = {name: torch.full_like(t, float("nan")) for name, t in expected.items()}
    list(merge_into(plan, pool, targets, CachedSparsifier(budget_bytes=0), staging=staging))
    assert all(torch.equal(targets[n], t) for n, t in expected.items())
    assert staging.nbytes() == 0  # on the CPU the pool's tensors are used as they are


def test_sources_kept_on_the_merge_device_within_a_budget_else_streamed(family) -> None:
    """"cpu:0" is another device to `DeviceSources` (its tensors are copied there), so the keep /
    stream bookkeeping a GPU worker uses runs here too."""
    pool = SourcePool(aliases=family, resident=True)
    rec = recipe("ties", "bfloat16")
    expected = materialize(rec, pool)
    plan = plan_merge(rec, pool)
    total = sum(pool.get(r).get(n).numel() * 4 for r in family for n in pool.get(r).names)
    for budget, kept in ((None, total), (total // 3, total // 3), (0, 0)):
        staging = DeviceSources("cpu:0", budget_bytes=budget)
        for _ in range(2):  # a second candidate finds what was kept
            targets = {name: torch.empty_like(t) for name, t in expected.items()}
            list(merge_into(plan, pool, targets, CachedSparsifier(), staging=staging))
            assert all(torch.equal(targets[n], t) for n, t in expected.items())
        assert 0 < staging.nbytes() <= kept or staging.nbytes() == kept == 0
        assert (staging.streamed > 0) == (budget is not None)
        source = pool.get("base").get("model.norm.weight")
        assert staging.get(pool.get("base"), "model.norm.weight").data_ptr() != source.data_ptr()


def _within_two_ulp(got: torch.Tensor, exact: torch.Tensor, share: float = 0.02) -> bool:
    """|got - exact| <= 2 ulp of got's dtype at exact, on all but ``share`` of the elements."""
    rounded = exact.to(got.dtype)
    ulp = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"), dtype=got.dtype)) - rounded.abs()).double()
    bad = (got.double() - exact).abs() > 2 * ulp
    return float(bad.double().mean()) <= share


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "breadcrumbs", "della"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_merges_are_within_two_ulp_of_the_exact_result(method: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    shape = (300, 700)  # several kernel chunks
    base = torch.randn(shape, generator=gen).mul_(0.05).to(dtype)
    xs = [(base.double() + 0.002 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(3)]
    weights = [0.5, 0.3, 0.4]
    extra = {"ties": {"density": 0.3}, "dare_linear": {"density": 0.6}, "breadcrumbs": {"density": 0.5, "gamma": 0.02},
             "della": {"density": 0.5, "epsilon": 0.1}}.get(method, {})
    mp = [{"weight": w, **extra} for w in weights]
    spec = get_method(method)
    keys = [(f"m{i}", "t", "b") for i in range(3)]
    with single_threaded_torch():
        # without L1 rescaling (a per-tensor factor) and, but for TIES, without normalizing
        params = {"rescale": False, **({} if spec.spec.consensus else {"normalize": False})}
        got = spec.merge(base, xs, mp, params, MergeContext("w", keys, CachedSparsifier(), seed=3))
    # the exact result from the same masks: kept 16-bit deltas, weights as the kernel rounds them
    masks = [spec._mask(i, base, x, mp[i], MergeContext("w", keys, OneShotSparsifier(), seed=3), dtype)
             for i, x in enumerate(xs)]
    deltas = [(x - base).double() * (m.full(x - base).double() if m is not None else 1) for x, m in zip(xs, masks, strict=True)]
    w = torch.tensor(weights, dtype=dtype).double().tolist()
    if spec.spec.consensus:
        stacked = torch.stack([wi * d for wi, d in zip(w, deltas, strict=True)])
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
        agree = stacked.sign() == elected
        num = (stacked * agree).sum(0)
        den = (torch.tensor(w, dtype=torch.float64).view(-1, 1, 1) * agree).sum(0)
        merged = num / torch.where(den == 0, 1.0, den)
    else:
        merged = sum(wi * d for wi, d in zip(w, deltas, strict=True))
    assert _within_two_ulp(got, base.double() + merged)


def _reference_band(delta: torch.Tensor, lo: int, hi: int) -> np.ndarray:
    """Ranks [lo, hi) by |delta| descending, ties by lower index (the rank convention)."""
    mags = delta.reshape(-1).abs().float().numpy()
    order = np.argsort(-mags, kind="stable")
    keep = np.zeros(mags.size, dtype=np.float32)
    keep[order[lo:hi]] = 1
    return keep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_magnitude_masks_keep_exactly_the_ranked_band(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    delta = torch.tensor(rng.integers(-40, 41, size=(256, 300)) / 64, dtype=torch.float32).to(dtype)  # many ties
    n = delta.numel()
    flat = delta.reshape(-1)
    cached = CachedSparsifier()
    for lo, hi in [(0, 1), (0, n // 3), (n // 50, n // 2), (7, n - 5), (0, n - 1)]:
        want = _reference_band(delta, lo, hi)
        for sp in (OneShotSparsifier(), cached, CachedSparsifier(budget_bytes=0)):
            mask = sp.magnitude("k", lambda: delta, n, lo, hi)
            np.testing.assert_array_equal(mask.full(delta).reshape(-1).numpy(), want)
            mask = sp.magnitude("k", lambda: delta, n, lo, hi)  # applied chunk by chunk, as the kernels do
            applied = torch.cat([mask.apply_(s, min(n, s + 5000), flat[s:s + 5000].clone()) for s in range(0, n, 5000)])
            np.testing.assert_array_equal(applied.float().numpy(), flat.float().numpy() * want)
    assert cached.rank_computations == 1 and cached.nbytes() == (1 << 15) * 4  # one histogram, int32 counts


def test_a_cache_over_its_budget_falls_back_per_tensor_with_the_same_results(family) -> None:
    pool = SourcePool(aliases=family, resident=True)
    for method in ("ties", "breadcrumbs_ties", "della", "dare_ties"):
        for dtype in ("float32", "bfloat16"):
            rec = recipe(method, dtype)
            expected = materialize(rec, pool)
            unbounded = CachedSparsifier()
            assert all(torch.equal(t, expected[n]) for n, t in materialize(rec, pool, unbounded).items())
            for budget in (0, unbounded.nbytes() // 3):
                bounded = CachedSparsifier(budget_bytes=budget)
                for densities in ((0.4, 0.7, 0.25), (0.3, 0.5, 0.85)):  # a second candidate: cache hits and misses
                    rec = recipe(method, dtype, densities)
                    want = materialize(rec, pool)
                    got = materialize(rec, pool, bounded)
                    assert all(torch.equal(got[n], t) for n, t in want.items()), (method, dtype, budget)
                assert bounded.fallbacks > 0 and bounded.nbytes() <= budget


def test_random_masks_are_drawn_on_the_cpu_the_same_by_every_sparsifier() -> None:
    noise_id = (5, "model.layers.0.mlp.up_proj.weight", 1)
    gen = torch.Generator().manual_seed(17)
    delta = torch.randn(64, 700, generator=gen).bfloat16()
    n = delta.numel()
    assert torch.equal(make_noise(noise_id, n, "cpu"), make_noise(noise_id, n))
    sparsifiers = [OneShotSparsifier(), CachedSparsifier(), CachedSparsifier(budget_bytes=0)]
    dare = [sp.random(noise_id, n, 0.3, device=torch.device("cpu")).full(delta) for sp in sparsifiers]
    della = [sp.della("k", lambda: delta, tuple(delta.shape), noise_id, 0.4, 0.1).full(delta) for sp in sparsifiers]
    for masks in (dare, della):
        assert all(torch.equal(masks[0], m) for m in masks[1:])
        assert 0 < float(masks[0].mean()) < 1


class _Null:
    def objective_directions(self) -> dict[str, bool]:
        return {"score": True}


def test_a_worker_accounts_for_what_each_part_holds(family) -> None:
    sources = {name: str(path) for name, path in family.items()}
    core = WorkerCore(sources, _Null, device="cpu", cache_budget=200_000)
    assert core.staging is None  # the CPU merges from the pool itself
    rec = recipe("ties", "float32")
    model, _ = core.prepare(rec)
    parts = core.memory_parts()
    assert set(parts) == {"sources", "sources_on_device", "caches", "skeleton"}
    assert parts["sources_on_device"] == 0 and 0 < parts["caches"] <= 200_000
    assert parts["skeleton"] == core.model_bytes() > 0
    sizes = {t.data_ptr(): t.numel() * t.element_size() for ref in sources for t in core.pool.get(ref)._cache.values()}
    assert parts["sources"] == sum(sizes.values()) > 0
    assert core.sparsifier.fallbacks > 0
    expected = materialize(rec, SourcePool(aliases=sources))
    state = model.state_dict()
    assert all(torch.equal(state[name], t) for name, t in expected.items())


def test_sources_not_kept_resident_are_read_without_a_copy(family) -> None:
    from safetensors import safe_open

    source = SourcePool(aliases=family).get("a")
    name = "model.embed_tokens.weight"
    entry = source.entry(name)
    tensor = source.get(name)
    with safe_open(str(entry.file), framework="pt") as handle:
        stored = handle.get_tensor(name)
    assert torch.equal(tensor, stored)
    assert source.get(name).data_ptr() == tensor.data_ptr()  # one mapping of the file, no copy per read
    tensor.add_(1.0)  # a private mapping: a write never reaches the file
    with safe_open(str(entry.file), framework="pt") as handle:
        assert torch.equal(handle.get_tensor(name), stored)


def _source_bytes(pool: SourcePool, refs) -> list[int]:
    return [pool.get(r).get(n).numel() * pool.get(r).get(n).element_size() for r in refs for n in pool.get(r).names]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "della"])
def test_streamed_sources_are_copied_ahead_in_plan_order_within_their_room(family, method: str) -> None:
    """The copies a GPU worker makes on a side stream, made here synchronously on "cpu:0": in
    the order the merge uses the tensors, at most `prefetch` ahead of the last one used, within
    `prefetch_bytes`, and the results are the reference path's."""
    pool = SourcePool(aliases=family, resident=True)
    rec = recipe(method, "bfloat16")
    expected = materialize(rec, pool)
    plan = plan_merge(rec, pool)
    sizes = _source_bytes(pool, family)
    largest, total = max(sizes), sum(sizes)
    for budget, room, depth in ((largest, largest, 3), (largest + 4096, largest, 8), (total // 3, largest, 2)):
        staging = DeviceSources("cpu:0", budget_bytes=budget, prefetch=depth, prefetch_bytes=room)
        room = staging.prefetch_bytes
        for candidate in range(2):  # the second finds what the first kept
            staging.trace = []
            targets = {name: torch.full_like(t, float("nan")) for name, t in expected.items()}
            list(merge_into(plan, pool, targets, CachedSparsifier(), staging=staging, workers=1))
            assert all(torch.equal(targets[n], t) for n, t in expected.items()), (method, budget, candidate)
            uses = [p for event, p in staging.trace if event == "use"]
            assert uses == sorted(uses) and len(uses) == sum(1 + len(t.inputs) for t in plan.tasks)
            fetched = [p for event, p in staging.trace if event == "prefetch"]
            assert fetched and fetched == sorted(set(fetched))  # in order, each once
            last_used = -1
            for event, p in staging.trace:
                if event == "use":
                    last_used = p
                else:
                    assert last_used < p <= last_used + depth  # ahead of use, never further than depth
                    assert ("use", p) in staging.trace[staging.trace.index((event, p)):]
            assert staging.in_flight_bytes() == 0  # nothing left over once the merge is done
        assert 0 < staging.peak_in_flight_bytes <= room
        assert staging.nbytes() + room <= budget  # kept tensors leave the prefetch room free
        assert staging.prefetched > 0 and staging.streamed >= staging.prefetched


def test_copies_ahead_give_the_same_results_from_threads_and_iter_merged(family) -> None:
    pool = SourcePool(aliases=family, resident=True)
    for method in ("breadcrumbs_ties", "slerp"):
        rec = recipe(method, "float32")
        expected = materialize(rec, pool)
        plan = plan_merge(rec, pool)
        room = max(_source_bytes(pool, family))
        staging = DeviceSources("cpu:0", budget_bytes=room, prefetch=4, prefetch_bytes=room)  # keeps nothing
        got = dict(iter_merged(plan, pool, CachedSparsifier(), staging=staging, workers=2))
        assert all(torch.equal(got[n], t) for n, t in expected.items()), method
        targets = {name: torch.empty_like(t) for name, t in expected.items()}
        list(merge_into(plan, pool, targets, OneShotSparsifier(), staging=staging, workers=3))
        assert all(torch.equal(targets[n], t) for n, t in expected.items()), method
        assert staging.prefetched > 0 and staging.in_flight_bytes() == 0 and staging.nbytes() == 0
    streaming = DeviceSources.streaming("cpu:0")  # what iter_merged uses on a device given no staging
    assert streaming.prefetch_bytes == streaming.budget_bytes and not streaming._fits(1)


def _f32_deltas() -> dict[str, torch.Tensor]:
    """float32 deltas large enough for the compact rank cache (over 2^16 elements), with ties:
    a few values repeated (whole 16-bit bins tied), a normal sample whose values share bins
    but not values, and a mix (ties inside a bin with other values)."""
    rng = np.random.default_rng(5)
    shape = (300, 700)
    normal = rng.standard_normal(shape).astype(np.float32) * 0.01
    mixed = normal.copy()
    mixed[rng.random(shape) < 0.3] = np.float32(0.0071)  # one value tied 63,000 times, inside a busy bin
    mixed[rng.random(shape) < 0.05] = 0.0
    return {
        "ties": torch.tensor(rng.integers(-40, 41, size=shape) / 64, dtype=torch.float32),
        "normal": torch.tensor(normal),
        "mixed": torch.tensor(mixed),
    }


def test_f32_magnitude_masks_from_the_compact_cache_keep_exactly_the_ranked_band() -> None:
    cached = CachedSparsifier()
    for label, delta in _f32_deltas().items():
        n = delta.numel()
        flat = delta.reshape(-1)
        bands = [(0, 0), (0, 1), (0, 2), (0, 7), (0, n // 1000), (0, n // 3), (0, n // 2), (0, n - 1), (0, n),
                 (1, n // 2), (n // 50, n // 2), (7, n - 5), (n // 3, n - 1)]  # TIES (0, k); breadcrumbs bands
        for lo, hi in bands:
            want = _reference_band(delta, lo, hi)
            for sp in (cached, OneShotSparsifier()):
                mask = sp.magnitude(label, lambda d=delta: d, n, lo, hi)
                np.testing.assert_array_equal(mask.full(delta).reshape(-1).numpy(), want, err_msg=f"{label} {lo} {hi}")
                mask = sp.magnitude(label, lambda d=delta: d, n, lo, hi)  # chunk by chunk, as the kernels apply it
                if mask.all_kept or mask.none_kept:  # the kernels skip these
                    continue
                applied = torch.cat([mask.apply_(s, min(n, s + 5000), flat[s:s + 5000].clone()) for s in range(0, n, 5000)])
                np.testing.assert_array_equal(applied.numpy(), flat.numpy() * want, err_msg=f"{label} {lo} {hi}")
    assert cached.rank_computations == 3  # one table per tensor, whatever the densities
    assert cached.nbytes() == 3 * (1 << 16) * 4  # 256 KiB each (int32 counts), not 4 bytes per element


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs", "della", "dare_ties"])
def test_f32_merges_from_the_compact_cache_equal_the_one_shot_selection(method: str) -> None:
    deltas = list(_f32_deltas().values())
    base = torch.tensor(np.random.default_rng(9).standard_normal((300, 700)).astype(np.float32))
    xs = [base + d for d in deltas]
    extra = {"breadcrumbs_ties": {"gamma": 0.01}, "breadcrumbs": {"gamma": 0.05}, "della": {"epsilon": 0.05}}.get(method, {})
    keys = [(f"m{i}", "t", "b") for i in range(3)]
    spec = get_method(method)
    cached = CachedSparsifier()
    edges = ((0.06, 0.94, 0.5), (1.0, 0.9, 0.051)) if method == "della" else ((1e-5, 0.999999, 0.5), (1.0, 0.9, 2e-4))
    for densities in ((0.4, 0.7, 0.25), *edges):  # della: density +- epsilon within (0, 1)
        mp = [{"weight": w, "density": d, **extra} for w, d in zip((0.5, 0.3, 0.4), densities, strict=True)]
        with single_threaded_torch():
            want = spec.merge(base, xs, mp, {}, MergeContext("w", keys, OneShotSparsifier(), seed=3))
            got = spec.merge(base, xs, mp, {}, MergeContext("w", keys, cached, seed=3))
        assert torch.equal(got, want), (method, densities)
    if spec.spec.sparsify in ("magnitude", "outliers"):
        assert cached.rank_computations == 3 and cached.nbytes() == 3 * (1 << 16) * 4
