"""Merge methods against independent hand computations on small tensors.

Every expected value here is computed a second, deliberately plain way: Python loops or numpy
formulas written from the papers and mergekit's documented behaviour (TIES: trim, elect sign,
disjoint mean; breadcrumbs: drop the gamma largest, keep the next density; DARE: Bernoulli
keep with L1 rescale; DELLA: keep probability graded by in-row magnitude rank; Model Stock:
t from the mean pairwise cosine; SLERP: great-circle interpolation). None of it reuses the
kernels under test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods import METHODS, MergeContext, UnknownMethodError, get_method, slerp
from evomerge.merge.sparsify import CachedSparsifier, OneShotSparsifier, Sparsifier
from evomerge.recipe import Recipe

# ---- helpers -------------------------------------------------------------------------------


def run(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[dict],
    params: dict | None = None,
    *,
    sparsifier: Sparsifier | None = None,
    seed: int = 0,
    name: str = "model.layers.0.mlp.up_proj.weight",
) -> torch.Tensor:
    ctx = MergeContext(
        tensor_name=name,
        keys=[(f"model{i}", name, "base") for i in range(len(tensors))],
        sparsifier=sparsifier if sparsifier is not None else OneShotSparsifier(),
        seed=seed,
    )
    return get_method(method).merge(base, list(tensors), list(model_params), params or {}, ctx)


def rand(shape: tuple[int, ...], seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(scale * rng.standard_normal(shape), dtype=dtype)


def family(shape: tuple[int, ...], n: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    base = rand(shape, seed, dtype=dtype)
    return base, [base + rand(shape, seed + 1 + i, 0.1, dtype=dtype) for i in range(n)]


def top_k_by_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep the max(1, int(density * n)) largest |delta| (ties: lower index first)."""
    flat = delta.reshape(-1)
    n = flat.size
    if density >= 1:
        return delta.copy()
    k = max(1, int(density * n)) if density > 0 else 0
    order = sorted(range(n), key=lambda j: (-abs(flat[j]), j))
    out = np.zeros(n)
    for j in order[:k]:
        out[j] = flat[j]
    return out.reshape(delta.shape)


