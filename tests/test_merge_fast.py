"""The numpy executor (evomerge.merge.fast) builds exactly what the torch engine builds.

Same plan, two executors: for every recipe the numpy path covers, each output tensor must be
bit-for-bit the torch engine's (same dtype, same values), the files `write_model` writes must
be byte-identical, and the mergekit parity fixtures must hold for it too. Everything else falls
back to torch, and `evomerge merge` of a task_arithmetic recipe never imports torch.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import ConfigError
from evomerge.merge import fast, native
from evomerge.merge.engine import materialize
from evomerge.merge.plan import plan_merge
from evomerge.merge.sources import SourcePool
from evomerge.merge.stfile import dtype_name
from evomerge.merge.writer import write_model
from evomerge.recipe import Recipe

from .conftest import write_llama
from .test_mergekit_parity import fixtures
from .test_mergekit_parity import recipe as parity_recipe


def _as_dtype(src: Path, out: Path, dtype: torch.dtype) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(dtype) for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def fam(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fp32 llama family plus fp16 copies of a and b, and a tied-embeddings pair."""
    root = tmp_path_factory.mktemp("fast-family")
    out = dict(llama_family)
    out["a16"] = _as_dtype(llama_family["a"], root / "a16", torch.float16)
    out["b16"] = _as_dtype(llama_family["b"], root / "b16", torch.float16)
    for name in ("base", "a", "b", "c"):  # bfloat16 copies: the native twins' cases
        out[f"{name}bf"] = _as_dtype(llama_family[name], root / f"{name}bf", torch.bfloat16)
    out["tied_base"] = write_llama(root / "tied_base", seed=10, tie=True)
    out["tied_ft"] = write_llama(root / "tied_ft", seed=11, base=out["tied_base"], tie=True)
    return out


def _recipes(f: dict[str, Path]) -> dict[str, dict]:
    def m(name: str, **params) -> dict:
        return {"model": str(f[name]), "parameters": params}

    filters = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.25}]

    def ta_cases(case: str, model: str) -> dict[str, dict]:  # over fp32 sources, and bf16 ones
        return {
            f"ta{case}_gradients_filters": {
                "merge_method": "task_arithmetic", "base_model": str(f["base" + model]),
                "models": [m("a" + model, weight=0.5), m("b" + model, weight=[0.0, 1.0]), m("c" + model, weight=filters)],
            },
            f"ta{case}_normalize_lambda_zero_weight": {
                "merge_method": "task_arithmetic", "base_model": str(f["base" + model]),
                "models": [m("a" + model, weight=0.3), m("b" + model, weight=0.0), m("c" + model, weight=-0.45)],
                "parameters": {"normalize": True, "lambda": 0.7},
            },
        }

    return {
        **ta_cases("", ""),
        **ta_cases("_bf16", "bf"),
        "ta_mixed_fp16_out_fp16": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "models": [m("a16", weight=0.6), m("b", weight=0.2)], "out_dtype": "float16",
        },
        "ta_slices": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "slices": [
                {"sources": [{"model": str(f["base"]), "layer_range": [0, 2]}, {"model": str(f["a"]), "layer_range": [1, 3]}]},
                {"sources": [{"model": str(f["base"]), "layer_range": [2, 3]}, {"model": str(f["b"]), "layer_range": [0, 1]}]},
            ],
            "parameters": {"weight": 0.8},
        },
        "ta_tied": {
            "merge_method": "task_arithmetic", "base_model": str(f["tied_base"]), "models": [m("tied_ft", weight=0.4)],
        },
        "ta_head_absent_in_a_tied_source": {  # lm_head of tied_ft is its embeddings
            "merge_method": "task_arithmetic", "base_model": str(f["base"]), "models": [m("tied_ft", weight=0.6), m("a", weight=0.2)],
            "parameters": {"rescale": True},
        },
        "linear_filters": {"merge_method": "linear", "models": [m("a", weight=filters), m("b", weight=0.3), m("c", weight=[1.0, 0.2])]},
        "linear_no_normalize_negative": {
            "merge_method": "linear", "models": [m("a", weight=1.3), m("b", weight=-0.4)], "parameters": {"normalize": False},
        },
        "linear_fp16": {"merge_method": "linear", "models": [m("a16", weight=0.3), m("b16", weight=0.6)]},
        "linear_fp16_out_fp32": {"merge_method": "linear", "models": [m("a16", weight=0.3), m("b16", weight=0.6)], "out_dtype": "float32"},
        "linear_dtype_fp16": {"merge_method": "linear", "models": [m("a", weight=0.5), m("b", weight=0.5)], "dtype": "float16"},
        "ta_bf16_all_weights_zero": {
            "merge_method": "task_arithmetic", "base_model": str(f["basebf"]), "models": [m("abf", weight=0.0)],
            "out_dtype": "bfloat16",
        },
        "ta_fp32_as_bf16": {  # the sources cast to bfloat16 first, as torch does
            "merge_method": "task_arithmetic", "base_model": str(f["base"]),
            "models": [m("a16", weight=0.6), m("bbf", weight=0.2), m("c", weight=0.3)], "dtype": "bfloat16",
        },
        "linear_five_models": {  # torch's own sum of five weights is not left to right
            "merge_method": "linear", "models": [m(x, weight=w) for x, w in zip(("a", "b", "c", "base", "a16"), (-0.44, 1.0, 0.14, 0.37, 1.15), strict=True)],
        },
        "ta_five_models_normalize": {
            "merge_method": "task_arithmetic", "base_model": str(f["base"]), "parameters": {"normalize": True},
            "models": [m(x, weight=w) for x, w in zip(("a", "b", "c", "a16", "b16"), (-0.44, 1.0, 0.14, 0.37, 1.15), strict=True)],
        },
        "linear_bf16_five_models": {
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [m(x, weight=w) for x, w in zip(("abf", "bbf", "cbf", "basebf", "a"), (-0.44, 1.0, 0.14, 0.37, 1.15), strict=True)],
        },
        "linear_bf16": {"merge_method": "linear", "models": [m("abf", weight=filters), m("bbf", weight=0.6), m("cbf", weight=0.1)]},
        "linear_bf16_no_normalize": {
            "merge_method": "linear", "models": [m("abf", weight=1.3), m("bbf", weight=-0.4)], "parameters": {"normalize": False},
        },
        "linear_base_not_listed": {
            "merge_method": "linear", "base_model": str(f["base"]), "models": [m("a", weight=0.5)], "parameters": {"weight": 0.25},
        },
    }


