"""Fidelity strategies (evomerge/fidelity): racing promotes exactly its top fraction, sequential
stopping never drops a candidate that would have entered the top k, bad `fidelity:` options are
one line and exit 2, and a run killed mid-stage resumes to the same ledger and best under each
strategy. Runs use the digits zoo (one forward pass of a tiny MLP over 1,437 images per
candidate) with an M2N2 weights-space search, so the per-sample competition is covered too."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml

from evomerge.evaluate.classification import ClassificationEvaluator, ClassificationSpec
from evomerge.evaluate.registry import register_evaluator
from evomerge.fidelity import STRATEGIES
from evomerge.fidelity.base import Member, StageInfo
from evomerge.fidelity.sequential import Sequential, SequentialOptions
from evomerge.fidelity.strategies import Racing, RacingOptions, promoted
from tests.run_helpers import cli, rows


class SlowDigitsSpec(ClassificationSpec):
    kind: Literal["slow_digits"]  # type: ignore[assignment]


class SlowDigits(ClassificationEvaluator):
    """The digits evaluator, slowed by EVOMERGE_TEST_DELAY seconds per call, and stopping the
    driver like a crash at call EVOMERGE_TEST_CRASH_AT (counted per process)."""

    kind = "slow_digits"
    spec_model = SlowDigitsSpec
    calls = 0

    def _evaluate(self, model: Any, tokenizer: Any, split: Any, subset: Any, shard: Any) -> Any:
        SlowDigits.calls += 1
        if SlowDigits.calls == int(os.environ.get("EVOMERGE_TEST_CRASH_AT", "0")):
            raise KeyboardInterrupt
        time.sleep(float(os.environ.get("EVOMERGE_TEST_DELAY", "0")))
        return super()._evaluate(model, tokenizer, split, subset, shard)


register_evaluator("slow_digits", SlowDigits, replace=True)


# ---- strategies on constructed cases ----------------------------------------------------------


def info(n: int = 100, up: bool = True, top_k: int = 3, tasks: tuple[str, ...] = ("t",)) -> StageInfo:
    return StageInfo(
        stage="s", n_docs={t: n for t in tasks}, weights={"obj": {t: 1.0 for t in tasks}}, directions={"obj": up},
        primary="obj", seed=1, top_k=top_k,
    )  # fmt: skip


def fill(member: Member, truth: dict[str, np.ndarray]) -> None:
    """Score what the member wants, from its true per-sample scores."""
    for task, pos in member.missing().items():
        member.scores.setdefault(task, {}).update({int(p): float(truth[task][p]) for p in pos})


@pytest.mark.parametrize("n, eta", [(10, 1 / 3), (7, 0.5), (12, 0.25), (1, 0.3), (5, 0.99)])
def test_racing_promotes_exactly_the_top_fraction(n: int, eta: float) -> None:
    stage = info(n=90)
    racing = Racing(RacingOptions(eta=eta, rungs=[0.1, 0.4, 1.0]), stage)
    rng = np.random.default_rng(n)
    truth = [{"t": (rng.random(90) < p).astype(float)} for p in rng.random(n)]
    members = [Member(cid=i, generation=0) for i in range(n)]
    for m in members:
        racing.open(m)
        fill(m, truth[m.cid])
    assert {len(m.scores["t"]) for m in members} == {9}  # the first rung: the same 9 documents for all
    assert len({tuple(m.positions("t")) for m in members}) == 1
    alive = members
    for rung in (1, 2):
        before = {m.cid: racing.info.fitness(racing.estimate(m)) for m in alive}
        racing.decide(alive)
        on = [m for m in alive if not m.done]
        assert len(on) == promoted(len(alive), eta) == max(1, math.ceil(eta * len(alive) - 1e-9))
        ranked = sorted(alive, key=lambda m: (-before[m.cid], m.cid))  # ties: the earlier candidate
        assert [m.cid for m in on] == sorted(m.cid for m in ranked[: len(on)])
        for m in on:
            kept = set(m.positions("t"))
            fill(m, truth[m.cid])
            assert kept <= set(m.positions("t")) and len(m.scores["t"]) == (36 if rung == 1 else 90)  # nested rungs
        alive = on
    racing.decide(alive)
    assert all(m.done and m.is_full(stage) for m in alive)


def run_sequential(stage: StageInfo, truths: list[np.ndarray], **options: Any) -> tuple[list[Member], list[float]]:
    """Candidates scored one after the other by `sequential`; their members and told fitnesses."""
    seq = Sequential(SequentialOptions(**options), stage)
    out, told = [], []
    for cid, truth in enumerate(truths):
        m = Member(cid=cid, generation=cid)
        seq.open(m)
        while not m.done:
            fill(m, {"t": truth})
            seq.decide([m])
        fitness = stage.fitness(seq.estimate(m))
        seq.told(m, fitness)
        out.append(m)
        told.append(fitness)
    return out, told


@pytest.mark.parametrize("up", [True, False])
@pytest.mark.parametrize("bound", ["serfling", "worst_case"])
def test_sequential_never_drops_a_candidate_that_would_enter_the_top_k(up: bool, bound: str) -> None:
    """Candidates whose true accuracy (or error rate, lower is better) ranges from poor to good,
    in random order: any that stops early truly is outside the top k known when it was asked,
    and the top k of the search is the top k of scoring everything in full."""
    stage = info(n=400, up=up, top_k=3)
    rng = np.random.default_rng(0)
    quality = rng.permutation(np.linspace(0.2, 0.9, 40))
    truths = [(rng.random(400) < (q if up else 1 - q)).astype(float) for q in quality]
    full = [stage.fitness(stage.objectives({"t": float(t.mean())})) for t in truths]
    members, told = run_sequential(stage, truths, chunk=0.1, bound=bound)
    stopped = [m for m in members if not m.is_full(stage)]
    assert stopped, "nothing stopped early: the case tests nothing"
    for m in stopped:
        threshold = m.note["threshold"]
        assert threshold is not None and full[m.cid] < threshold, (m.cid, full[m.cid], threshold)
    top = sorted(range(len(full)), key=lambda i: -full[i])[:3]
    assert sorted(range(len(told)), key=lambda i: -told[i])[:3] == top
    assert all(members[i].is_full(stage) for i in top)
    scored = sum(m.n_scored for m in members)
    assert scored < 0.8 * 400 * len(truths)  # it does save documents


def test_sequential_bound_is_never_looser_than_the_worst_case() -> None:
    stage = info(n=50)
    bounds = {}
    for bound in ("worst_case", "serfling"):
        seq = Sequential(SequentialOptions(chunk=0.2, bound=bound), stage)
        m = Member(cid=0, generation=0)
        seq.open(m)
        fill(m, {"t": np.zeros(50)})
        bounds[bound] = seq.optimistic(m)
    assert bounds["worst_case"] == pytest.approx(0.8)  # 10 zeros, 40 ones at best
    assert 0 < bounds["serfling"] <= bounds["worst_case"]


def test_sample_stderr_is_the_spread_of_uniform_draws_and_never_claims_a_sample_exact() -> None:
    """The standard error a bounded re-scoring uses: over uniform draws without replacement it is
    the spread of their means; a draw all right still has one; every document has none."""
    from evomerge.fidelity.base import sample_stderr

    rng = np.random.default_rng(0)
    stage = info(n=200, tasks=("a", "b"))
    truth = {"a": (rng.random(200) < 0.7).astype(float), "b": (rng.random(200) < 0.4).astype(float)}
    means, errors = [], []
    for _ in range(2000):
        draw = {t: {int(p): float(v[p]) for p in rng.choice(200, 20, replace=False)} for t, v in truth.items()}
        means.append(np.mean([np.mean(list(d.values())) for d in draw.values()]))
        errors.append(sample_stderr(stage, draw))
    assert np.mean(errors) == pytest.approx(np.std(means), rel=0.1)
    assert sample_stderr(stage, {t: dict.fromkeys(range(20), 1.0) for t in truth}) > 0.02
    assert sample_stderr(stage, {t: dict(enumerate(v.tolist())) for t, v in truth.items()}) == 0.0


# ---- runs --------------------------------------------------------------------------------------


def experiment(fidelity: Any, evaluations: int = 30) -> dict:
    return {
        "name": "f",
        "seed": 5,
        "models": {"sources": ["zoo:digits/low", "zoo:digits/high"]},
        "stages": [
            {
                "name": "m2n2",
                "space": {"kind": "weights", "init": "model"},
                "evaluator": "digits",
                "evaluator_overrides": {"kind": "slow_digits"},
                "optimizer": {"name": "m2n2", "mode": "genome", "archive_size": 6, "initial_models": ["zoo:digits/low", "zoo:digits/high"]},
                "budget": {"evaluations": evaluations},
                "holdout_top_k": 2,
                "fidelity": fidelity,
            }
        ],
        "ray": {"workers": 0},
    }


def write(path: Path, exp: dict) -> Path:
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def digits_zoo() -> Path:
    from evomerge.zoo import build_zoo

    return build_zoo("digits")


STRATEGY_CASES = {
    "racing": {"strategy": "racing", "eta": 0.34},
    "sequential": {"strategy": "sequential", "chunk": 0.25, "delta": 0.2},
    "irt": {"strategy": "irt", "anchors": 40, "warmup": 6},
    "irt_fixed": {"strategy": "irt", "anchors": 40, "warmup": 6, "refit_every": 8, "rotate": False, "estimator": "gp_irt", "novelty_margin": 0.1},
    "irt_bounded": {"strategy": "irt", "anchors": 40, "warmup": 6, "estimator": "anchor_mean", "spread": 1.0, "rescore_z": 2.0},
    "racing_on_irt": {"strategy": "racing", "eta": 0.34, "over": "irt", "over_options": {"anchors": 40, "warmup": 6}},
    "racing_on_irt_fixed": {"strategy": "racing", "eta": 0.34, "over": "irt", "over_options": {"anchors": 40, "warmup": 6, "refit_every": 8, "rotate": False, "estimator": "gp_irt", "novelty_margin": 0.1}},
}


def comparable(run_dir: Path) -> list[dict]:
    return [r.comparable() for r in rows(run_dir)]


def best(run_dir: Path) -> dict:
    return json.loads((run_dir / "best" / "scores.json").read_text())


@pytest.fixture(scope="module")
def reference(digits_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """strategy case -> (its experiment file, its uninterrupted run), each run once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            where = tmp_path_factory.mktemp(f"reference_{name}")
            exp = write(where / "exp.yaml", experiment(STRATEGY_CASES[name]))
            code, out = cli("run", exp, "--out", where / "run")
            assert code == 0, out
            done[name] = (exp, where / "run")
        return done[name]

    return get


