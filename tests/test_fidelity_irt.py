"""evomerge.fidelity.irt: the 2PL fit recovers known item parameters, abilities and full-set
scores are estimated within stated errors, fits are seeded and their state round-trips exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.fidelity import irt

GROUPS = ("add", "sort")


def synthetic(n_models: int, n_items: int, seed: int) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """0/1 responses of `n_models` models (correlated abilities, one per group) to `n_items`
    items per group, drawn from known 2PL parameters."""
    rng = np.random.default_rng(seed)
    groups = [g for g in GROUPS for _ in range(n_items)]
    gi = np.repeat(np.arange(len(GROUPS)), n_items)
    a = np.exp(rng.normal(0.0, 0.5, len(groups)))
    b = rng.normal(0.0, 1.2, len(groups))
    theta = rng.multivariate_normal(np.zeros(2), [[1.0, 0.5], [0.5, 1.0]], size=n_models)
    p = 1.0 / (1.0 + np.exp(-a * (theta[:, gi] - b)))
    y = (rng.random(p.shape) < p).astype(np.float64)
    return y, groups, {"a": a, "b": b, "theta": theta, "p": p}


@pytest.fixture(scope="module")
def fitted() -> tuple[irt.IrtModel, np.ndarray, list[str], dict[str, np.ndarray]]:
    y, groups, truth = synthetic(400, 80, seed=0)
    return irt.fit(y, groups, seed=0), y, groups, truth


def test_fit_recovers_item_parameters(fitted) -> None:
    model, _, _, truth = fitted
    assert np.corrcoef(model.difficulty, truth["b"])[0, 1] >= 0.9
    assert np.corrcoef(model.discrimination, truth["a"])[0, 1] >= 0.9
    assert np.corrcoef(model.abilities.ravel(), truth["theta"].ravel())[0, 1] >= 0.9


def test_abilities_and_full_set_scores_of_new_models_from_anchors(fitted) -> None:
    """New models (not in the fit), scored on 15 anchors per group: abilities within an RMSE of
    0.5 of the truth (15 items of average discrimination carry about 4 units of Fisher
    information: a posterior SD near 0.45), and each group's full-set mean (the mean of its 80
    items' expected scores) within a mean absolute error of 0.07; the anchors' own weighted mean
    is worse. The new models come from the training population, so anchors are chosen for it
    (`anchor_focus: mean`)."""
    model, y, groups, _ = fitted
    model = irt.IrtModel.from_state({**model.state_dict(), "config": {**model.state_dict()["config"], "anchor_focus": "mean"}})
    irt.choose_anchors(model, {"add": 15, "sort": 15}, seed=0, responses=y)
    assert len(model.anchors) == 30 and model.anchor_weights.sum() == pytest.approx(2.0)
    new, _, truth = synthetic(600, 80, seed=0)
    new, theta, p = new[400:], truth["theta"][400:], truth["p"][400:]
    gi = np.repeat(np.arange(2), 80)
    theta_err, est_err, anchor_err = [], [], []
    for i in range(len(new)):
        observed = {int(j): float(new[i, j]) for j in model.anchors}
        theta_err.append(model.ability(observed) - theta[i])
        est = model.estimate(observed)
        for g, name in enumerate(GROUPS):
            expected = p[i, gi == g].mean()
            est_err.append(est[name]["gp_irt"] - expected)
            anchor_err.append(est[name]["anchor_mean"] - expected)
    assert np.sqrt(np.mean(np.square(theta_err))) <= 0.5
    assert np.mean(np.abs(est_err)) <= 0.07
    assert np.mean(np.abs(est_err)) < np.mean(np.abs(anchor_err))


def test_fully_observed_group_is_its_exact_mean(fitted) -> None:
    model, y, _, _ = fitted
    observed = {j: float(y[0, j]) for j in range(80)}  # every "add" item, no "sort" item
    est = model.estimate(observed)
    assert est["add"]["gp_irt"] == pytest.approx(y[0, :80].mean(), abs=1e-12)
    assert est["add"]["observed"] == 80 and est["sort"]["observed"] == 0
    assert 0.0 < est["sort"]["p_irt"] < 1.0


def test_graded_scores_outside_unit_interval_are_scaled_back() -> None:
    """Continuous scores (e.g. log-likelihoods, negative) are fitted on their scaled range and
    estimated in their own units; missing entries are left out of the fit."""
    y, groups, _ = synthetic(60, 20, seed=1)
    graded = -3.0 + 2.0 * y + 0.1 * np.random.default_rng(1).random(y.shape)
    graded[5:, 3] = np.nan
    model = irt.fit(graded, groups, seed=0)
    irt.choose_anchors(model, {"add": 5, "sort": 5}, seed=0, responses=graded)
    est = model.estimate({int(j): float(graded[0, j]) for j in model.anchors})
    for name in GROUPS:
        assert -3.0 <= est[name]["gp_irt"] <= -0.9
    full = model.estimate({j: float(graded[0, j]) for j in range(20, 40)})
    assert full["sort"]["gp_irt"] == pytest.approx(graded[0, 20:40].mean(), abs=1e-12)


def test_seeded_fit_and_anchors_are_deterministic_and_state_round_trips() -> None:
    y, groups, _ = synthetic(80, 30, seed=2)

    def run(seed: int) -> irt.IrtModel:
        model = irt.fit(y, groups, seed=seed)
        return irt.choose_anchors(model, irt.allocate(8, {"add": 1.0, "sort": 1.0}, {"add": 30, "sort": 30}), seed=seed, responses=y)

    first, again = run(3), run(3)
    assert json.dumps(first.state_dict()) == json.dumps(again.state_dict())
    restored = irt.IrtModel.from_state(json.loads(json.dumps(first.state_dict())))
    assert json.dumps(restored.state_dict()) == json.dumps(first.state_dict())
    observed = {int(j): float(y[7, j]) for j in first.anchors}
    assert restored.estimate(observed) == first.estimate(observed)
    assert not np.array_equal(run(4).anchors, first.anchors) or run(4).state_dict() != first.state_dict()


def test_allocate_follows_weights_with_one_per_group_and_caps() -> None:
    assert irt.allocate(10, {"a": 1, "b": 1}, {"a": 100, "b": 100}) == {"a": 5, "b": 5}
    assert irt.allocate(10, {"a": 3, "b": 1}, {"a": 100, "b": 100}) == {"a": 8, "b": 2}
    assert irt.allocate(3, {"a": 100, "b": 1, "c": 0}, {"a": 100, "b": 100, "c": 9}) == {"a": 2, "b": 1, "c": 0}
    assert irt.allocate(10, {"a": 1, "b": 1}, {"a": 2, "b": 100}) == {"a": 2, "b": 8}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="every item"):
        irt.fit(np.array([[1.0, np.nan], [0.0, np.nan]]), ["x", "x"], seed=0)
    with pytest.raises(ValueError, match="models x items"):
        irt.fit(np.zeros((3, 2)), ["x"], seed=0)
    with pytest.raises(ValueError, match="version"):
        irt.IrtModel.from_state({"version": 0})


# ---------------------------------------------------------------------- the `irt` strategy
def stage_info(n_items: int, seed: int):
    """A stage of two tasks ("add", "sort") of `n_items` documents each, mean_acc their mean."""
    from evomerge.fidelity.base import StageInfo

    return StageInfo(
        stage="ps", n_docs={"add": n_items, "sort": n_items}, weights={"mean_acc": {"add": 1.0, "sort": 1.0}},
        directions={"mean_acc": True}, primary="mean_acc", seed=seed, top_k=3,
    )  # fmt: skip


def drive(strategy, responses: np.ndarray, info, start: int, stop: int, log: list) -> None:
    """Candidates start..stop-1 through the strategy's life cycle as the runner drives it: open,
    score what it wants (from `responses`), decide, estimate, tell."""
    from evomerge.fidelity.base import Member

    offsets = {"add": 0, "sort": info.n_docs["add"]}
    for cid in range(start, stop):
        member = Member(cid=cid, generation=cid // 5)
        strategy.open(member)
        while not member.done:
            for task, pos in member.missing().items():
                got = member.scores.setdefault(task, {})
                for p in pos.tolist():
                    got[p] = float(responses[cid, offsets[task] + p])
            strategy.decide([member])
        objectives = strategy.estimate(member)
        log.append((cid, member.n_scored, strategy.is_estimate(member), objectives["mean_acc"]))
        strategy.told(member, info.fitness(objectives))


def test_irt_strategy_warms_up_then_scores_anchors_and_resumes_exactly() -> None:
    from evomerge.fidelity import build_strategy
    n_items = 40
    y, _, truth = synthetic(70, n_items, seed=3)
    info = stage_info(n_items, seed=7)
    spec = {"strategy": "irt", "anchors": 10, "warmup": 20, "refit_every": 15, "novelty_margin": None, "anchor_focus": "mean", "rotate": False, "estimator": "gp_irt"}
    strategy = build_strategy(spec, info)
    for row in y[:5]:  # five baselines, fully scored
        strategy.observe({"add": dict(enumerate(row[:n_items])), "sort": dict(enumerate(row[n_items:]))})
    log: list = []
    drive(strategy, y[5:], info, 0, 35, log)
    saved = json.loads(json.dumps(strategy.state_dict()))
    resumed = build_strategy(spec, info)
    resumed.load_state_dict(saved)
    rest, rest_resumed = [], []
    drive(strategy, y[5:], info, 35, 65, rest)
    drive(resumed, y[5:], info, 35, 65, rest_resumed)
    assert rest == rest_resumed
    assert json.dumps(strategy.state_dict()) == json.dumps(resumed.state_dict())

    log += rest
    assert all(n == 2 * n_items and not est for _, n, est, _ in log[:20])
    assert all(n == 10 and est for _, n, est, _ in log[20:])
    assert strategy.fits == 4  # after the warm-up, then every 15 told candidates
    assert {t: len(p) for t, p in strategy.core().items()} == {"add": 5, "sort": 5}
    estimated = np.array([v for _, _, est, v in log if est])
    expected = truth["p"][5 + 20 : 5 + 65].mean(axis=1)
    assert np.mean(np.abs(estimated - expected)) <= 0.08


def test_irt_strategy_scores_a_novel_candidate_in_full_and_refits() -> None:
    """A candidate whose anchors beat every fully scored model's by more than the margin is scored
    on every document, told exactly, and refitted on; the others stay on anchors."""
    from evomerge.fidelity import build_strategy
    n_items = 30
    y, _, _ = synthetic(40, n_items, seed=4)
    y[:, :n_items] = 0.0  # nobody answers "add"...
    y[:, :n_items:7] = 1.0  # ...except a few easy items
    y[30, :n_items] = 1.0  # until candidate 30 - 4 masters it
    info = stage_info(n_items, seed=0)
    strategy = build_strategy({"strategy": "irt", "anchors": 8, "warmup": 6, "rotate": False, "estimator": "gp_irt", "novelty_margin": 0.1}, info)
    for row in y[:4]:
        strategy.observe({"add": dict(enumerate(row[:n_items])), "sort": dict(enumerate(row[n_items:]))})
    log: list = []
    drive(strategy, y[4:], info, 0, 36, log)
    full = [cid for cid, n, est, _ in log if n == 2 * n_items]
    assert full[:6] == list(range(6)) and 26 in full
    assert not log[26][2] and log[26][3] == pytest.approx(y[30].mean())
    assert strategy.fits >= 2
    assert all(n == 8 for cid, n, _, _ in log[6:] if cid not in full)


def test_draws_move_to_the_items_at_the_candidates_ability(fitted) -> None:
    """A draw by information (spread 0) takes items harder than the group's average when the
    candidates are strong (the easy ones all answer alike) and easier ones when they are weak;
    a uniform draw (spread 1) ignores the abilities; the same generator draws the same anchors."""
    model = irt.IrtModel.from_state(fitted[0].state_dict())  # the module's fit stays as it was
    counts = {"add": 8, "sort": 8}
    mean_b = {g: model.difficulty[model.groups == g].mean() for g in range(2)}

    def drawn_b(theta: float, spread: float, seed: int = 0) -> tuple[np.ndarray, dict[int, float]]:
        irt.draw_anchors(model, counts, np.full((5, 2), theta), np.random.default_rng(seed), spread=spread)
        assert [int((model.groups[model.anchors] == g).sum()) for g in range(2)] == [8, 8]
        assert model.anchor_weights.sum() == pytest.approx(2.0)
        return model.anchors.copy(), {g: model.difficulty[model.anchors][model.groups[model.anchors] == g].mean() for g in range(2)}

    _, high = drawn_b(2.5, 0.0)
    _, low = drawn_b(-2.5, 0.0)
    for g in range(2):
        assert high[g] > mean_b[g] + 0.5 and low[g] < mean_b[g] - 0.1 and high[g] - low[g] > 1.0
    assert np.array_equal(drawn_b(2.5, 1.0, seed=3)[0], drawn_b(-2.5, 1.0, seed=3)[0])
    assert np.array_equal(drawn_b(2.5, 0.5, seed=4)[0], drawn_b(2.5, 0.5, seed=4)[0])


def test_rotating_anchors_follow_candidates_past_the_ceiling_and_resume_exactly() -> None:
    """The saturation case: after the warm-up every candidate answers the easy half of "sort"
    (where fixed anchors chosen at the warm-up's abilities sit, every candidate would get one
    estimate). With `rotate` each generation draws its anchors at the abilities of the last one,
    so they move to the hard items, where the candidates still differ, and candidates of a
    generation get different estimates. A run resumed mid-generation from the saved state draws,
    scores and estimates exactly as the uninterrupted one."""
    from evomerge.fidelity import build_strategy
    n_items = 30
    rng = np.random.default_rng(5)
    y, _, _ = synthetic(70, n_items, seed=5)
    hard = np.arange(n_items, 2 * n_items) >= n_items + n_items // 2  # the last half of "sort"
    y[:10, n_items:] = (rng.random((10, n_items)) < np.where(hard, 0.05, 0.5)).astype(float)  # baselines + warm-up: weak
    y[10:, n_items:] = np.where(hard, (rng.random((60, n_items)) < 0.5).astype(float), 1.0)  # later: the easy half solved
    info = stage_info(n_items, seed=11)
    spec = {"strategy": "irt", "anchors": 10, "warmup": 6, "rotate": True, "spread": 0.0, "novelty_margin": None, "estimator": "p_irt"}
    strategy = build_strategy(spec, info)
    for row in y[:4]:
        strategy.observe({"add": dict(enumerate(row[:n_items])), "sort": dict(enumerate(row[n_items:]))})
    log: list = []
    hard_share = []

    def generation(start: int, stop: int) -> None:
        drive(strategy, y[4:], info, start, stop, log)
        if start >= 15 and start % 5 == 0:
            hard_share.extend(int(j) - n_items >= n_items // 2 for j in strategy.model.anchors if j >= n_items)

    for start in range(0, 35, 5):  # generations of 5
        generation(start, start + 5)
    generation(35, 37)  # stop inside generation 7: the state a resume would load
    resumed = build_strategy(spec, info)
    resumed.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    rest_resumed: list = []
    drive(resumed, y[4:], info, 37, 66, rest_resumed)
    generation(37, 40)
    for start in range(40, 66, 5):
        generation(start, min(start + 5, 66))
    assert log[-len(rest_resumed) :] == rest_resumed and json.dumps(strategy.state_dict()) == json.dumps(resumed.state_dict())
    assert np.mean(hard_share) >= 0.7  # mostly hard items (a uniform draw: half; 55 draws)
    last = [v for cid, _, est, v in log if est and cid >= 60]
    assert len(set(last)) == len(last)
    assert strategy.fits >= 10  # one fit per generation after the warm-up


def test_anchor_mean_estimator_tells_the_mean_of_a_uniform_draw() -> None:
    """`estimator: anchor_mean` with uniform rotating draws (`spread: 1`): a candidate after the
    warm-up is told each task's plain mean over its anchors (no model in between)."""
    from evomerge.fidelity import build_strategy
    from evomerge.fidelity.base import Member

    n_items = 20
    y, _, _ = synthetic(30, n_items, seed=6)
    info = stage_info(n_items, seed=2)
    strategy = build_strategy({"strategy": "irt", "anchors": 8, "warmup": 4, "spread": 1.0, "estimator": "anchor_mean"}, info)
    for row in y[:3]:
        strategy.observe({"add": dict(enumerate(row[:n_items])), "sort": dict(enumerate(row[n_items:]))})
    drive(strategy, y[3:], info, 0, 10, [])  # generations of 5: the warm-up, then one more
    member = Member(cid=10, generation=2)
    strategy.open(member)
    offsets = {"add": 0, "sort": n_items}
    member.scores = {t: {int(p): float(y[13, offsets[t] + int(p)]) for p in pos} for t, pos in member.want.items()}
    assert {t: len(pos) for t, pos in member.want.items()} == {"add": 4, "sort": 4}
    told = strategy.estimate(member)
    means = [np.mean(list(member.scores[t].values())) for t in ("add", "sort")]
    assert told["mean_acc"] == pytest.approx(np.mean(means), abs=1e-12)