def _as_torch(array: np.ndarray) -> torch.Tensor:
    if dtype_name(array) == "bfloat16":  # bit patterns in a uint16 array
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _assert_identical(got: dict, want: dict[str, torch.Tensor], label: str) -> None:
    assert list(got) == list(want), label
    for key, tensor in want.items():
        value = _as_torch(got[key])
        assert value.dtype == tensor.dtype, f"{label}: {key}: {value.dtype} vs {tensor.dtype}"
        assert value.shape == tensor.shape, f"{label}: {key}"
        assert torch.equal(value, tensor), f"{label}: {key}: max diff {(value.double() - tensor.double()).abs().max()}"


CASES = list(_recipes(defaultdict(Path)))


def _needs_native(case: str) -> None:
    if "bf16" in case and native.library() is None:
        pytest.skip(f"bfloat16 needs the native kernels: {native.unavailable_reason()}")


@pytest.mark.parametrize("case", CASES)
def test_numpy_executor_is_bitwise_the_torch_engine(fam: dict[str, Path], case: str) -> None:
    _needs_native(case)
    recipe = Recipe.parse(_recipes(fam)[case])
    pool = SourcePool()
    plan = plan_merge(recipe, pool)
    assert fast.unsupported_reason(plan, pool) is None
    got = dict(fast.iter_merged(plan, pool, workers=2))
    with native.torch_kernels_only():  # the torch engine's own code, not its compiled twins
        want = materialize(recipe, SourcePool())
    _assert_identical(got, want, case)


