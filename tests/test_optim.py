"""Every optimizer behind one ask/tell: convergence on cheap analytic functions, bounds, failures,
multi-objective fronts, budgets, seeding and the one-line errors."""

from __future__ import annotations

import math
import random as pyrandom

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim import OPTIMIZERS, make_optimizer
from evomerge.optim.fitness import Objectives, dominates, fill_failures

LOSS = {"loss": False}


def sphere(x: np.ndarray, center: float = 0.3) -> float:
    return float(np.sum((np.asarray(x) - center) ** 2))


def per_sample(x: np.ndarray) -> dict[str, np.ndarray]:
    """0/1 per sample: sample j is right when gene j % dim is within its tolerance of 0.3."""
    x = np.asarray(x)
    tol = np.linspace(0.005, 3.0, 120)
    return {"t": (np.abs(x[np.arange(120) % x.size] - 0.3) < tol).astype(np.float64)}


def loss_result(x: np.ndarray) -> EvalResult:
    return EvalResult({"loss": sphere(x)}, dict(LOSS), per_sample=per_sample(x))


def drive(opt, evaluate=loss_result, rounds: int = 50, n: int | None = None) -> list:
    asked = []
    for _ in range(rounds):
        cands = opt.ask(n)
        if not cands:
            if opt.stopped:
                break
            continue
        asked.extend(cands)
        opt.tell(cands, [evaluate(c.genome) for c in cands])
    return asked


CONVERGENCE = [
    ("cmaes", {"popsize": 8}, 60, None, 1e-8),
    ("cmaes", {"popsize": 8, "diagonal": True}, 80, None, 1e-6),
    ("optuna", {"sampler": "tpe", "sampler_options": {"n_startup_trials": 10}}, 60, 1, 0.05),
    ("optuna", {"sampler": "cmaes", "popsize": 6}, 90, 1, 0.01),
    ("optuna", {"sampler": "random"}, 60, 1, 0.3),
    ("random", {}, 30, 16, 0.25),  # 480 uniform draws in [-2, 2]^3: P(loss < 0.25) ~ 98%
    ("m2n2", {"mutation_sigma": 0.05, "init_sigma": 0.5}, 600, 1, 0.01),
]


@pytest.mark.parametrize(("name", "options", "rounds", "n", "target"), CONVERGENCE, ids=lambda v: str(v)[:24])
def test_converges_on_a_sphere(name: str, options: dict, rounds: int, n: int | None, target: float) -> None:
    opt = make_optimizer(name, dim=3, bounds=([-2] * 3, [2] * 3), x0=[1.5, -1.5, 1.0], seed=1, objectives=LOSS, **options)
    drive(opt, rounds=rounds, n=n)
    cand, result = opt.best()
    assert result.objectives["loss"] < target, (name, options, result.objectives)
    assert sphere(cand.genome) == pytest.approx(result.objectives["loss"])


def test_grid_sweeps_every_point_and_stops() -> None:
    opt = make_optimizer("grid", dim=2, bounds=([0, 0], [1, 1]), x0=None, seed=0, objectives=LOSS, points=[5, 3])
    asked = drive(opt, n=4)
    assert len(asked) == 15 and opt.stopped and opt.ask(4) == []
    assert len({tuple(c.genome) for c in asked}) == 15
    best, _ = opt.best()
    assert best.genome.tolist() == [0.25, 0.5]  # the grid point nearest (0.3, 0.3)