def test_shrink_pulls_a_generation_toward_the_last_ones_mean_keeping_its_ranking() -> None:
    """`shrink: 0.5` tells each candidate of a generation halfway between its anchor mean and the
    mean of the previous generation's told fitness: the same documents as without shrink, the same
    ranking within a generation, half the spread; a resumed run estimates exactly as before."""
    from evomerge.fidelity import build_strategy

    n_items = 20
    y, _, _ = synthetic(40, n_items, seed=8)
    info = stage_info(n_items, seed=4)
    spec = {"strategy": "irt", "anchors": 8, "warmup": 4, "spread": 1.0, "estimator": "anchor_mean"}
    logs = {}
    for shrink in (0.0, 0.5):
        strategy = build_strategy({**spec, "shrink": shrink}, info)
        for row in y[:3]:
            strategy.observe({"add": dict(enumerate(row[:n_items])), "sort": dict(enumerate(row[n_items:]))})
        logs[shrink] = log = []
        drive(strategy, y[3:], info, 0, 27, log)
        if shrink:
            resumed = build_strategy({**spec, "shrink": shrink}, info)
            resumed.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
            rest: list = []
            drive(resumed, y[3:], info, 27, 35, rest)
        drive(strategy, y[3:], info, 27, 35, log)
    assert log[27:] == rest
    plain, shrunk = logs[0.0], logs[0.5]
    assert [r[:3] for r in plain] == [r[:3] for r in shrunk]  # same documents, same estimate flags
    for gen in range(2, 7):  # generations of 5; from the third on, the prior is the whole last one
        prior = np.mean([v for _, _, _, v in plain[5 * (gen - 1) : 5 * gen]])
        for (_, _, _, p), (_, _, _, s) in zip(plain[5 * gen : 5 * gen + 5], shrunk[5 * gen : 5 * gen + 5], strict=True):
            assert s == pytest.approx(prior + 0.5 * (p - prior), abs=1e-12)
        order = np.argsort([v for *_, v in plain[5 * gen : 5 * gen + 5]], kind="stable")
        assert np.array_equal(order, np.argsort([v for *_, v in shrunk[5 * gen : 5 * gen + 5]], kind="stable"))