@pytest.mark.parametrize("case", ["ta_gradients_filters", "linear_no_normalize_negative", "ta_bf16_gradients_filters", "linear_bf16"])
def test_written_files_are_byte_identical(fam: dict[str, Path], tmp_path: Path, case: str) -> None:
    _needs_native(case)
    recipe = Recipe.parse(_recipes(fam)[case])
    shard = 12_000 if "bf16" in case else 30_000  # several shards either way
    numpy_dir = write_model(recipe, SourcePool(), tmp_path / "numpy", engine="numpy", max_shard_bytes=shard)
    with native.torch_kernels_only():
        torch_dir = write_model(recipe, SourcePool(), tmp_path / "torch", engine="torch", max_shard_bytes=shard)
    files = sorted(p.name for p in numpy_dir.iterdir())
    assert files == sorted(p.name for p in torch_dir.iterdir())
    assert "model.safetensors.index.json" in files
    for name in files:
        assert (numpy_dir / name).read_bytes() == (torch_dir / name).read_bytes(), name


def test_test_zoo_task_arithmetic(tmp_path: Path) -> None:
    from evomerge.zoo import build_zoo

    build_zoo("test")
    recipe = Recipe.parse(
        {
            "merge_method": "task_arithmetic", "base_model": "zoo:test/base",
            "models": [{"model": f"zoo:test/{name}", "parameters": {"weight": w}} for name, w in (("add", 0.7), ("reverse", 0.45), ("sort", 0.3))],
        }
    )
    pool = SourcePool()
    plan = plan_merge(recipe, pool)
    assert fast.unsupported_reason(plan, pool) is None
    _assert_identical(dict(fast.iter_merged(plan, pool)), materialize(recipe, SourcePool()), "zoo:test")


@pytest.mark.parametrize("name", [n for n in fixtures.parity_recipes() if n.split("_")[0] in ("linear", "task")])
def test_parity_fixtures(name: str) -> None:
    """The mergekit fixtures of the element-wise methods: covered, identical to torch, and
    within the parity test's tolerance of what mergekit wrote."""
    recipe = parity_recipe(name)
    pool = SourcePool()
    plan = plan_merge(recipe, pool)
    assert fast.unsupported_reason(plan, pool) is None, name
    got = dict(fast.iter_merged(plan, pool))
    _assert_identical(got, materialize(recipe, SourcePool()), name)
    expected = load_file(str(fixtures.EXPECTED / f"{name}.safetensors"))
    for key, want in expected.items():
        torch.testing.assert_close(torch.from_numpy(got[key].copy()), want, rtol=1e-5, atol=1e-7)


def test_everything_else_falls_back_to_torch(fam: dict[str, Path], tmp_path: Path) -> None:
    def reason(spec: dict) -> str | None:
        pool = SourcePool()
        return fast.unsupported_reason(plan_merge(Recipe.parse(spec), pool), pool)

    ties = {"merge_method": "ties", "base_model": str(fam["base"]), "models": [{"model": str(fam["a"]), "parameters": {"weight": 1, "density": 0.5}}]}
    assert "ties" in reason(ties)
    bf16 = {"merge_method": "linear", "models": [{"model": str(fam["a"]), "parameters": {"weight": 1}}], "dtype": "bfloat16"}
    if native.library() is not None:
        assert reason(bf16) is None  # cast to bfloat16, merged by the native twin
    assert "bfloat16 only to bfloat16" in reason({**bf16, "out_dtype": "float32"})
    mixed = {"merge_method": "linear", "models": [{"model": str(fam["bbf"]), "parameters": {"weight": 1}}, {"model": str(fam["a"]), "parameters": {"weight": 1}}]}
    assert "bfloat16" in reason(mixed)
    to_fp32 = {"merge_method": "linear", "models": [{"model": str(fam["bbf"]), "parameters": {"weight": 1}}], "out_dtype": "float32"}
    assert "bfloat16" in reason(to_fp32)
    only16 = {"merge_method": "task_arithmetic", "base_model": str(fam["a16"]), "models": [{"model": str(fam["b16"]), "parameters": {"weight": 1}}]}
    assert "float16" in reason(only16)  # merged in float16 by torch: not reproduced here
    zero = {"merge_method": "linear", "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.5}}, {"model": str(fam["b"]), "parameters": {"weight": -0.5}}]}
    assert "sum to 0" in reason(zero)
    # auto falls back (and torch reports the error); numpy refuses
    with pytest.raises(ConfigError, match="sum to 0"):
        write_model(Recipe.parse(zero), SourcePool(), tmp_path / "zero")
    with pytest.raises(ValueError, match="numpy executor does not cover"):
        write_model(Recipe.parse(ties), SourcePool(), tmp_path / "ties", engine="numpy")
    out = write_model(Recipe.parse(bf16), SourcePool(), tmp_path / "bf16")
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    assert not (tmp_path / "zero").exists() and not (tmp_path / "ties").exists()


def test_bfloat16_without_the_native_kernels_goes_to_torch(fam: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _recipes(fam)["ta_bf16_gradients_filters"]
    monkeypatch.setenv("EVOMERGE_NATIVE", "0")
    native._load.cache_clear()
    try:
        pool = SourcePool()
        assert "EVOMERGE_NATIVE=0" in fast.unsupported_reason(plan_merge(Recipe.parse(spec), pool), pool)
        out = write_model(Recipe.parse(spec), SourcePool(), tmp_path / "torch")
    finally:
        monkeypatch.delenv("EVOMERGE_NATIVE")
        native._load.cache_clear()
    want = materialize(Recipe.parse(spec), SourcePool())
    written = load_file(str(out / "model.safetensors"))
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], want[k]) for k in want)