def test_direction_is_respected() -> None:
    """Maximizing accuracy = -sphere finds the same optimum as minimizing the sphere."""
    opt = make_optimizer("cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=3, objectives={"acc": True}, popsize=6)
    drive(opt, evaluate=lambda x: EvalResult({"acc": -sphere(x)}, {"acc": True}), rounds=60)
    assert np.allclose(opt.best()[0].genome, 0.3, atol=1e-3)


def test_declared_objective_is_the_one_optimized() -> None:
    objectives = {"size": False, "loss": False}
    opt = make_optimizer("cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=3, objectives=objectives, objective="loss", popsize=6)
    drive(opt, evaluate=lambda x: EvalResult({"size": float(np.sum(x**2)), "loss": sphere(x)}, objectives), rounds=60)
    assert np.allclose(opt.best()[0].genome, 0.3, atol=1e-3)


ALL = [
    ("cmaes", {"popsize": 6}),
    ("cmaes", {"popsize": 6, "diagonal": True, "restarts": 1}),
    ("optuna", {"sampler": "tpe", "sampler_options": {"n_startup_trials": 5}}),
    ("optuna", {"sampler": "cmaes", "popsize": 4}),
    ("optuna", {"sampler": "nsgaii", "popsize": 4}),
    ("optuna", {"sampler": "random"}),
    ("random", {}),
    ("grid", {"points": 4}),
    ("m2n2", {"mutation_sigma": 0.5}),
    ("m2n2", {"alpha": 0.0, "attraction": False, "mutation_sigma": 0.5}),
]


@pytest.mark.parametrize(("name", "options"), ALL, ids=lambda v: str(v)[:30])
def test_bounds_are_never_left(name: str, options: dict) -> None:
    """The optimum (0.3, ...) lies outside these bounds, so the search presses against them."""
    lower, upper = np.array([0.5, -3.0, 0.9]), np.array([0.6, -2.0, 5.0])
    opt = make_optimizer(name, dim=3, bounds=np.stack([lower, upper], axis=1), x0=[0.55, -2.5, 1.0], seed=2, objectives=LOSS, **options)
    asked = drive(opt, rounds=40, n=5)
    assert len(asked) >= 40
    genomes = np.array([c.genome for c in asked])
    assert (genomes >= lower).all() and (genomes <= upper).all()


@pytest.mark.parametrize(("name", "options"), ALL, ids=lambda v: str(v)[:30])
def test_failed_candidates_do_not_stop_the_run(name: str, options: dict) -> None:
    def flaky(x: np.ndarray) -> EvalResult:
        h = int(abs(x[0]) * 1e6) % 10
        if h < 3:
            return EvalResult.failure("CUDA out of memory", dict(LOSS))
        if h == 3:
            return EvalResult({"loss": math.nan}, dict(LOSS))
        return loss_result(x)

    opt = make_optimizer(name, dim=3, bounds=([-2] * 3, [2] * 3), x0=[1.0, 1.0, 1.0], seed=4, objectives=LOSS, **options)
    # The first batch fails entirely: nothing to compare with yet.
    first = opt.ask(4)
    opt.tell(first, [EvalResult.failure("boom", dict(LOSS)) for _ in first])
    asked = drive(opt, evaluate=flaky, rounds=40, n=4)
    assert len(asked) >= 30
    best, result = opt.best()
    assert not result.failed and math.isfinite(result.objectives["loss"])


def test_failures_get_the_worst_value_of_their_batch() -> None:
    assert fill_failures([0.5, None, 0.2, None]) == [0.5, 0.2, 0.2, 0.2]
    assert fill_failures([None, None], fallback=-3.0) == [-3.0, -3.0]
    assert fill_failures([None]) == [0.0]
    obj = Objectives.build({"loss": False, "acc": True})
    assert obj.primary == "loss" and obj.score(EvalResult({"loss": 2.0, "acc": 0.1}, {"loss": False, "acc": True})) == -2.0
    assert obj.score(EvalResult.failure("x", {"loss": False, "acc": True})) is None


@pytest.mark.parametrize(("name", "options"), [
    ("optuna", {"sampler": "nsgaii", "popsize": 8}),
    ("optuna", {"sampler": "tpe", "sampler_options": {"n_startup_trials": 8}}),
    ("random", {}),
    ("grid", {"points": 9}),
])  # fmt: skip
def test_multi_objective_returns_a_non_dominated_front(name: str, options: dict) -> None:
    directions = {"f1": False, "f2": False, "acc": True}

    def two(x: np.ndarray) -> EvalResult:
        return EvalResult({"f1": float(np.sum(x**2)), "f2": float(np.sum((x - 1) ** 2)), "acc": 0.0}, directions)

    opt = make_optimizer(name, dim=2, bounds=([-1, -1], [2, 2]), x0=None, seed=5, objectives=directions, multi_objective=True, **options)
    asked = drive(opt, evaluate=two, rounds=80, n=1)
    front = opt.pareto_front()
    assert len(front) >= 4
    vectors = [opt.objectives.vector(r) for _, r in front]
    for i, a in enumerate(vectors):
        assert not any(dominates(b, a) for j, b in enumerate(vectors) if j != i)
    every = [opt.objectives.vector(two(c.genome)) for c in asked]
    for v in every:  # the front covers everything told
        assert any(dominates(f, v) or f == v for f in vectors)
    # Pareto-optimal points of this problem lie on the segment between (0, 0) and (1, 1).
    genomes = np.array([c.genome for c, _ in front])
    assert np.abs(genomes[:, 0] - genomes[:, 1]).mean() < 0.5


def test_cmaes_hands_out_one_generation_at_a_time() -> None:
    opt = make_optimizer("cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=0, objectives=LOSS, popsize=5)
    a = opt.ask(3)
    b = opt.ask(100)
    assert [c.id for c in a + b] == [0, 1, 2, 3, 4] and {c.generation for c in a + b} == {0}
    assert opt.ask(2) == [] and not opt.stopped  # waiting for the generation
    opt.tell(b, [loss_result(c.genome) for c in b])  # a partial generation is buffered
    assert opt.ask(2) == []
    opt.tell(a, [loss_result(c.genome) for c in a])
    nxt = opt.ask()
    assert [c.id for c in nxt] == [5, 6, 7, 8, 9] and {c.generation for c in nxt} == {1}
    with pytest.raises(ValueError, match="not asked or was already told"):
        opt.tell(a[:1], [loss_result(a[0].genome)])


def test_cmaes_ipop_restarts_double_the_population() -> None:
    opt = make_optimizer(
        "cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=0, objectives=LOSS, popsize=4, restarts=2,
        cma_options={"tolfun": 1e-3, "tolx": 1e-3},
    )  # fmt: skip
    asked = drive(opt, rounds=400)
    restarts = [c.meta["restart"] for c in asked]
    assert sorted(set(restarts)) == [0, 1, 2]
    assert opt.natural_batch() == 16 and opt.stopped and opt.stopped.startswith("cma-es converged")


def test_budgets_stop_the_search() -> None:
    opt = make_optimizer("random", dim=2, bounds=([0, 0], [1, 1]), x0=None, seed=0, objectives=LOSS, max_evals=10)
    assert len(opt.ask(7)) == 7 and len(opt.ask(7)) == 3 and opt.ask(7) == []
    assert "evaluation budget" in opt.stopped
    opt = make_optimizer("random", dim=2, bounds=([0, 0], [1, 1]), x0=None, seed=0, objectives=LOSS, max_seconds=0.0)
    opt.ask(1)
    assert opt.ask(1) == [] and "time budget" in opt.stopped


@pytest.mark.parametrize(("name", "options"), ALL, ids=lambda v: str(v)[:30])
def test_seeded_and_global_rng_untouched(name: str, options: dict) -> None:
    def genomes(seed: int) -> list:
        opt = make_optimizer(name, dim=3, bounds=([-2] * 3, [2] * 3), x0=[1.0, 1.0, 1.0], seed=seed, objectives=LOSS, **options)
        return [c.genome.tolist() for c in drive(opt, rounds=8, n=3)]

    np.random.seed(123)
    pyrandom.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), pyrandom.getstate()
    first = genomes(11)
    assert np.array_equal(np.random.get_state()[1], np_before) and pyrandom.getstate() == py_before
    assert genomes(11) == first
    if name != "grid":
        assert genomes(12) != first


def test_bad_input_is_one_clear_line() -> None:
    def err(*args, **kwargs) -> str:
        with pytest.raises(ConfigError) as info:
            make_optimizer(*args, **kwargs)
        text = str(info.value)
        assert "\n" not in text
        return text

    space = {"dim": 2, "bounds": ([0, 0], [1, 1]), "x0": [0.5, 0.5], "seed": 0, "objectives": LOSS}
    text = err("bayes", **space)
    assert "unknown optimizer 'bayes'" in text and all(n in text for n in OPTIMIZERS)
    text = err("cmaes", **space, sigma=0.3)
    assert "no option 'sigma'" in text and "sigma0" in text and "popsize" in text
    assert "popsize must be at least 2" in err("cmaes", **space, popsize=1)
    assert "popsize must be at least 2" in err("optuna", **space, sampler="nsgaii", popsize=1)
    assert "unknown optuna sampler 'gp'" in err("optuna", **space, sampler="gp")
    for name, opts in [("cmaes", {}), ("m2n2", {}), ("optuna", {"sampler": "cmaes"})]:
        assert "one objective" in err(name, **space, multi_objective=True, **opts)
    assert "not one of the experiment's objectives" in err("cmaes", **space, objective="acc")
    assert "grid has" in err("grid", dim=12, bounds=([0] * 12, [1] * 12), x0=None, seed=0, objectives=LOSS)
    assert "finite bounds" in err("optuna", dim=1, bounds=None, x0=[0.0], seed=0, objectives=LOSS)
    assert "lies outside the bounds" in err("random", dim=2, bounds=([0, 0], [1, 1]), x0=[2, 2], seed=0, objectives=LOSS)


def test_state_is_plain_json() -> None:
    import json

    opt = make_optimizer("cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=0, objectives=LOSS, popsize=4)
    drive(opt, rounds=3)
    opt.ask(2)
    state = json.loads(json.dumps(opt.state_dict(), allow_nan=False))
    assert state["format"] == "evomerge.optim/1" and state["impl"]["es"]["library"] == "cma"
    assert len(state["in_flight"]) == 2


def test_popsize_below_two_is_refused_everywhere() -> None:
    space = {"dim": 2, "bounds": ([0, 0], [1, 1]), "x0": [0.5, 0.5], "seed": 0, "objectives": LOSS}
    for name, opts in [("cmaes", {}), ("optuna", {"sampler": "cmaes"}), ("random", {}), ("grid", {})]:
        for bad in (1, 0):
            with pytest.raises(ConfigError, match=f"popsize must be at least 2, got {bad}"):
                make_optimizer(name, **space, popsize=bad, **opts)
    with pytest.raises(ConfigError, match="archive_size must be at least 2"):
        make_optimizer("m2n2", **space, archive_size=1)


def test_optuna_study_lives_in_the_run_directory(tmp_path) -> None:
    """`run_dir` puts the study in RUN/optuna.db, which another process (optuna-dashboard reads
    the storage the same way) opens with the told values, the candidate ids and the Pareto front."""
    import optuna

    directions = {"f1": False, "f2": False}

    def two(x: np.ndarray) -> EvalResult:
        return EvalResult({"f1": float(np.sum(x**2)), "f2": float(np.sum((x - 1) ** 2))}, directions)

    run = tmp_path / "runs" / "demo"
    opt = make_optimizer("optuna", dim=2, bounds=([-1, -1], [2, 2]), x0=None, seed=0, objectives=directions,
                         multi_objective=True, sampler="nsgaii", popsize=4, run_dir=str(run))  # fmt: skip
    assert opt.storage_url == f"sqlite:///{(run / 'optuna.db').resolve()}"
    drive(opt, evaluate=two, rounds=6)
    assert (run / "optuna.db").is_file()
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run / 'optuna.db'}")
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 24 and [t.user_attrs["evomerge_id"] for t in trials] == list(range(24))
    front_ids = sorted(c.id for c, _ in opt.pareto_front())
    assert front_ids == sorted(t.user_attrs["evomerge_id"] for t in study.best_trials)
    with pytest.raises(ConfigError, match="storage or run_dir, not both"):
        make_optimizer("optuna", dim=1, bounds=([0], [1]), x0=None, seed=0, objectives=LOSS, run_dir=str(run), storage="sqlite://")


def test_time_budget_counts_across_a_resume() -> None:
    import time

    opt = make_optimizer("cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=0, objectives=LOSS, popsize=4, max_seconds=0.2)
    cands = opt.ask()
    time.sleep(0.12)
    opt.tell(cands, [loss_result(c.genome) for c in cands])
    state = opt.state_dict()
    fresh = make_optimizer("cmaes", dim=2, bounds=([-2, -2], [2, 2]), x0=[1, 1], seed=0, objectives=LOSS, popsize=4, max_seconds=0.2)
    fresh.load_state_dict(state)
    assert len(fresh.ask()) == 4 and not fresh.stopped
    time.sleep(0.1)
    assert fresh.ask() == [] and "time budget spent" in fresh.stopped


def test_budget_counts_candidates_handed_out_not_a_generations_ids() -> None:
    # A scheduler with one free worker asks one candidate at a time; CMA-ES draws a whole
    # generation at once, but only what it hands out may count against max_evals.
    opt = make_optimizer("cmaes", dim=2, bounds=([-1, -1], [1, 1]), x0=[0.5, 0.5], seed=0, objectives=LOSS, popsize=4, max_evals=6)
    asked = 0
    while (cands := opt.ask(1)):
        asked += 1
        opt.tell(cands, [EvalResult({"loss": sphere(c.genome)}, dict(LOSS)) for c in cands])
    assert asked == 6 and opt.n_asked == 6
    assert "budget" in (opt.stopped or "")