@pytest.mark.parametrize("name", list(STRATEGY_CASES))
def test_a_crash_mid_stage_resumes_to_the_same_ledger_and_best(name: str, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp, reference = reference(name)
    ref = rows(reference, split="search")
    assert any(r.estimate for r in ref) and any(not r.estimate for r in ref)
    assert all(r.docs == sum(len(v) for v in r.per_sample.values()) for r in ref)
    for crash_at in (17,):  # mid-stage, mid-generation, with rows after the last checkpoint
        run_dir = tmp_path / f"crashed{crash_at}"
        SlowDigits.calls = 0
        monkeypatch.setenv("EVOMERGE_TEST_CRASH_AT", str(crash_at))
        code, out = cli("run", exp, "--out", run_dir)
        assert code != 0 and "resume" in out, out
        partial = rows(run_dir)
        monkeypatch.delenv("EVOMERGE_TEST_CRASH_AT")
        code, out = cli("resume", run_dir)
        assert code == 0, out
        assert comparable(run_dir) == comparable(reference)
        assert [r.started for r in rows(run_dir)[: len(partial)]] == [r.started for r in partial]
        assert best(run_dir) == best(reference)


def test_kill_9_mid_race_then_resume_gives_the_same_ledger(reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_run_integrity import start_driver, wait_rows

    exp, reference = reference("racing")
    killed = tmp_path / "killed"
    monkeypatch.setenv("EVOMERGE_PLUGINS", "tests.test_fidelity")  # the driver's slow_digits kind
    proc = start_driver(["run", str(exp), "--out", str(killed)], tmp_path, delay="0.1")
    try:
        wait_rows(killed, 8, proc)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stage, in a race
    finally:
        proc.wait()
    assert 8 <= len(rows(killed)) < len(rows(reference))
    code, out = cli("resume", killed)
    assert code == 0, out
    assert comparable(killed) == comparable(reference)
    assert best(killed) == best(reference)


def test_the_best_and_the_top_k_are_scored_in_full_and_status_shows_documents(digits_zoo: Path, tmp_path: Path) -> None:
    """A racing run whose estimates would enter the top k: they are re-scored on the whole search
    split (rows `rescore_of`) and the stage's best and holdout rows are full-fidelity rows."""
    exp = experiment({"strategy": "racing", "eta": 0.2, "rungs": [0.05, 1.0]}, evaluations=24)
    exp["stages"][0]["holdout_top_k"] = 10  # more than the 8 candidates racing scores in full
    run_dir = tmp_path / "run"
    assert cli("run", write(tmp_path / "exp.yaml", exp), "--out", run_dir)[0] == 0
    search = rows(run_dir, split="search")
    full = {r.recipe_hash: r for r in search if not r.estimate and r.ok}
    holdout = rows(run_dir, split="holdout")
    assert len(holdout) == 10 and all(r.recipe_hash in full for r in holdout)
    assert best(run_dir)["recipe_hash"] in full and best(run_dir)["score"] == max(r.fitness for r in full.values())
    rescored = [r for r in search if "rescore_of" in r.meta]
    estimates = {r.seq: r for r in search if r.estimate}
    assert rescored and all(r.meta["rescore_of"] in estimates for r in rescored)
    # a re-score evaluates only the documents its estimate lacked
    assert all(r.meta["new_docs"] == r.docs - estimates[r.meta["rescore_of"]].docs for r in rescored)
    # status and report: documents against a full-fidelity run, the estimates' error
    code, out = cli("status", run_dir, "--json")
    figure = json.loads(out)["stages"][0]["documents"]
    assert {k: json.loads(out)["documents"][k] for k in ("evaluated", "full")} == {k: figure[k] for k in ("evaluated", "full")}  # one stage
    search = rows(run_dir, split="search")  # with the re-scores
    assert figure["full"] == 24 * 1437
    assert figure["evaluated"] == sum(r.meta["new_docs"] for r in search) < figure["full"]
    assert figure["ratio"] == pytest.approx(figure["full"] / figure["evaluated"])
    assert figure["estimates"] == sum(r.estimate for r in search)
    full = {r.recipe_hash: r.fitness for r in search if not r.estimate}
    errors = [r.fitness - full[r.recipe_hash] for r in search if r.estimate and r.recipe_hash in full]
    assert figure["estimate_error"]["n"] == len(errors) > 0
    assert figure["estimate_error"]["mean_abs"] == pytest.approx(np.mean(np.abs(errors)))
    code, text = cli("status", run_dir)
    assert f"fidelity racing: documents {figure['evaluated']:,} of {figure['full']:,}" in text and "mean |d|" in text
    assert cli("report", run_dir)[0] == 0
    assert "Documents evaluated" in (run_dir / "report" / "index.html").read_text()
    # rows lost (an estimate, a full row, a re-score): `resume --rebuild` re-creates the same ledger
    import shutil
    import sqlite3

    lost = tmp_path / "lost"
    shutil.copytree(run_dir, lost)
    with sqlite3.connect(lost / "ledger.sqlite") as conn:
        conn.execute("DELETE FROM evaluations WHERE seq IN (?, ?, ?)", (estimates[min(estimates)].seq, min(r.seq for r in search if not r.estimate), rescored[0].seq))
    code, out = cli("resume", lost, "--rebuild")
    assert code == 0, out

    def without_genome(run: Path) -> list[dict]:  # a re-created row keeps a weights genome only if it enters the top k then
        return [{k: v for k, v in row.items() if k != "genome"} for row in comparable(run)]

    assert without_genome(lost) == without_genome(run_dir) and best(lost) == best(run_dir)


def test_a_bounded_rescoring_scores_only_what_beats_the_kth_on_its_lower_bound(digits_zoo: Path, tmp_path: Path) -> None:
    """irt with `rescore_z`: the search is the one without it (the same told rows); at the end an
    estimate is scored in full only while its lower bound (estimate - z standard errors of its
    anchors' mean) beats the k-th full-fitness row, so fewer are than on the estimates alone,
    and the best and the holdout top k are full-fidelity rows."""
    from evomerge.fidelity.base import sample_stderr

    spec = {"strategy": "irt", "anchors": 40, "warmup": 6, "estimator": "anchor_mean", "spread": 1.0}
    search = {}
    for z in (0.0, 2.0):
        run_dir = tmp_path / f"z{z}"
        assert cli("run", write(tmp_path / f"z{z}.yaml", experiment({**spec, "rescore_z": z})), "--out", run_dir)[0] == 0
        search[z] = rows(run_dir, split="search")
    plain, bounded = search[0.0], search[2.0]
    assert [r.comparable() for r in plain if "rescore_of" not in r.meta] == [r.comparable() for r in bounded if "rescore_of" not in r.meta]
    rescored = {z: {r.recipe_hash for r in rs if "rescore_of" in r.meta} for z, rs in search.items()}
    assert rescored[2.0] and rescored[2.0] < rescored[0.0]
    full = {r.recipe_hash: r.fitness for r in bounded if not r.estimate and r.ok}
    kth = sorted(full.values(), reverse=True)[1]  # holdout_top_k 2
    task = next(iter(bounded[0].per_sample))
    stage = StageInfo(stage="m2n2", n_docs={task: 1437}, weights={"acc": {task: 1.0}}, directions={"acc": True}, primary="acc", seed=5, top_k=2)
    left = [r for r in bounded if r.estimate and r.recipe_hash not in full]
    assert left and all(r.fitness - 2.0 * sample_stderr(stage, {task: dict(enumerate(r.per_sample[task]))}) <= kth for r in left)
    assert any(r.fitness > kth for r in left)  # on its estimate alone it would have been re-scored
    run_dir = tmp_path / "z2.0"
    holdout = rows(run_dir, split="holdout")
    assert best(run_dir)["recipe_hash"] in full and holdout and all(r.recipe_hash in full for r in holdout)


def test_a_crash_in_the_bounded_rescoring_resumes_to_the_same_ledger_and_best(digits_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while scoring the bounded re-scores in full (after every candidate was told, before
    any re-score row), `resume` re-scores the same recipes: the same ledger and best."""
    exp = write(tmp_path / "exp.yaml", experiment(STRATEGY_CASES["irt_bounded"]))
    SlowDigits.calls = 0
    assert cli("run", exp, "--out", tmp_path / "whole")[0] == 0
    calls, whole = SlowDigits.calls, rows(tmp_path / "whole")
    rescores, holdouts = sum("rescore_of" in r.meta for r in whole), sum(r.split == "holdout" for r in whole)
    assert rescores >= 1
    SlowDigits.calls = 0
    monkeypatch.setenv("EVOMERGE_TEST_CRASH_AT", str(calls - holdouts - rescores + 1))  # the first re-score
    code, out = cli("run", exp, "--out", tmp_path / "crashed")
    assert code != 0 and "resume" in out, out
    partial = rows(tmp_path / "crashed")
    assert [r.comparable() for r in partial] == [r.comparable() for r in whole if "rescore_of" not in r.meta and r.split == "search"]
    monkeypatch.delenv("EVOMERGE_TEST_CRASH_AT")
    assert cli("resume", tmp_path / "crashed")[0] == 0
    assert comparable(tmp_path / "crashed") == comparable(tmp_path / "whole")
    assert best(tmp_path / "crashed") == best(tmp_path / "whole")


BAD = [
    ({"strategy": "nope"}, "stages[0].fidelity.strategy: unknown fidelity strategy 'nope'; valid: full, racing"),
    ({"strategy": "racing", "eta": 1.5}, "stages[0].fidelity.eta: must be less than 1"),
    ({"strategy": "racing", "rate": 0.5}, "stages[0].fidelity.rate: unknown option of strategy 'racing'; valid: eta, first, rungs"),
    ({"strategy": "racing", "rungs": [0.2, 0.5]}, "stages[0].fidelity.rungs: the last rung must be 1.0"),
    ({"strategy": "racing", "rungs": [0.5, 0.2, 1.0]}, "stages[0].fidelity.rungs: must be increasing shares in (0, 1]"),
    ({"strategy": "racing", "rungs": [0.5, 1.0], "first": 0.1}, "stages[0].fidelity: give rungs or first, not both"),
    ({"strategy": "sequential", "chunk": 0}, "stages[0].fidelity.chunk: must be greater than 0"),
    ({"strategy": "sequential", "score_range": [1, 0]}, "stages[0].fidelity: score_range must be [lo, hi] with hi > lo"),
    ({"strategy": "sequential", "top_k": 0}, "stages[0].fidelity.top_k: must be greater than or equal to 1"),
    ({"strategy": "racing", "over": "irt", "over_options": {"anchors": 0}}, "stages[0].fidelity.over_options.anchors: must be greater than or equal to 1"),
    ({"strategy": "racing", "over": "racing"}, "stages[0].fidelity: racing can run over a strategy that scores candidates one by one"),
    ({"strategy": "irt", "spread": 1.5}, "stages[0].fidelity.spread: must be less than or equal to 1"),
    ({"strategy": "irt", "rotate": "sometimes"}, "stages[0].fidelity.rotate: must be a valid boolean"),
    ({"strategy": "irt", "estimator": "p_irt", "rescore_z": 1.0}, "stages[0].fidelity: rescore_z bounds the sampling error of estimator anchor_mean, not of p_irt"),
    (["racing"], "stages[0].fidelity: give a strategy name or a mapping with 'strategy:', got ['racing']"),
]


@pytest.mark.parametrize("fidelity, message", BAD)
def test_bad_fidelity_options_are_one_line_and_exit_2(fidelity: Any, message: str, tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yaml", experiment(fidelity))
    code, out = cli("run", exp, "--out", tmp_path / "run")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert message in out, out
    assert not (tmp_path / "run").exists()


def test_a_strategy_needs_an_evaluator_that_selects_documents(digits_zoo: Path, tmp_path: Path) -> None:
    exp = experiment("racing")
    exp["stages"][0]["evaluator"] = {"kind": "python", "callable": "tests.test_run:score", "objectives": {"acc": True}}
    exp["stages"][0].pop("evaluator_overrides")
    code, out = cli("run", write(tmp_path / "exp.yaml", exp), "--out", tmp_path / "run")
    errors = [line for line in out.splitlines() if line.startswith("error")]  # after the zoo's progress line
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert "stages[0].fidelity: strategy 'racing' scores chosen documents; evaluator kind 'python' cannot select them" in errors[0]


def test_strategies_are_registered_once() -> None:
    assert {"full", "racing", "sequential"} <= set(STRATEGIES.names())
    assert STRATEGIES.get("full").FULL and STRATEGIES.get("racing").GROUPED and not STRATEGIES.get("sequential").GROUPED


def test_a_version_1_run_dir_opens_resumes_and_shows_its_documents(digits_zoo: Path, tmp_path: Path) -> None:
    """A run directory written before the ledger had `docs` and `estimate` (schema 1): status and
    report read it as it is, resume migrates it and goes on."""
    import sqlite3

    exp = experiment("full", evaluations=12)
    for key in ("fidelity",):
        exp["stages"][0].pop(key)
    run_dir = tmp_path / "old"
    assert cli("run", write(tmp_path / "exp.yaml", exp), "--out", run_dir)[0] == 0
    with sqlite3.connect(run_dir / "ledger.sqlite") as conn:
        conn.execute("ALTER TABLE evaluations DROP COLUMN estimate")
        conn.execute("ALTER TABLE evaluations DROP COLUMN docs")
        conn.execute("UPDATE info SET value = '1' WHERE key = 'schema_version'")
    text = (run_dir / "experiment.yaml").read_text().replace("    fidelity: full\n", "")
    (run_dir / "experiment.yaml").write_text(text)
    code, out = cli("status", run_dir, "--json")
    assert code == 0, out
    documents = json.loads(out)["stages"][0]["documents"]
    assert documents["evaluated"] == documents["full"] == 12 * 1437 and documents["ratio"] == 1.0 and documents["estimates"] == 0
    assert cli("report", run_dir)[0] == 0
    code, out = cli("resume", run_dir, "--set", "stages.m2n2.budget.evaluations=18")
    assert code == 0, out
    search = rows(run_dir, split="search")
    assert len(search) == 18 and all(r.docs == 1437 and not r.estimate for r in search)
    with sqlite3.connect(run_dir / "ledger.sqlite") as conn:
        assert conn.execute("SELECT value FROM info WHERE key = 'schema_version'").fetchone()[0] == "2"
    code, out = cli("status", run_dir)
    assert code == 0 and "fidelity full: documents 25,866 of 25,866 a full-fidelity run scores (1.00x fewer)" in out, out

