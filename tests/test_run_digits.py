"""The M2N2 digits set-ups (experiments/digits_m2n2_*.yaml) through the full `evomerge run` path,
at small budgets: weights-space candidates on in-process and Ray workers, ledger, status, export
(a DigitsMLP directory), `kill -9` then resume, and `resume --set`.

Each run is seconds of search (a candidate is one forward pass of a 19,210-parameter MLP over the
1,437 training images); most of a test's time is the CLI's start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.run.ledger import Ledger
from tests.run_helpers import cli, row_count, rows

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "experiments" / "digits_m2n2_scratch.yaml"
PRETRAINED = ROOT / "experiments" / "digits_m2n2_pretrained.yaml"


def search_rows(run_dir: Path) -> list:
    return rows(run_dir, stage="m2n2", split="search")


def status_of(run_dir: Path) -> dict:
    code, out = cli("status", run_dir, "--json")
    assert code == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def digits_zoo() -> Path:
    from evomerge.zoo import build_zoo

    return build_zoo("digits")


def test_scratch_run_evolves_weights_far_past_its_random_start(digits_zoo: Path, tmp_path: Path) -> None:
    from evomerge.zoo.digits import DigitsMLP, accuracy

    run_dir = tmp_path / "scratch"
    code, out = cli("run", SCRATCH, "--out", run_dir, "--local", "--set", "stages.m2n2.budget.evaluations=300")
    assert code == 0, out
    rows = search_rows(run_dir)
    assert len(rows) == 300 and all(r.ok for r in rows)
    start = max(r.fitness for r in rows if r.meta.get("parents") is None)  # the two N(0, 0.01^2) members
    status = status_of(run_dir)
    best = status["best"]
    assert status["finished"] and status["stages"][0]["space_kind"] == "weights"
    assert best["score"] == max(r.fitness for r in rows) and best["score"] > start + 0.05, (start, best)
    # The ledger keeps every row's per-image scores but the 19,210-gene genome only on rows that
    # entered the top 1 when written (the best among them).
    kept = [r for r in rows if r.genome is not None]
    assert 0 < len(kept) < 60 and max(kept, key=lambda r: r.fitness).recipe_hash == best["recipe_hash"]
    assert all(len(r.per_sample["digits"]) == 1437 for r in rows[:3])

    model_dir = tmp_path / "model"
    code, out = cli("export", run_dir, "--out", model_dir)
    assert code == 0, out
    model = DigitsMLP.from_pretrained(model_dir)  # the run's best, as a DigitsMLP directory
    assert accuracy(model, "train") == pytest.approx(best["score"])
    assert accuracy(model, "test") == pytest.approx(best["holdout"])
    card = (model_dir / "README.md").read_text()
    assert "raw weights, not a merge" in card and "DigitsMLP.from_pretrained" in card and "holdout/acc" in card
    recipe = (run_dir / "best" / "recipe.yaml").read_text()
    assert "passthrough" in recipe and str((run_dir / "best" / "model").resolve()) in recipe


def test_pretrained_run_on_ray_workers_beats_both_experts(digits_zoo: Path, tmp_path: Path, ray_session) -> None:
    from evomerge.zoo.digits import DigitsMLP, accuracy

    run_dir = tmp_path / "pretrained"
    code, out = cli("run", PRETRAINED, "--out", run_dir, "--set", "stages.m2n2.budget.evaluations=80", "--set", "ray.workers=2")
    assert code == 0, out
    rows = search_rows(run_dir)
    assert len(rows) == 80 and all(r.ok for r in rows)
    assert len({r.worker for r in rows}) == 2, {r.worker for r in rows}  # both Ray workers evaluated
    experts = [r.fitness for r in rows if r.candidate_id < 2]  # the initial members: zoo low and high
    low = accuracy(DigitsMLP.from_pretrained(digits_zoo / "low"), "train")
    high = accuracy(DigitsMLP.from_pretrained(digits_zoo / "high"), "train")
    assert sorted(experts) == pytest.approx(sorted([low, high]))
    best = status_of(run_dir)["best"]
    assert best["score"] > max(experts) + 0.2 and best["holdout"] > 0.75, (experts, best)
    code, out = cli("export", run_dir, "--out", tmp_path / "model")
    assert code == 0, out
    assert accuracy(DigitsMLP.from_pretrained(tmp_path / "model"), "test") == pytest.approx(best["holdout"])


def test_kill_9_then_resume_gives_the_same_ledger(digits_zoo: Path, tmp_path: Path) -> None:
    """The checkpoint of an M2N2 archive of raw weights is MBs, so it is written only every few
    tells; a resume replays the ledger rows after it and ends with the uninterrupted ledger."""
    budget = ("--set", "stages.m2n2.budget.evaluations=240")
    reference = tmp_path / "reference"
    assert cli("run", PRETRAINED, "--out", reference, "--local", *budget)[0] == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "run", str(PRETRAINED), "--out", str(killed), "--local", *budget],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 240
    while row_count(killed) < 60 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = row_count(killed)
    assert 60 <= done_before < 240
    code, out = cli("resume", killed, "--local")
    assert code == 0, out
    with Ledger.open(reference / "ledger.sqlite", readonly=True) as a, Ledger.open(killed / "ledger.sqlite", readonly=True) as b:
        assert [r.comparable() for r in a.rows()] == [r.comparable() for r in b.rows()]
    assert status_of(killed)["best"] == status_of(reference)["best"]


def test_resume_set_changes_budgets_and_refuses_the_rest(digits_zoo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert cli("run", PRETRAINED, "--out", run_dir, "--local", "--set", "stages.m2n2.budget.evaluations=30")[0] == 0
    first = status_of(run_dir)
    assert first["finished"] and first["evaluations"] == 30
    for key, field in (("seed=7", "seed"), ("stages.m2n2.optimizer.alpha=0.5", "stages[0].optimizer.alpha"),
                       ("models.sources=[zoo:digits/low]", "models.sources"), ("stages.m2n2.evaluator=zoo_all", "stages[0].evaluator")):  # fmt: skip
        code, out = cli("resume", run_dir, "--local", "--set", key)
        assert code == 2 and f"{field}: cannot change on resume" in out and out.count("\n") == 1, out
    code, out = cli("resume", run_dir, "--local", "--set", "stages.m2n2.budget.evaluations=20")
    assert code == 2 and "stages[0].budget.evaluations: stage 'm2n2' is finished; raise its budget" in out, out
    # A raised budget reopens the finished last stage: the search goes on from where it stopped.
    code, out = cli("resume", run_dir, "--local", "--set", "stages.m2n2.budget.evaluations=60", "--set", "stages.m2n2.holdout_top_k=2")
    assert code == 0, out
    assert "changed: stages[0].budget.evaluations: 30 -> 60" in out
    status = status_of(run_dir)
    assert status["finished"] and status["evaluations"] == 60 and status["budget"] == 60
    assert status["best"]["score"] >= first["best"]["score"]
    rows = search_rows(run_dir)
    assert [r.candidate_id for r in rows] == list(range(60))  # nothing evaluated twice, ids go on
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        holdout = [r for r in ledger.rows(stage="m2n2", split="holdout")]
    assert len({r.recipe_hash for r in holdout}) >= 2  # the new top 2 were scored on holdout
    assert "stages[0].budget.evaluations: 30 -> 60" in (run_dir / "resume.log").read_text()
    assert "evaluations: 60" in (run_dir / "experiment.yaml").read_text()
