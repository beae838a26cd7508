"""evomerge builds what mergekit-yaml builds from the same recipe.

The expected tensors come from mergekit 0.1.5, stored by
``tests/fixtures/mergekit_parity/make_fixtures.py`` (run it again after changing the
fixtures or what evomerge writes; it needs the cached mergekit venv, never CI):

- deterministic methods: every output tensor equal to mergekit's (rtol 1e-5);
- random methods (DARE, DELLA): mergekit's draws cannot be reproduced, so evomerge's mean
  over seeds is compared with mergekit's mean over its seeds, within the sampling error
  both variances predict; and, where it has a closed form, with the non-random limit;
- recipes evomerge writes (the writer's ``mergekit_config.yml``, decoded PS and DFS
  recipes) were accepted by mergekit's parser and built by ``mergekit-yaml``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from evomerge.merge.engine import materialize
from evomerge.merge.sources import SourcePool
from evomerge.recipe import Recipe

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit_parity"
RERUN = "re-run: .venv/bin/python tests/fixtures/mergekit_parity/make_fixtures.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("mergekit_parity_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixtures = _load_generator()
RECIPES = fixtures.parity_recipes()
RANDOM = list(fixtures.RANDOM_METHODS)
DETERMINISTIC = [name for name in RECIPES if name not in RANDOM]
EVO_SEEDS = 48


@pytest.fixture(scope="module")
def pool() -> SourcePool:
    return SourcePool(resident=True)


def recipe(name: str) -> Recipe:
    text = (fixtures.RECIPES / f"{name}.yaml").read_text()
    return Recipe.from_string(text.replace("{models}", str(fixtures.MODELS)), file=f"{name}.yaml")


def test_stored_recipes_are_the_generators() -> None:
    for name, text in RECIPES.items():
        path = fixtures.RECIPES / f"{name}.yaml"
        assert path.is_file() and path.read_text() == text, f"recipe '{name}' changed since mergekit ran it; {RERUN}"
        assert (fixtures.EXPECTED / f"{name}.safetensors").is_file(), RERUN


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(name: str, pool: SourcePool) -> None:
    expected = load_file(str(fixtures.EXPECTED / f"{name}.safetensors"))
    got = materialize(recipe(name), pool)
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype, key
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{name}: {k}: {m}")


def _evomerge_runs(name: str, pool: SourcePool, seeds: int, extra: dict | None = None) -> list[dict[str, torch.Tensor]]:
    base = recipe(name)
    if extra:
        base = Recipe.parse({**base.to_dict(), "parameters": {**(base.parameters or {}), **extra}})
    return [materialize(base.with_evomerge(seed=seed), pool) for seed in range(seeds)]


def _moments(runs: list[dict[str, torch.Tensor]]) -> tuple[dict, dict]:
    mean, var = {}, {}
    for key in runs[0]:
        stack = torch.stack([r[key].double() for r in runs])
        mean[key], var[key] = stack.mean(dim=0), stack.var(dim=0, unbiased=True)
    return mean, var


def _task_arithmetic_delta(spec: Recipe) -> dict[str, torch.Tensor]:
    """sum_i w_i (model_i - base) per tensor, from the fixture checkpoints (no randomness)."""
    base = load_file(str(Path(spec.base_model) / "model.safetensors"))
    out = {key: torch.zeros_like(t, dtype=torch.float64) for key, t in base.items()}
    for model in spec.models:
        weight = float(model.parameters["weight"])
        state = load_file(str(Path(model.model) / "model.safetensors"))
        for key in out:
            out[key] += weight * (state[key].double() - base[key].double())
    return out


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_match_mergekit_in_expectation(name: str, pool: SourcePool) -> None:
    path = fixtures.EXPECTED / f"{name}.safetensors"
    stats = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        mk_seeds = int(handle.metadata()["seeds"])
    runs = _evomerge_runs(name, pool, EVO_SEEDS)
    assert not all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # seeds matter
    torch.testing.assert_close(materialize(recipe(name).with_evomerge(seed=1), pool), runs[1], rtol=0, atol=0)
    mean, var = _moments(runs)
    assert sorted(mean) == sorted(k.removeprefix("mean/") for k in stats if k.startswith("mean/"))
    direction = _task_arithmetic_delta(recipe(name))
    zs = []
    along, spread = 0.0, 0.0
    for key in mean:
        mk_mean, mk_var = stats[f"mean/{key}"].double(), stats[f"var/{key}"].double()
        sd = (mk_var / mk_seeds + var[key] / EVO_SEEDS).sqrt()
        fixed = sd < 1e-9  # no randomness on either side (zero task vectors, dropped by both)
        torch.testing.assert_close(mean[key][fixed], mk_mean[fixed], rtol=1e-5, atol=1e-7)
        diff = mean[key] - mk_mean
        zs.append((diff[~fixed] / sd[~fixed]).reshape(-1))
        along += float((diff * direction[key]).sum())
        spread += float((sd**2 * direction[key] ** 2).sum())
    # A systematic scale difference (e.g. another rescale or density rule) shows along the
    # plain weighted task vector: this sum is ~N(0, 1) when the expectations agree.
    assert abs(along / math.sqrt(spread)) < 5, along / math.sqrt(spread)
    z = torch.cat(zs)
    assert z.numel() > 1000
    # Same distribution: z is about standard normal (t with ~mk_seeds dof), so its mean square
    # is ~1.1 and no element strays far. A systematic difference of a fraction of a standard
    # deviation would show in the mean square.
    assert float((z**2).mean()) < 1.4, float((z**2).mean())
    assert float(z.abs().max()) < 8, float(z.abs().max())
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_linear_methods_reach_their_non_random_limit(name: str, pool: SourcePool) -> None:
    """Without L1 rescaling the expectation has a closed form: base + sum_i w_i p_i delta_i,
    p_i = density (DARE) or density -+ epsilon graded by the magnitude rank in its row (DELLA)."""
    runs = _evomerge_runs(name, pool, EVO_SEEDS, {"rescale": False})
    mean, var = _moments(runs)
    spec = recipe(name)
    base = load_file(str(fixtures.MODELS / "base" / "model.safetensors"))
    zs = []
    for key, got in mean.items():
        want = base[key].double().clone()
        for model in spec.models:
            delta = load_file(str(Path(model.model) / "model.safetensors"))[key].double() - base[key].double()
            params = {**(spec.parameters or {}), **(model.parameters or {})}
            density, weight = params["density"], params["weight"]
            if name == "dare_linear":
                p = torch.full_like(delta, density)
            else:
                eps = params["epsilon"]
                rows = delta.reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
                ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
                p = (density - eps + 2 * eps * ranks / (rows.shape[1] - 1)).reshape(delta.shape)
            want += weight * p * delta
        sd = (var[key] / EVO_SEEDS).sqrt()
        fixed = sd < 1e-12
        torch.testing.assert_close(got[fixed], want[fixed], rtol=1e-5, atol=1e-7)
        zs.append(((got - want)[~fixed] / sd[~fixed]).reshape(-1))
    z = torch.cat(zs)
    assert float((z**2).mean()) < 1.3 and float(z.abs().max()) < 8


def test_recipes_evomerge_writes_were_accepted_by_mergekit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fixtures.REPO)  # the recipes name the fixture models relative to the repository
    record = json.loads(fixtures.ACCEPTED.read_text())
    texts = fixtures.evomerge_recipes(tmp_path)
    assert set(texts) <= set(record), f"recipes never checked by mergekit: {sorted(set(texts) - set(record))}; {RERUN}"
    for name, text in texts.items():
        entry = record[name]
        assert entry["sha256"] == fixtures.text_digest(text), (
            f"evomerge now writes the '{name}' recipe differently and mergekit has not checked the new text; {RERUN}"
        )
        assert entry["outcome"] == "accepted", f"{name}: {entry['outcome']}"