def test_a_failing_compiler_is_a_reason_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: no such target' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        assert native.library() is None
        assert "no such target" in native.unavailable_reason()
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-built left
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("n", [1, 15, 16, 2047, 2049, 70_001])
def test_native_kernels_are_bitwise_the_torch_kernels(n: int) -> None:
    """Large and tiny magnitudes, float32 subnormals, infinities, NaN, overflow to inf, sizes
    around the vector width and the kernels' block."""
    from evomerge.merge.methods.task_arithmetic import task_arithmetic_kernel

    if native.library() is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    rng = np.random.default_rng(n)
    base = rng.normal(0, 0.02, n) * 10.0 ** rng.integers(-40, 3, n)
    inputs = [base + rng.normal(0, 0.01, n) * 10.0 ** rng.integers(-6, 2, n) for _ in range(3)]
    for x in inputs:
        x[rng.integers(0, n, max(1, n // 100))] = rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0], max(1, n // 100))
    base_bits, input_bits = _bf16_bits(base), [_bf16_bits(x) for x in inputs]
    as_torch = [torch.from_numpy(b.view(np.int16)).view(torch.bfloat16) for b in (base_bits, *input_bits)]
    weights = [0.35, -0.7, 1.25]
    for lam, normalize in ((1.0, False), (0.8, True)):
        with native.torch_kernels_only():
            want = task_arithmetic_kernel(as_torch[0], as_torch[1:], weights, [None] * 3, rescale=False, consensus=False, normalize=normalize, lam=lam)
        task = _Task(weights, {"normalize": normalize, "lambda": lam})
        got = np.empty(n, np.uint16)
        fast._task_arithmetic_bf16([base_bits, *input_bits], task, got)
        assert np.array_equal(got, want.view(torch.int16).numpy().view(np.uint16))
    # methods.Linear's arithmetic, over six inputs (the kernel takes them four at a time)
    from evomerge.merge.weights import sum_float32

    six, six_weights = [*input_bits, base_bits, *input_bits[:2]], [*weights, 0.5, -0.25, 2.0]
    for normalize in (True, False):
        acc = torch.zeros(n, dtype=torch.float32)
        for bits, w in zip(six, torch.tensor(six_weights).tolist(), strict=True):
            acc.add_(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float32), alpha=w)
        if normalize:
            acc.div_(sum_float32(six_weights))
        got = np.empty(n, np.uint16)
        fast._linear_bf16(six, _Task(six_weights, {"normalize": normalize}), got)
        assert np.array_equal(got, acc.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def _bf16(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(_bf16_bits(values).view(np.int16)).view(torch.bfloat16)


@pytest.mark.parametrize("n", [1, 15, 2047, 2049, 70_001, 1_000_003])
@pytest.mark.parametrize("few_magnitudes", [False, True])
def test_native_ties_is_bitwise_the_torch_kernel(n: int, few_magnitudes: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU bfloat16 TIES twin (`native.ties_bf16`) against the torch kernel's own code: both
    sparsifiers, densities from one element to all, with and without normalize. With few
    magnitudes most deltas tie with the threshold, and the kept ties run out blocks later."""
    from evomerge.merge.methods.task_arithmetic import _Delta, task_arithmetic_kernel
    from evomerge.merge.sparsify import CachedSparsifier, OneShotSparsifier

    if native.library() is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    rng = np.random.default_rng(n)
    if few_magnitudes:
        base = rng.choice([0.25, -0.5, 1.0], n)
        inputs = [base + rng.choice([-0.0625, -0.03125, 0.0, 0.03125, 0.0625], n) for _ in range(3)]
    else:
        base = rng.normal(0, 0.02, n) * 10.0 ** rng.integers(-6, 2, n)
        inputs = [base + rng.normal(0, 0.01, n) * 10.0 ** rng.integers(-6, 2, n) for _ in range(3)]
        for x in inputs:
            x[rng.integers(0, n, max(1, n // 100))] = rng.choice([np.nan, np.inf, -np.inf, 3e38, 0.0, -0.0], max(1, n // 100))
    b, xs = _bf16(base), [_bf16(x) for x in inputs]
    calls, twin = [], native.ties_bf16
    monkeypatch.setattr(native, "ties_bf16", lambda *a, **k: calls.append(1) or twin(*a, **k))

    def merged(sparsifier: object, densities: list[float], weights: list[float], normalize: bool, lam: float) -> np.ndarray:
        masks = [
            None if d >= 1 else sparsifier.magnitude((i, n), _Delta(x, b, torch.bfloat16), n, 0, max(1, int(d * n)))
            for i, (x, d) in enumerate(zip(xs, densities, strict=True))
        ]
        out = task_arithmetic_kernel(b, xs, weights, masks, rescale=False, consensus=True, normalize=normalize, lam=lam)
        return out.view(torch.int16).numpy()

    cases = 0
    for sparsifier in (OneShotSparsifier, CachedSparsifier):
        for densities in ([0.3, 0.5, 0.9], [1.0, 0.2, 1 / n], [0.5, 0.5, 0.5]):
            for weights, normalize, lam in (([0.5, 1.0, 0.8], True, 1.0), ([1.0, 0.3, 2.0], False, 0.7), ([1.0, 1.0, 1.0], True, 1.3)):
                with native.torch_kernels_only():
                    want = merged(sparsifier(), densities, weights, normalize, lam)
                before = len(calls)
                got = merged(sparsifier(), densities, weights, normalize, lam)
                assert len(calls) == before + 1  # the twin ran
                assert np.array_equal(got, want), (sparsifier.__name__, densities, weights, normalize)
                cases += 1
    assert cases == 18


class _Task:
    """What the kernels read of a TensorTask."""

    def __init__(self, weights: list[float], params: dict) -> None:
        self.model_params = [{"weight": w} for w in weights]
        self.params = params


@pytest.mark.parametrize("suffix", ["", "bf"])
def test_cli_task_arithmetic_never_imports_torch(fam: dict[str, Path], tmp_path: Path, suffix: str) -> None:
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {fam['base' + suffix]}\nmodels:\n"
        f"  - model: {fam['a' + suffix]}\n    parameters: {{weight: 0.5}}\n  - model: {fam['b' + suffix]}\n    parameters: {{weight: 0.3}}\n"
    )
    code = (
        "import sys\nfrom evomerge.cli import main\n"
        f"try:\n    main(['merge', {str(recipe)!r}, '--out', {str(tmp_path / 'out')!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'ray', 'optuna', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = materialize(Recipe.from_yaml(recipe), SourcePool())
    assert all(torch.equal(written[k], want[k]) for k in want)


def test_pipeline_yields_in_order_and_starts_large_tasks_first() -> None:
    import threading

    from evomerge.merge.pipeline import large_tasks, ordered_parallel

    sizes = [100, 5, 6, 5, 7, 5, 6, 100]
    assert large_tasks(sizes) == {0, 7}
    started: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    out = list(ordered_parallel(list(range(8)), run, sizes, workers=2))
    assert out == [(i, i * i) for i in range(8)]
    assert set(started[:2]) == {0, 7}  # the head (last in plan order) starts with the embeddings
    partial = ordered_parallel(list(range(8)), run, sizes, workers=2)
    assert next(partial) == (0, 0)
    partial.close()  # stops cleanly, waiting for what had started
