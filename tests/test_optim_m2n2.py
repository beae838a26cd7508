"""M2N2: archive competition, mate selection, split-point SLERP crossover, per-sample scores, and
model mode (recipes over archive members, persisted through the archive port)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim import make_optimizer
from evomerge.optim.m2n2 import flat_slerp_split, slerp
from evomerge.optim.m2n2_recipe import compile_split_t, split_units
from evomerge.recipe import Recipe, evaluate_setting

ACC = {"acc": True}


def result(scores, acc: float | None = None) -> EvalResult:
    scores = np.asarray(scores, dtype=np.float64)
    return EvalResult({"acc": float(scores.mean()) if acc is None else acc}, dict(ACC), per_sample={"t": scores}, doc_ids={"t": list(range(scores.size))})


def m2n2(dim: int = 4, **options):
    options.setdefault("initial", [np.zeros(dim), np.ones(dim)])
    return make_optimizer("m2n2", dim=dim, bounds=None, x0=None, seed=0, objectives=ACC, **options)


def test_archive_competition_follows_the_shared_fitness() -> None:
    """Hand-computed cases (alpha = 1 and alpha = 0)."""
    opt = m2n2(archive_size=2)
    init = opt.ask(2)
    opt.tell(init, [result([1, 1, 0, 0]), result([1, 0, 0, 0])])
    # z = [2, 1, 1, 1(0)]: f_A = 1/2 + 1 = 1.5, f_B = 1/2, f_child = 1 -> the child replaces B.
    child = opt.ask(1)
    opt.tell(child, [result([0, 0, 1, 0])])
    assert opt.members() == [init[0].id, child[0].id]
    # A copy of A adds nothing: z = [2, 2, 1, 0]; f = A 1, C 1, copy 1 -> first on ties (A) goes.
    copy = opt.ask(1)
    opt.tell(copy, [result([1, 1, 0, 0])])
    assert opt.members() == [copy[0].id, child[0].id]
    # Strictly weaker on the same niche: z = [2, 2, 1]: f = copy 1, C 1, weak 0.5 -> rejected.
    weak = opt.ask(1)
    opt.tell(weak, [result([1, 0, 0, 0])])
    assert opt.members() == [copy[0].id, child[0].id]

    ga = m2n2(archive_size=2, alpha=0.0)
    init = ga.ask(2)
    ga.tell(init, [result([1, 1, 0, 0]), result([1, 0, 0, 0])])
    # alpha = 0 compares raw sums: A 2, B 1, child 1 -> B (first of the tied lowest) goes.
    child = ga.ask(1)
    ga.tell(child, [result([0, 0, 1, 0])])
    assert ga.members() == [init[0].id, child[0].id]


def test_archive_matches_a_direct_implementation_of_the_rule() -> None:
    rng = np.random.default_rng(3)
    P, N = 5, 40
    opt = m2n2(archive_size=P, mutation_sigma=0.1)
    archive: list[tuple[int, np.ndarray]] = []
    for _ in range(120):
        cand = opt.ask(1)[0]
        scores = (rng.random(N) < rng.uniform(0.1, 0.9)).astype(float)
        opt.tell([cand], [result(scores)])
        if len(archive) < P:
            archive.append((cand.id, scores))
            continue
        ext = np.array([s for _, s in archive] + [scores])
        z = ext.sum(axis=0)
        z[z == 0] = 1
        worst = int(np.argmin((ext / z).sum(axis=1)))
        if worst < P:
            archive[worst] = (cand.id, scores)
        assert opt.members() == [i for i, _ in archive]


def test_parent_selection_probabilities() -> None:
    opt = m2n2(dim=2, archive_size=3, initial=[np.zeros(2), np.ones(2), np.full(2, 2.0)])
    init = opt.ask(3)
    S = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=float)
    opt.tell(init, [result(s) for s in S])
    z = S.sum(axis=0)
    F = S / z
    f = F.sum(axis=1)
    draws = np.array([opt._select() for _ in range(20000)])
    assert np.allclose(np.bincount(draws[:, 0], minlength=3) / len(draws), f / f.sum(), atol=0.012)
    for a in range(3):  # B given A: attraction sum_j max(F_B - F_A, 0)
        g = np.maximum(F - F[a], 0).sum(axis=1)
        given = draws[draws[:, 0] == a, 1]
        assert np.allclose(np.bincount(given, minlength=3) / len(given), g / g.sum(), atol=0.03)

    plain = m2n2(dim=2, archive_size=3, attraction=False, initial=[np.zeros(2), np.ones(2), np.full(2, 2.0)])
    init = plain.ask(3)
    plain.tell(init, [result(s) for s in S])
    draws = np.array([plain._select() for _ in range(20000)])
    for column in (0, 1):  # both parents independently proportional to the shared fitness
        assert np.allclose(np.bincount(draws[:, column], minlength=3) / len(draws), f / f.sum(), atol=0.012)


def test_split_point_slerp_on_flat_vectors() -> None:
    x, y = np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0])  # orthogonal
    w = 0.2
    child = flat_slerp_split(x, y, w, split=2)
    before = math.sin((1 - w) * math.pi / 2) * x + math.sin(w * math.pi / 2) * y
    after = math.sin(w * math.pi / 2) * x + math.sin((1 - w) * math.pi / 2) * y
    assert np.allclose(child[:2], before[:2]) and np.allclose(child[2:], after[2:])
    assert np.allclose(flat_slerp_split(x, y, w, split=None), slerp(w, x, y))
    assert np.allclose(slerp(0.0, x, y), x) and np.allclose(slerp(1.0, x, y), y)
    assert np.allclose(slerp(0.5, x, 2 * x), 1.5 * x)  # parallel: linear
    assert np.allclose(slerp(0.5, np.zeros(4), y), 0.5 * y)  # a zero vector: linear

    opt = m2n2(dim=6, initial=[np.arange(6.0), np.arange(6.0)[::-1] - 2])
    init = opt.ask(2)
    opt.tell(init, [result([1, 0]), result([0, 1])])
    for child in opt.ask(20):  # without mutation a child is exactly the crossover of its parents
        parents = {c.id: c.genome for c in init}
        expected = flat_slerp_split(parents[child.parents[0]], parents[child.parents[1]], child.meta["w"], child.meta["split"])
        assert np.array_equal(child.genome, expected)


def expert_scores(x: np.ndarray) -> np.ndarray:
    return (np.abs(np.asarray(x) - 1.0) < 0.2).astype(float)


@pytest.mark.parametrize("split", [True, False])
def test_merging_two_complementary_experts_needs_the_split(split: bool) -> None:
    """Expert A knows genes 0-4, expert B genes 5-9 (orthogonal). Only a split-point SLERP can
    produce a child that knows all ten; a single SLERP weight cannot (it scales both halves)."""
    a, b = np.r_[np.ones(5), np.zeros(5)], np.r_[np.zeros(5), np.ones(5)]
    opt = make_optimizer("m2n2", dim=10, bounds=None, x0=None, seed=1, objectives=ACC, initial=[a, b], split=split)
    for _ in range(400):
        cands = opt.ask(1)
        opt.tell(cands, [result(expert_scores(c.genome)) for c in cands])
        if opt.best()[1].objectives["acc"] == 1.0:
            break
    best = opt.best()[1].objectives["acc"]
    assert (best == 1.0) if split else (best <= 0.5)


def test_per_sample_scores_are_required_and_consistent() -> None:
    opt = m2n2()
    init = opt.ask(2)
    with pytest.raises(ConfigError, match="m2n2 needs per-sample scores") as info:
        opt.tell(init[:1], [EvalResult({"acc": 0.5}, dict(ACC))])
    assert "\n" not in str(info.value)
    opt = m2n2()
    init = opt.ask(2)
    opt.tell(init[:1], [result([1, 0, 1])])
    with pytest.raises(ConfigError, match="same documents"):
        opt.tell(init[1:], [result([1, 0])])
    opt = m2n2()
    init = opt.ask(2)
    with pytest.raises(ConfigError, match=">= 0"):
        opt.tell(init[:1], [result([1, -1, 0])])


def test_failed_children_never_enter_and_failed_initial_members_are_retried() -> None:
    opt = m2n2(archive_size=3)
    init = opt.ask(2)
    opt.tell(init, [EvalResult.failure("OOM", dict(ACC)), result([1, 0])])
    assert opt.members() == [init[1].id]
    for _ in range(2):  # the failed initial member is asked again (3 rounds in all) before any child
        retry = opt.ask(2)
        assert len(retry) == 1 and retry[0].meta == {"m2n2": "init", "init_index": 0}
        assert np.array_equal(retry[0].genome, init[0].genome)
        opt.tell(retry, [EvalResult.failure("OOM", dict(ACC))])
    children = opt.ask(3)  # genome mode goes on with one member
    assert all(c.meta["m2n2"] == "child" for c in children)
    opt.tell(children, [EvalResult.failure("NaN", dict(ACC))] * 3)
    assert opt.members() == [init[1].id]

    dead = m2n2()
    for _ in range(3):
        cands = dead.ask(2)
        dead.tell(cands, [EvalResult.failure("bad weights", dict(ACC))] * 2)
    assert dead.ask(2) == [] and "initial members failed 3 times (bad weights)" in dead.stopped


# ---- model mode ---------------------------------------------------------------------------------

LLAMA_NAMES = [
    "lm_head.weight",
    "model.embed_tokens.weight",
    *[f"model.layers.{i}.{p}" for i in range(12) for p in ("input_layernorm.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight")],
    "model.norm.weight",
]


def test_split_t_is_exact_for_every_tensor() -> None:
    units = split_units(LLAMA_NAMES)
    assert units[0] == ["model.embed_tokens.weight"] and units[-1] == ["lm_head.weight", "model.norm.weight"]
    assert len(units) == 14 and all(len(u) == 3 for u in units[1:-1])
    assert [place.split(".")[2] for place in units[12]] == ["11"] * 3  # layer 11 after layer 10
    for split in range(len(units) + 1):
        t = compile_split_t(units, split, 0.3)
        for i, unit in enumerate(units):
            for name in unit:
                assert evaluate_setting(t, name, 0.0) == (0.3 if i < split else 0.7)
    compact = compile_split_t(units, 4, 0.3)
    assert compact[1] == {"filter": "model.layers.0.", "value": 0.3} and compact[-1] == {"value": 0.7}
    # 'layers.1.' must not catch layers 10 and 11: checked above for every split.

    # Names where a short filter is a substring of another tensor ('0.weight' of '10.weight').
    mlp = [f"{i}.weight" for i in range(12)]
    units = [[n] for n in mlp]
    for split in (1, 3, 11):
        t = compile_split_t(units, split, 0.25)
        assert all(evaluate_setting(t, n, 0.0) == (0.25 if i < split else 0.75) for i, n in enumerate(mlp))


class Port:
    """The archive port of a run, in small: materialize the member and register archive:<id>."""

    def __init__(self, pool, root: Path):
        self.pool, self.root, self.persisted = pool, root, []

    def persist(self, member_id: int, candidate) -> None:
        from evomerge.merge.writer import write_model

        out = write_model(candidate.recipe, self.pool, self.root / "archive" / str(member_id))
        self.pool.register(f"archive:{member_id}", out)
        self.persisted.append(member_id)


def test_model_mode_children_are_slerp_recipes_over_archive_members(llama_family: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from evomerge.merge.engine import materialize
    from evomerge.merge.sources import SourcePool

    pool = SourcePool(aliases={k: v for k, v in llama_family.items() if k in "abc"})
    names = pool.get("a").names
    port = Port(pool, tmp_path)
    opt = make_optimizer(
        "m2n2", dim=1, bounds=None, x0=None, seed=5, objectives=ACC,
        mode="model", archive_size=3, initial_models=["a", "b", "c"], tensor_names=names, archive_port=port,
    )  # fmt: skip
    units = opt.units

    def evaluate(cand) -> EvalResult:
        state = materialize(cand.recipe, pool)
        flat = torch.cat([state[n].flatten() for n in sorted(state)])
        return result((flat[:64] > flat[64:128]).float().numpy())

    init = opt.ask()
    assert [c.recipe.merge_method for c in init] == ["passthrough"] * 3
    assert opt.ask(1) == []  # children wait for the initial members
    opt.tell(init, [evaluate(c) for c in init])
    assert port.persisted == [c.id for c in init]
    for _ in range(6):
        (child,) = opt.ask(1)
        a, b = child.parents
        assert a != b and {a, b} <= set(opt.members())
        recipe = Recipe.parse(child.recipe.to_dict())  # a complete, valid mergekit config
        assert recipe.merge_method == "slerp" and recipe.base_model == f"archive:{a}"
        assert recipe.model_refs() == [f"archive:{a}", f"archive:{b}"]
        # Tensors before the split are SLERP(w), the others SLERP(1 - w), as plain recipes build them.
        merged = materialize(recipe, pool)
        w, split = child.meta["w"], child.meta["split"]
        plain = {
            t: materialize(Recipe.parse({**recipe.to_dict(), "parameters": {"t": t}}), pool) for t in (w, 1.0 - w)
        }
        for i, unit in enumerate(units):
            for name in unit:
                assert torch.equal(merged[name], plain[w if i < split else 1.0 - w][name])
        opt.tell([child], [evaluate(child)])
    assert set(opt.members()) <= set(port.persisted)
    entered = [m for m in opt.members() if m not in {c.id for c in init}]
    if entered:
        lineage = opt.lineage(entered[0])
        assert lineage[-1][0] == entered[0]
        assert {r.merge_method for _, r in lineage} <= {"passthrough", "slerp"}
        assert any(r.merge_method == "passthrough" for _, r in lineage)


def test_model_mode_bad_input() -> None:
    base = {"dim": 1, "bounds": None, "x0": None, "seed": 0, "objectives": ACC, "mode": "model"}
    good = {"initial_models": ["a", "b"], "tensor_names": LLAMA_NAMES, "archive_port": Port(None, Path("."))}
    cases = [
        ({**good, "mutation_sigma": 0.01}, "mutation is for genome mode"),
        ({**good, "initial_models": ["a"]}, "at least two initial_models"),
        ({**good, "tensor_names": None}, "needs tensor_names"),
        ({**good, "archive_port": None}, "needs an archive_port"),
        ({**good, "crossover": False}, "keep crossover on"),
        ({**good, "mode": "weights"}, "unknown m2n2 mode"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            make_optimizer("m2n2", **{**base, **options})
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="archive_size must be at least 2"):
        make_optimizer("m2n2", dim=2, bounds=([0, 0], [1, 1]), x0=None, seed=0, objectives=ACC, archive_size=1)