def breadcrumbs_band(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: drop the int(gamma n) largest |delta| and keep the next int(density n)."""
    flat = delta.reshape(-1)
    n = flat.size
    if density >= 1:
        return delta.copy()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)  # outlier removal shrinks to keep the density
    ascending = sorted(range(n), key=lambda j: abs(flat[j]))
    out = np.zeros(n)
    for j in ascending[n_bot:n_bot + target]:
        out[j] = flat[j]
    return out.reshape(delta.shape)


def disjoint_merge(trimmed: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    """TIES elect + disjoint merge, element by element, on weighted trimmed task vectors."""
    shape = trimmed[0].shape
    flats = [w * t.reshape(-1) for t, w in zip(trimmed, weights, strict=True)]
    out = np.zeros(flats[0].size)
    for j in range(out.size):
        values = [f[j] for f in flats]
        elected = 1.0 if sum(values) >= 0 else -1.0
        agree = [i for i, v in enumerate(values) if np.sign(v) == elected]
        num = sum(values[i] for i in agree)
        den = sum(weights[i] for i in agree)
        out[j] = num / (den if den != 0 else 1.0) if normalize else num
    return out.reshape(shape)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ---- linear, task arithmetic, normalize, lambda ------------------------------------------


def test_linear_weighted_average_by_hand() -> None:
    xs = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, -2.0], [5.0, 1.0]]), torch.tensor([[2.0, 2.0], [2.0, 2.0]])]
    ws = [1.0, 2.0, 3.0]
    got = run("linear", None, xs, [{"weight": w} for w in ws])
    # element [0][1]: (1*2 + 2*-2 + 3*2) / 6 = 4/6
    assert got[0, 1].item() == pytest.approx(4 / 6)
    expected = [[sum(w * float(x[i, j]) for w, x in zip(ws, xs, strict=True)) / sum(ws) for j in range(2)] for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(expected))
    raw = run("linear", None, xs, [{"weight": w} for w in ws], {"normalize": False})
    torch.testing.assert_close(raw, torch.tensor(expected) * 6)


def test_linear_half_precision_is_computed_in_float32() -> None:
    xs = [torch.full((4,), 1000.0, dtype=torch.float16), torch.full((4,), 1001.0, dtype=torch.float16)]
    got = run("linear", None, xs, [{"weight": 0.5}, {"weight": 0.5}])
    assert got.dtype == torch.float16
    assert got[0].item() == 1000.5  # fp16 holds 1000.5 exactly; a fp16 accumulation of 500+500.5 would not


def test_task_arithmetic_normalize_and_lambda_by_hand() -> None:
    base, xs = family((3, 4), 3, seed=1)
    ws = [0.5, -0.3, 0.4]
    deltas = [np_(x) - np_(base) for x in xs]
    plain = np_(base) + sum(w * d for w, d in zip(ws, deltas, strict=True))
    torch.testing.assert_close(np_(run("task_arithmetic", base, xs, [{"weight": w} for w in ws])), plain)
    normalized = np_(base) + sum(w * d for w, d in zip(ws, deltas, strict=True)) / sum(ws)
    got = run("task_arithmetic", base, xs, [{"weight": w} for w in ws], {"normalize": True})
    torch.testing.assert_close(np_(got), normalized)
    scaled = np_(base) + 0.7 * sum(w * d for w, d in zip(ws, deltas, strict=True))
    torch.testing.assert_close(np_(run("task_arithmetic", base, xs, [{"weight": w} for w in ws], {"lambda": 0.7})), scaled)
    # weights summing to ~0 with normalize: the sum is left undivided rather than exploding
    zero = run("task_arithmetic", base, xs[:2], [{"weight": 1.0}, {"weight": -1.0}], {"normalize": True})
    torch.testing.assert_close(np_(zero), np_(base) + deltas[0] - deltas[1])


def test_task_arithmetic_float32_matches_float64_reference() -> None:
    base, xs = family((5, 7), 2, seed=3, dtype=torch.float32)
    got = run("task_arithmetic", base, xs, [{"weight": 0.25}, {"weight": 0.75}])
    assert got.dtype == torch.float32 and got.shape == (5, 7)
    want = np_(base) + 0.25 * (np_(xs[0]) - np_(base)) + 0.75 * (np_(xs[1]) - np_(base))
    np.testing.assert_allclose(np_(got), want, rtol=1e-6, atol=1e-6)


# ---- TIES ----------------------------------------------------------------------------------


def test_ties_tiny_example_written_out() -> None:
    """Three task vectors of four entries, every step visible."""
    base = torch.zeros(4, dtype=torch.float64)
    d1 = torch.tensor([0.5, -1.0, 0.1, 2.0], dtype=torch.float64)  # density 0.5 keeps -1.0, 2.0
    d2 = torch.tensor([-0.4, 0.3, -3.0, 1.0], dtype=torch.float64)  # keeps -3.0, 1.0
    d3 = torch.tensor([1.0, 0.2, 0.6, -0.1], dtype=torch.float64)  # density 1: all kept
    got = run("ties", base, [d1, d2, d3], [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0}])
    # trimmed: t1 = [0, -1, 0, 2], t2 = [0, 0, -3, 1], t3 = [1, .2, .6, -.1]
    # elected sign of the sums [1, -0.8, -2.4, 2.9] -> [+, -, -, +]
    # entry 0: only t3 (+1) agrees -> 1/1; entry 1: t1 (-1) -> -1/1
    # entry 2: t2 (-3) agrees -> -3; entry 3: t1 (2), t2 (1) agree -> 3/2
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, -3.0, 1.5], dtype=torch.float64))
    no_norm = run(
        "ties", base, [d1, d2, d3], [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0}],
        {"normalize": False},
    )
    torch.testing.assert_close(no_norm, torch.tensor([1.0, -1.0, -3.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.4], [1.0, -0.6, 0.8], [0.0, 0.5, 0.5]])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_trim_elect_disjoint_mean(weights: list[float], normalize: bool) -> None:
    base, xs = family((6, 5), 3, seed=5)
    densities = [0.5, 0.7, 0.2]
    got = run("ties", base, xs, [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)], {"normalize": normalize})
    trimmed = [top_k_by_magnitude(np_(x) - np_(base), d) for x, d in zip(xs, densities, strict=True)]
    want = np_(base) + disjoint_merge(trimmed, weights, normalize)
    np.testing.assert_allclose(np_(got), want, rtol=1e-12, atol=1e-12)


def test_ties_float32_and_lambda() -> None:
    base, xs = family((8, 9), 3, seed=7, dtype=torch.float32)
    densities, weights = [0.3, 0.6, 0.9], [0.5, 0.3, 0.4]
    got = run("ties", base, xs, [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)], {"lambda": 1.3})
    trimmed = [top_k_by_magnitude(np_(x) - np_(base), d) for x, d in zip(xs, densities, strict=True)]
    want = np_(base) + 1.3 * disjoint_merge(trimmed, weights, True)
    np.testing.assert_allclose(np_(got), want, rtol=1e-5, atol=1e-6)


def test_ties_density_keeps_at_least_one_and_zero_keeps_none() -> None:
    base = torch.zeros(10, dtype=torch.float64)
    x = torch.arange(1.0, 11.0, dtype=torch.float64)
    tiny = run("ties", base, [x], [{"weight": 1.0, "density": 0.01}])  # int(0.1) = 0 -> at least 1
    assert torch.count_nonzero(tiny) == 1 and tiny[9] == 10
    assert torch.count_nonzero(run("ties", base, [x], [{"weight": 1.0, "density": 0.0}])) == 0


def test_ties_with_magnitude_ties_in_a_large_tensor() -> None:
    """Many equal |delta| across chunk boundaries: the k kept are the largest, ties by lower index."""
    rng = np.random.default_rng(11)
    shape = (400, 400)  # larger than the kernel's chunk and the direct-selection limit
    base = torch.zeros(shape, dtype=torch.float32)
    d = torch.tensor(rng.integers(-4, 5, size=shape), dtype=torch.float32)  # only 9 distinct values
    got = run("ties", base, [d], [{"weight": 1.0, "density": 0.37}], {"normalize": False})
    flat = d.reshape(-1).numpy()
    k = int(0.37 * flat.size)
    order = np.argsort(-np.abs(flat), kind="stable")  # descending |d|, lower index first on ties
    want = np.zeros_like(flat)
    want[order[:k]] = flat[order[:k]]
    np.testing.assert_array_equal(got.reshape(-1).numpy(), want)


# ---- breadcrumbs -----------------------------------------------------------------------------


def test_breadcrumbs_drops_outliers_and_keeps_density_written_out() -> None:
    base = torch.zeros(10, dtype=torch.float64)
    # magnitudes 0.1 .. 1.0 in scrambled order, signs mixed
    d = torch.tensor([0.3, -1.0, 0.5, 0.1, -0.9, 0.7, -0.2, 0.8, 0.4, -0.6], dtype=torch.float64)
    got = run("breadcrumbs", base, [d], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    # n = 10: drop int(0.1*10) = 1 largest (-1.0), keep the next int(0.5*10) = 5: -0.9, 0.8, 0.7, -0.6, 0.5
    want = torch.tensor([0.0, 0.0, 0.5, 0.0, -0.9, 0.7, 0.0, 0.8, 0.0, -0.6], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    # density 0.95 leaves room for no outlier removal: n_bot = max(0, 10 - 9 - 1) = 0 -> keep 9 smallest
    high = run("breadcrumbs", base, [d], [{"weight": 1.0, "density": 0.95, "gamma": 0.1}])
    torch.testing.assert_close(high, torch.where(d.abs() < 1.0, d, torch.zeros_like(d)))
    # default gamma is 0.01: with 10 elements int(0.1) = 0, so nothing is dropped as an outlier
    default = run("breadcrumbs", base, [d], [{"weight": 1.0, "density": 0.3}])
    torch.testing.assert_close(default, torch.where(d.abs() >= 0.8, d, torch.zeros_like(d)))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_band_reference(method: str) -> None:
    base, xs = family((10, 12), 3, seed=13)
    settings = [(0.5, 0.3, 0.05), (-0.2, 0.6, 0.1), (0.8, 0.25, 0.0)]  # weight, density, gamma
    got = run(method, base, xs, [{"weight": w, "density": d, "gamma": g} for w, d, g in settings])
    kept = [breadcrumbs_band(np_(x) - np_(base), d, g) for x, (_, d, g) in zip(xs, settings, strict=True)]
    weights = [w for w, _, _ in settings]
    if method == "breadcrumbs":  # normalize off by default: a plain weighted sum
        merged = sum(w * k for w, k in zip(weights, kept, strict=True))
    else:
        merged = disjoint_merge(kept, weights, normalize=False)
    np.testing.assert_allclose(np_(got), np_(base) + merged, rtol=1e-12, atol=1e-12)


# ---- DARE ------------------------------------------------------------------------------------


def dare_delta(seed: int, method: str = "dare_linear", **params) -> tuple[np.ndarray, np.ndarray]:
    base, xs = family((40, 50), 1, seed=17)
    got = run(method, base, xs, [{"weight": 1.0, "density": 0.3}], params, seed=seed)
    return np_(got) - np_(base), np_(xs[0]) - np_(base)


def test_dare_is_seeded_and_reproducible() -> None:
    a, _ = dare_delta(seed=1)
    b, _ = dare_delta(seed=1)
    c, _ = dare_delta(seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a != 0, c != 0)
    # two models in one merge draw independent masks
    base = torch.zeros(2000, dtype=torch.float64)
    ones = torch.ones(2000, dtype=torch.float64)
    m0 = run("dare_linear", base, [ones], [{"weight": 1.0, "density": 0.5}], {"rescale": False}, seed=3)
    m1 = run("dare_linear", base, [ones, ones], [{"weight": 0.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
             {"rescale": False}, seed=3)
    assert 0.2 < float(((m0 != 0) & (m1 != 0)).double().mean()) < 0.3  # ~0.25 when independent


def test_dare_keeps_density_and_rescales_by_l1_ratio() -> None:
    got, delta = dare_delta(seed=4)
    kept = got != 0
    n = kept.size
    frac = kept.mean()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    # mergekit's rescale: kept entries times |delta|_1 / |kept delta|_1 (close to 1 / density)
    factor = np.abs(delta).sum() / np.abs(delta[kept]).sum()
    np.testing.assert_allclose(got[kept], delta[kept] * factor, rtol=1e-12)
    assert abs(factor * 0.3 - 1) < 0.1
    raw, _ = dare_delta(seed=4, rescale=False)
    np.testing.assert_array_equal(raw != 0, kept)
    np.testing.assert_allclose(raw[kept], delta[kept], rtol=1e-12)


def test_dare_linear_is_unbiased() -> None:
    """Mean over many seeds -> the task vector itself, within the sampling error."""
    seeds = 150
    samples = np.stack([dare_delta(seed=s)[0] for s in range(seeds)])
    _, delta = dare_delta(seed=0)
    p = 0.3
    sd = np.abs(delta) * math.sqrt((1 - p) / (p * seeds))  # sd of the mean of delta * Bernoulli(p) / p
    z = (samples.mean(axis=0) - delta) / sd
    assert np.abs(z).max() < 5.5
    assert abs(np.mean(z)) < 5 / math.sqrt(z.size)  # no bias overall
    assert 0.85 < np.std(z) < 1.15  # and the spread DARE's variance predicts


def test_dare_ties_applies_consensus_after_the_drop() -> None:
    base = torch.zeros(1000, dtype=torch.float64)
    pos = torch.ones(1000, dtype=torch.float64)
    neg = -2 * torch.ones(1000, dtype=torch.float64)
    mp = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    got = run("dare_ties", base, [pos, neg], mp, {"rescale": False}, seed=9)
    lin = run("dare_linear", base, [pos, neg], mp, {"rescale": False}, seed=9)
    # the same masks: where both survive the sum is -1 and -2 wins alone; elsewhere it is the survivor
    both = (lin == -1)
    assert both.any()
    assert torch.all(got[both] == -2)
    assert torch.all(got[~both] == lin[~both])


# ---- DELLA -----------------------------------------------------------------------------------


def della_rows(rows: int = 600, cols: int = 5, seed: int = 0) -> torch.Tensor:
    """Each row a permutation of 1..cols, so rank positions are known."""
    rng = np.random.default_rng(seed)
    return torch.tensor(np.stack([rng.permutation(cols) + 1.0 for _ in range(rows)]), dtype=torch.float64)


def test_della_keep_probability_grows_with_row_rank() -> None:
    d = della_rows()
    base = torch.zeros_like(d)
    density, eps, seeds = 0.5, 0.2, 20
    kept = torch.zeros_like(d)
    for s in range(seeds):
        out = run("della_linear", base, [d], [{"weight": 1.0, "density": density, "epsilon": eps}], {"rescale": False}, seed=s)
        assert torch.all((out == 0) | (out == d))  # no rescale: kept entries unchanged
        kept += (out != 0).double()
    freq = kept / seeds
    samples = d.shape[0] * seeds
    for rank in range(5):  # value rank+1 is the rank-th smallest of its row
        want = density - eps + 2 * eps * rank / 4  # 0.3, 0.4, 0.5, 0.6, 0.7
        got = float(freq[d == rank + 1].mean())
        assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / samples), (rank, got, want)


def test_della_reproducible_and_rescaled() -> None:
    base, xs = family((30, 20), 1, seed=21)
    mp = [{"weight": 1.0, "density": 0.4, "epsilon": 0.1}]
    a = run("della_linear", base, xs, mp, seed=5)
    torch.testing.assert_close(a, run("della_linear", base, xs, mp, seed=5), rtol=0, atol=0)
    assert not torch.equal(a, run("della_linear", base, xs, mp, seed=6))
    got, delta = np_(a) - np_(base), np_(xs[0]) - np_(base)
    kept = got != 0
    factor = np.abs(delta).sum() / np.abs(delta[kept]).sum()
    np.testing.assert_allclose(got[kept], delta[kept] * factor, rtol=1e-12)


def test_della_linear_expectation_over_seeds() -> None:
    """Without rescale, E[merged delta] = w * p(rank) * delta exactly; check within sampling error."""
    base, xs = family((200, 6), 1, seed=23)
    delta = np_(xs[0]) - np_(base)
    density, eps, w, seeds = 0.5, 0.25, 0.8, 60
    mp = [{"weight": w, "density": density, "epsilon": eps}]
    mean = np.mean([np_(run("della_linear", base, xs, mp, {"rescale": False}, seed=s)) - np_(base) for s in range(seeds)], axis=0)
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1)  # ascending rank within each row
    p = density - eps + 2 * eps * ranks / (delta.shape[1] - 1)
    want = w * p * delta
    sd = np.abs(w * delta) * np.sqrt(p * (1 - p) / seeds)
    z = (mean - want) / sd
    assert np.abs(z).max() < 5.5
    assert abs(z.mean()) < 5 / math.sqrt(z.size)


def test_della_density_one_is_deterministic_ties_without_trimming() -> None:
    base, xs = family((5, 6), 3, seed=25)
    weights = [0.5, 0.3, 0.4]
    got = run("della", base, xs, [{"weight": w, "density": 1.0} for w in weights], seed=1)
    other_seed = run("della", base, xs, [{"weight": w, "density": 1.0} for w in weights], seed=2)
    torch.testing.assert_close(got, other_seed, rtol=0, atol=0)
    want = np_(base) + disjoint_merge([np_(x) - np_(base) for x in xs], weights, normalize=True)
    np.testing.assert_allclose(np_(got), want, rtol=1e-12, atol=1e-12)


# ---- model stock -----------------------------------------------------------------------------


def test_model_stock_sixty_degrees() -> None:
    """Two task vectors 60 degrees apart: cos = 1/2, t = 2 * 0.5 / (1 + 0.5) = 2/3."""
    base = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    d1 = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    d2 = 3 * torch.tensor([0.5, math.sqrt(3) / 2, 0.0], dtype=torch.float64)
    got = run("model_stock", base, [base + d1, base + d2], [{}, {}])
    torch.testing.assert_close(got, base + (2 / 3) * (d1 + d2) / 2)
    # orthogonal task vectors: t = 0, the base; identical directions: t = 1, the average
    ortho = run("model_stock", base, [base + d1, base + torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64)], [{}, {}])
    torch.testing.assert_close(ortho, base)
    same = run("model_stock", base, [base + d1, base + 3 * d1], [{}, {}])
    torch.testing.assert_close(same, base + 2 * d1)


def model_stock_ref(base: np.ndarray, xs: list[np.ndarray], filter_wise: bool) -> np.ndarray:
    shape = base.shape
    if filter_wise:
        b = base.reshape(shape[0], -1) if base.ndim >= 2 else base.reshape(1, -1)
    else:
        b = base.reshape(1, -1)
    ws = [x.reshape(b.shape) for x in xs]
    out = np.empty_like(b)
    n = len(ws)
    for r in range(b.shape[0]):
        offs = [w[r] - b[r] for w in ws]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                angle = math.acos(np.clip(offs[i] @ offs[j] / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j])), -1, 1))
                cosines.append(math.cos(angle))
        c = sum(cosines) / len(cosines)
        t = n * c / (1 + (n - 1) * c)
        out[r] = t * sum(w[r] for w in ws) / n + (1 - t) * b[r]
    return out.reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_angle_formula(filter_wise: bool) -> None:
    base = rand((4, 6), 30)
    shared = rand((4, 6), 31, 0.1)  # a common direction makes the cosines clearly positive
    xs = [base + shared + rand((4, 6), 32 + i, 0.05) for i in range(3)]
    got = run("model_stock", base, xs, [{}, {}, {}], {"filter_wise": filter_wise})
    np.testing.assert_allclose(np_(got), model_stock_ref(np_(base), [np_(x) for x in xs], filter_wise), rtol=1e-10)


# ---- slerp -----------------------------------------------------------------------------------


def test_slerp_on_the_unit_circle() -> None:
    v0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    third = run("slerp", v0, [v1], [{}], {"t": 1 / 3})
    torch.testing.assert_close(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)], dtype=torch.float64))
    torch.testing.assert_close(run("slerp", v0, [v1], [{}], {"t": 0.0}), v0)
    torch.testing.assert_close(run("slerp", v0, [v1], [{}], {"t": 1.0}), v1)


def test_slerp_matches_formula_over_the_whole_tensor() -> None:
    a, b = rand((3, 4), 40), rand((3, 4), 41, 2.0)
    t = 0.3
    fa, fb = np_(a).reshape(-1), np_(b).reshape(-1)
    theta = math.acos(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))
    want = (math.sin((1 - t) * theta) * fa + math.sin(t * theta) * fb) / math.sin(theta)
    np.testing.assert_allclose(np_(run("slerp", a, [b], [{}], {"t": t})).reshape(-1), want, rtol=1e-12)


@pytest.mark.parametrize("factor", [3.0, -2.0])
def test_slerp_falls_back_to_lerp_on_parallel_vectors(factor: float) -> None:
    v0 = rand((5,), 42)
    v1 = factor * v0
    got = slerp(0.25, v0, v1)
    torch.testing.assert_close(got, 0.75 * v0 + 0.25 * v1)
    assert torch.isfinite(got).all()
    zero = slerp(0.5, torch.zeros(3), torch.ones(3))  # zero norm counts as 1: finite, linear
    assert torch.isfinite(zero).all()


# ---- passthrough -----------------------------------------------------------------------------


def test_passthrough_returns_input_or_scales_it() -> None:
    x = rand((3, 3), 50)
    assert run("passthrough", None, [x], [{}]) is x
    torch.testing.assert_close(run("passthrough", None, [x], [{"scale": 0.25}]), 0.25 * x)
    with pytest.raises(ValueError, match="exactly one model"):
        run("passthrough", None, [x, x], [{}, {}])


# ---- one-shot and cached sparsifiers agree ------------------------------------------------------


SPARSE_CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.77}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.02}),
    ("dare_ties", {"density": 0.35}),
    ("dare_linear", {"density": 0.9}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": 0.3, "epsilon": 0.2}),
]


@pytest.mark.parametrize(
    ("method", "extra", "shape"),
    [(m, e, s) for m, e in SPARSE_CASES for s in [(7,), (33, 21)]]
    # past the kernel's chunk and the direct-selection limit: only magnitude masks depend on it
    + [(m, e, (400, 400)) for m, e in SPARSE_CASES if m.startswith(("ties", "breadcrumbs"))],
)
def test_one_shot_and_cached_sparsifiers_agree(method: str, extra: dict, shape: tuple[int, ...]) -> None:
    base, xs = family(shape, 3, seed=60, dtype=torch.float32)
    if shape == (400, 400):  # magnitude ties across chunk boundaries
        xs[1] = base + torch.round(xs[1] - base, decimals=2)
    mp = [{"weight": w, **extra} for w in (0.5, 0.3, 0.4)]
    cached = CachedSparsifier()
    one = run(method, base, xs, mp, sparsifier=OneShotSparsifier(), seed=7)
    two = run(method, base, xs, mp, sparsifier=cached, seed=7)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    # a second candidate with other densities reuses the cache and still agrees
    before = (cached.rank_computations, cached.row_rank_computations, cached.noise_generations)
    mp2 = [{**m, "density": m["density"] * 0.8} for m in mp]
    torch.testing.assert_close(
        run(method, base, xs, mp2, sparsifier=OneShotSparsifier(), seed=7),
        run(method, base, xs, mp2, sparsifier=cached, seed=7),
        rtol=0, atol=0,
    )
    assert (cached.rank_computations, cached.row_rank_computations, cached.noise_generations) == before


def test_sparsifier_masks_agree_exactly() -> None:
    rng = np.random.default_rng(70)
    delta = torch.tensor(rng.integers(-50, 51, size=(300, 300)), dtype=torch.float32) / 10  # many ties
    n = delta.numel()
    cached = CachedSparsifier()
    for lo, hi in [(0, 1), (0, n // 3), (n // 50, n // 2), (10, n - 5), (0, n)]:
        a = OneShotSparsifier().magnitude("k", lambda: delta, n, lo, hi).full(delta)
        b = cached.magnitude("k", lambda: delta, n, lo, hi).full(delta)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert int(a.sum()) == hi - lo
        # the kept band is [lo, hi) in descending |delta|, ties by lower index
        order = np.argsort(-np.abs(delta.reshape(-1).numpy()), kind="stable")
        want = np.zeros(n, dtype=np.float32)
        want[order[lo:hi]] = 1
        np.testing.assert_array_equal(a.reshape(-1).numpy(), want)
        # applied chunk by chunk (the kernels' path) the masks zero exactly the dropped entries
        flat = delta.reshape(-1)
        for mask in (OneShotSparsifier().magnitude("k", lambda: delta, n, lo, hi), cached.magnitude("k", lambda: delta, n, lo, hi)):
            if mask.all_kept:
                continue
            applied = torch.cat([mask.apply_(s, min(n, s + 7000), flat[s:s + 7000].clone()) for s in range(0, n, 7000)])
            np.testing.assert_array_equal(applied.numpy(), flat.numpy() * want)
    assert cached.rank_computations == 1


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear", "task_arithmetic"])
@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_out_of_range_is_refused(method: str, density: float) -> None:
    base, xs = family((4, 4), 1, seed=80)
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\].*got " + str(density)):
        run(method, base, xs, [{"weight": 1.0, "density": density}])


def test_other_bad_parameters_name_what_is_valid() -> None:
    base, xs = family((4, 4), 2, seed=81)
    with pytest.raises(ValueError, match="density - epsilon > 0"):
        run("della", base, xs[:1], [{"weight": 1.0, "density": 0.1, "epsilon": 0.2}])
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        run("breadcrumbs", base, xs[:1], [{"weight": 1.0, "density": 0.5, "gamma": 1.5}])
    with pytest.raises(ValueError, match="needs 'weight'"):
        run("ties", base, xs[:1], [{"density": 0.5}])
    with pytest.raises(ValueError, match="weight must be a number"):
        run("task_arithmetic", base, xs[:1], [{"weight": "heavy"}])
    with pytest.raises(ValueError, match="sum to 0"):
        run("linear", None, xs, [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(ValueError, match="exactly one other model"):
        run("slerp", base, xs, [{}, {}], {"t": 0.5})
    with pytest.raises(ValueError, match="at least 2 other models"):
        run("model_stock", base, xs[:1], [{}])
    with pytest.raises(ValueError, match="different shapes"):
        run("task_arithmetic", base, [torch.zeros(3, 4, dtype=torch.float64)], [{"weight": 1.0}])
    with pytest.raises(UnknownMethodError, match="valid: .*breadcrumbs.*task_arithmetic"):
        get_method("frankenmerge")


def test_unknown_parameter_in_a_recipe_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        Recipe.parse(
            {"merge_method": "breadcrumbs", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "gama": 0.1}}]},
            file="r.yaml",
        )
    message = str(info.value)
    assert message.startswith("r.yaml: models[0].parameters.gama:")
    assert "density" in message and "gamma" in message and "\n" not in message


def test_every_method_is_registered_with_its_mergekit_defaults() -> None:
    assert set(METHODS) == {
        "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
    }
    defaults = {name: {s.name: s.default for s in m.global_params} for name, m in METHODS.items()}
    # mergekit's table: (normalize, rescale)
    expected = {
        "task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
        "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
        "della": (True, True), "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expected.items():
        assert (defaults[name]["normalize"], defaults[name]["rescale"], defaults[name]["lambda"]) == (normalize, rescale, 1.0)
    assert defaults["linear"]["normalize"] is True
    model_defaults = {s.name: s.default for s in METHODS["breadcrumbs"].model_params}
    assert model_defaults["gamma"] == 0.01 and model_defaults["density"] == 1.0
    assert {s.name: s.default for s in METHODS["della"].model_params}["epsilon"] == 0.15


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_rescaled_magnitude_masks_agree_across_two_chunked_passes(method: str) -> None:
    """With rescale the kernel walks each mask twice (L1 sums, then the merge); ties at the
    threshold, found on the fly by the cached sparsifier, must be the same ones both times."""
    rng = np.random.default_rng(90)
    shape = (400, 400)  # several kernel chunks
    base = torch.zeros(shape, dtype=torch.float32)
    xs = [torch.tensor(rng.integers(-6, 7, size=shape), dtype=torch.float32) / 4 for _ in range(2)]
    mp = [{"weight": 0.6, "density": 0.33}, {"weight": 0.4, "density": 0.71}]
    if method == "breadcrumbs_ties":
        mp = [{**mp[0], "gamma": 0.02}, {**mp[1], "gamma": 0.01}]
    params = {"rescale": True}
    one = run(method, base, xs, mp, params, sparsifier=OneShotSparsifier())
    cached = CachedSparsifier()
    for _ in range(2):  # a fresh candidate from the cache, twice
        torch.testing.assert_close(run(method, base, xs, mp, params, sparsifier=cached), one, rtol=0, atol=0)
