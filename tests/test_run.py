"""Runs end to end on tiny Llama checkpoints with a cheap deterministic `python` evaluator
(defined here, referenced from the experiments as `tests.test_run:score`)."""

from __future__ import annotations

import os
import time

import numpy as np


def score(model, tokenizer, split, subset=None, shard=None, delay: float = 0.0, raise_every: int = 0, interrupt_at: int = 0):
    """Per-sample scores in (0, 1) from the model's logits on fixed random token sequences
    (search and holdout draw different sequences). `delay` slows every call (kill tests);
    `raise_every` makes every n-th call of this process raise (failure tests); `interrupt_at`
    stops the whole driver at that call of the process, like a crash (resume tests)."""
    import torch

    from evomerge.evaluate.subset import shard_slice

    if interrupt_at:
        score.interrupt_calls = getattr(score, "interrupt_calls", 0) + 1
        if score.interrupt_calls == interrupt_at:
            raise KeyboardInterrupt
    if raise_every:
        score.calls = getattr(score, "calls", 0) + 1
        if score.calls % raise_every == 0:
            raise RuntimeError(f"planned failure #{score.calls}")
    delay = float(os.environ.get("EVOMERGE_TEST_DELAY", delay))
    gen = torch.Generator().manual_seed(0 if split == "search" else 1)
    ids = torch.randint(0, model.config.vocab_size, (24, 6), generator=gen)
    ids = ids[shard_slice(len(ids), shard)]
    with torch.no_grad():
        logits = model(ids).logits[:, -1, :].double()
    per = torch.sigmoid(4.0 * (logits[:, 0] - logits[:, 1])).numpy()
    if delay:
        time.sleep(delay)
    return {"objectives": {"acc": float(np.mean(per))}, "per_sample": {"t": per.tolist()}}


# ---- fixtures ---------------------------------------------------------------------------------

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from evomerge.run.ledger import Ledger  # noqa: E402
from tests.run_helpers import cli, row_count, rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVALUATOR = {"kind": "python", "callable": "tests.test_run:score", "objectives": {"acc": True}}


def experiment(family: dict[str, Path], **changes) -> dict:
    """A small one-stage PS experiment over the llama family (base + a, b)."""
    exp = {
        "name": "t",
        "seed": 7,
        "models": {"base": str(family["base"]), "sources": [str(family["a"]), str(family["b"])]},
        "stages": [
            {
                "name": "ps",
                "space": "ps_ties",
                "evaluator": dict(EVALUATOR),
                "optimizer": {"name": "cmaes", "popsize": 4},
                "budget": {"evaluations": 8},
                "holdout_top_k": 2,
            }
        ],
    }
    exp.update(changes)
    return exp


def write_exp(path: Path, exp: dict) -> Path:
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def two_stage_experiment(family: dict[str, Path]) -> dict:
    """PS (8 evaluations) then DFS over `stage:ps` (8) and a task-arithmetic baseline: 22 rows."""
    exp = experiment(family)
    exp["stages"].append(
        {
            "name": "dfs",
            "space": "dfs",
            "space_overrides": {"repeats": 1},
            "models": ["stage:ps", str(family["a"])],
            "evaluator": dict(EVALUATOR),
            "optimizer": {"name": "cmaes", "popsize": 4},
            "budget": {"evaluations": 8},
            "holdout_top_k": 2,
        }
    )
    a, b = str(family["a"]), str(family["b"])
    exp["baselines"] = [
        {"name": "ta", "recipe": {"merge_method": "task_arithmetic", "base_model": str(family["base"]), "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}}
    ]
    return exp




# ---- tests ------------------------------------------------------------------------------------


def test_two_stage_run_status_and_export(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """PS then DFS over `stage:ps`; ledger, holdout top-k, status --json, export + AutoModel."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.recipe import Recipe

    exp = two_stage_experiment(llama_family)
    run_dir = tmp_path / "run"
    code, out = cli("run", write_exp(tmp_path / "exp.yaml", exp), "--out", run_dir)
    assert code == 0, out
    assert (run_dir / "experiment.yaml").is_file() and (run_dir / "checkpoint" / "state.json").is_file()
    code, out = cli("run", tmp_path / "exp.yaml", "--out", run_dir)
    assert code == 2 and "already holds a run; continue it with `evomerge resume" in out
    frozen = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    assert frozen["stages"][0]["space"]["kind"] == "ps"  # the space spec is inlined

    all_rows = rows(run_dir)
    assert [r.seq for r in all_rows] == list(range(1, len(all_rows) + 1))
    for stage in ("ps", "dfs"):
        search = [r for r in all_rows if r.stage == stage and r.split == "search"]
        holdout = [r for r in all_rows if r.stage == stage and r.split == "holdout"]
        assert len(search) == 8 and all(r.ok for r in search)
        assert [r.candidate_id for r in search] == list(range(8))  # told in ask order
        ranked = sorted({r.recipe_hash: r for r in reversed(search)}.values(), key=lambda r: (-r.fitness, r.seq))
        assert [r.recipe_hash for r in holdout] == [r.recipe_hash for r in ranked[:2]]
        assert all(r.per_sample["t"] and len(r.per_sample["t"]) == 24 for r in search)
    assert (run_dir / "stages" / "ps" / "best_model" / "config.json").is_file()
    dfs_rows = [r for r in all_rows if r.stage == "dfs"]
    assert any("stages/ps/best_model" in r.recipe_yaml or "stage:ps" in r.recipe_yaml for r in dfs_rows)

    code, out = cli("status", run_dir, "--json")
    assert code == 0
    status = json.loads(out)
    # Both stages score with the same evaluator: the run's best is the best over both stages by
    # search fitness (ties: the earlier row), wherever it came from.
    best_row = max((r for r in all_rows if r.split == "search" and r.stage in ("ps", "dfs")), key=lambda r: (r.fitness, -r.seq))
    holdout_best = next(r for r in all_rows if r.split == "holdout" and r.stage == best_row.stage and r.recipe_hash == best_row.recipe_hash)
    assert status["finished"] is True and status["stage"] == "dfs"
    assert status["evaluations"] == 16 and status["budget"] == 16 and status["failures"] == 0
    assert status["best"]["score"] == pytest.approx(best_row.fitness)
    assert status["best"]["holdout"] == pytest.approx(holdout_best.fitness)
    assert status["best"]["recipe_hash"] == best_row.recipe_hash and status["best"]["stage"] == best_row.stage
    assert "over stages 'ps', 'dfs'" in status["best"]["selection"]
    dfs_best = status["stages"][1]["best"]  # each stage keeps its own best
    assert dfs_best["stage"] == "dfs" and dfs_best["score"] == max(r.fitness for r in dfs_rows if r.split == "search")
    assert [s["space_kind"] for s in status["stages"]] == ["ps", "dfs"]
    assert status["stages"][0]["objectives"] == [{"name": "acc", "higher_is_better": True}]
    (baseline,) = status["baselines"]
    assert baseline["name"] == "ta" and 0 < baseline["search"]["acc"] < 1 and 0 < baseline["holdout"]["acc"] < 1
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        assert ledger.stages() == ["ps", "dfs"] and len(ledger.baselines()) == 2
    code, text = cli("status", run_dir)
    assert code == 0 and "finished" in text and best_row.recipe_hash in text and f"stage {best_row.stage}" in text

    model_dir = tmp_path / "exported"
    code, out = cli("export", run_dir, "--out", model_dir)
    assert code == 0, out
    recipe = Recipe.from_yaml(run_dir / "best" / "recipe.yaml")
    assert all(Path(ref).is_dir() for ref in recipe.model_refs())  # mergekit can open every source
    assert recipe.evomerge.model_extra["scores"]["holdout"]["acc"] == pytest.approx(holdout_best.fitness)
    assert recipe.evomerge.model_extra["stage"] == best_row.stage
    card = (model_dir / "README.md").read_text()
    assert "xxh3:" in card and "holdout/acc" in card and "## Selection" in card and f"Stage `{best_row.stage}`" in card
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if best_row.stage == "dfs":
        path_length = sum(1 for s in recipe.slices for src in s.sources if src.num_layers == 1)
        assert "passthrough" in card and model.config.num_hidden_layers == path_length
    with torch.no_grad():  # the exported model scores what the run measured on holdout
        assert score(model.eval(), None, "holdout")["objectives"]["acc"] == pytest.approx(holdout_best.fitness, abs=1e-5)


def test_kill_9_then_resume_gives_the_same_ledger_and_best(llama_family: dict[str, Path], tmp_path: Path) -> None:
    exp = experiment(llama_family)
    exp["stages"][0]["budget"] = {"evaluations": 12}
    exp_file = write_exp(tmp_path / "exp.yaml", exp)
    reference = tmp_path / "reference"
    assert cli("run", exp_file, "--out", reference)[0] == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOMERGE_TEST_DELAY": "0.3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "run", str(exp_file), "--out", str(killed)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while row_count(killed) < 6 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        code, out = cli("resume", killed)  # a second driver on a live run is refused
        assert code == 2 and f"another process (pid {proc.pid})" in out
        os.kill(proc.pid, signal.SIGKILL)  # mid-generation, popsize 4
    finally:
        proc.wait()
    partial = rows(killed)
    assert 6 <= len(partial) < 12
    code, out = cli("status", killed, "--json")
    assert code == 0 and json.loads(out)["finished"] is False

    code, out = cli("resume", killed)
    assert code == 0, out
    assert [r.comparable() for r in rows(killed)] == [r.comparable() for r in rows(reference)]
    # nothing that finished before the kill was evaluated again
    assert [r.started for r in rows(killed)[: len(partial)]] == [r.started for r in partial]
    assert json.loads((killed / "best" / "scores.json").read_text()) == json.loads((reference / "best" / "scores.json").read_text())
    best_recipes = [yaml.safe_load((d / "best" / "recipe.yaml").read_text()) for d in (killed, reference)]
    for recipe in best_recipes:
        assert recipe["evomerge"].pop("run")["dir"]  # the only difference: where each run lives
    assert best_recipes[0] == best_recipes[1]
    code, out = cli("resume", killed)
    assert code == 0 and "finished" in out


def test_failing_candidates_are_recorded_and_many_in_a_row_stop_the_run(llama_family: dict[str, Path], tmp_path: Path) -> None:
    score.calls = 0
    exp = experiment(llama_family)
    exp["stages"][0]["evaluator"]["args"] = {"raise_every": 3}
    exp["stages"][0]["optimizer"] = {"name": "random"}
    exp["stages"][0]["budget"] = {"evaluations": 9}
    run_dir = tmp_path / "some"
    code, out = cli("run", write_exp(tmp_path / "a.yaml", exp), "--out", run_dir)
    assert code == 0, out
    search = [r for r in rows(run_dir) if r.split == "search"]
    failed = [r for r in search if not r.ok]
    assert len(search) == 9 and len(failed) == 3
    assert all("planned failure" in r.error and r.fitness == float("-inf") and r.per_sample == {} for r in failed)
    status = json.loads(cli("status", run_dir, "--json")[1])
    assert status["failures"] == 3 and status["finished"] is True

    score.calls = 0
    exp["stages"][0]["evaluator"]["args"] = {"raise_every": 1}
    exp["stages"][0]["budget"] = {"evaluations": 50}
    run_dir = tmp_path / "all"
    code, out = cli("run", write_exp(tmp_path / "b.yaml", exp), "--out", run_dir)
    assert code == 1
    assert "20 failed evaluations in a row" in out and "planned failure #20" in out
    assert len(rows(run_dir)) == 20


BAD = [
    ({"stages": [{"name": "ps", "space": "ps_ties", "evaluator": EVALUATOR, "optimizer": "cmaes", "budget": {"evaluations": 4}, "colour": 1}]}, "stages[0].colour: unknown field"),
    ({"models": {"sources": []}}, "models.sources"),
    ({"stages": [{"name": "ps", "space": "ps_nope", "evaluator": EVALUATOR, "optimizer": "cmaes", "budget": {"evaluations": 4}}]}, "stages[0].space: no built-in search spaces named 'ps_nope'"),
    ({"stages": [{"name": "ps", "space": "ps_ties", "evaluator": EVALUATOR, "optimizer": {"name": "cmaes", "popsiz": 4}, "budget": {"evaluations": 4}}]}, "stages[0].optimizer.popsiz: optimizer 'cmaes' has no option 'popsiz'"),
    ({"stages": [{"name": "ps", "space": "ps_ties", "evaluator": EVALUATOR, "optimizer": "cmaes", "budget": {}}]}, "stages[0].budget: give evaluations and/or seconds"),
    ({"stages": [{"name": "ps", "space": "ps_ties", "evaluator": {"kind": "nope"}, "optimizer": "cmaes", "budget": {"evaluations": 4}}]}, "stages[0].evaluator.kind"),
    ({"stages": [{"name": "ps", "space": "ps_ties", "evaluator": EVALUATOR, "optimizer": "cmaes", "budget": {"evaluations": 4}, "models": ["stage:dfs"]}]}, "'stage:dfs' is not an earlier stage"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_experiments_fail_before_anything_starts(llama_family: dict[str, Path], tmp_path: Path, change: dict, message: str) -> None:
    exp_file = write_exp(tmp_path / "bad.yaml", experiment(llama_family, **change))
    code, out = cli("run", exp_file, "--out", tmp_path / "run")
    assert code == 2, out
    assert out.count("\n") == 1 and str(exp_file) in out and message in out, out
    assert not (tmp_path / "run").exists()


def test_bad_sources_settings_and_run_dirs(llama_family: dict[str, Path], tmp_path: Path) -> None:
    exp = experiment(llama_family)
    exp["models"]["sources"][1] = str(tmp_path / "missing")
    code, out = cli("run", write_exp(tmp_path / "e.yaml", exp), "--out", tmp_path / "run")
    assert code == 2 and "models.sources[1]: model path" in out and "does not exist" in out
    code, out = cli("run", write_exp(tmp_path / "f.yaml", experiment(llama_family)), "--set", "stages.nope.budget.evaluations=3")
    assert code == 2 and "--set: cannot set 'stages.nope.budget.evaluations': no item named 'nope' (names: ps)" in out
    code, out = cli("status", tmp_path)
    assert code == 2 and "not a run directory" in out and out.count("\n") == 1


def test_m2n2_model_mode_keeps_its_archive_and_exports_with_lineage(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from evomerge.recipe import Recipe

    stage = {
        "name": "m2n2",
        "evaluator": dict(EVALUATOR),
        "optimizer": {"name": "m2n2", "mode": "model", "archive_size": 3},
        "budget": {"evaluations": 6},
    }
    exp = experiment(llama_family, stages=[stage])
    exp["models"] = {"sources": [str(llama_family[k]) for k in "abc"]}
    run_dir = tmp_path / "run"
    code, out = cli("run", write_exp(tmp_path / "m.yaml", exp), "--out", run_dir)
    assert code == 0, out
    search = [r for r in rows(run_dir) if r.split == "search"]
    assert len(search) == 6
    assert [Recipe.from_string(r.recipe_yaml).merge_method for r in search[:3]] == ["passthrough"] * 3
    children = search[3:]
    assert all(Recipe.from_string(r.recipe_yaml).model_refs()[0].startswith("archive:") for r in children)
    members = sorted(int(p.name) for p in (run_dir / "archive" / "m2n2").iterdir())
    assert {0, 1, 2} <= set(members)  # every member that entered the archive is on disk
    code, out = cli("export", run_dir, "--out", tmp_path / "model")
    assert code == 0, out
    recipe = Recipe.from_yaml(run_dir / "best" / "recipe.yaml")
    assert all(Path(ref).is_dir() for ref in recipe.model_refs())
    lineage = recipe.evomerge.model_extra.get("lineage")
    if recipe.merge_method == "slerp":
        assert lineage[-1]["merge_method"] == "slerp" and lineage[0]["merge_method"] == "passthrough"


class SyncPool:
    """A WorkerPool of `size` slots that runs everything submitted inside `wait()` (in this
    process), to test the scheduler's use of several workers without Ray."""

    def __init__(self, evaluator_spec: dict, size: int):
        from evomerge.run.worker_core import WorkerCore

        self.core = WorkerCore({}, evaluator_spec)
        self._size = size
        self.jobs: list = []
        self._queue: list = []

    def start(self, *args, **kwargs) -> None:  # pragma: no cover - the test builds it ready
        pass

    def add_source(self, ref: str, path: str) -> None:
        self.core.add_source(ref, path)

    def submit(self, job) -> None:
        self._queue.append(job)
        self.jobs.append(job)

    def wait(self, timeout=None) -> list:
        from evomerge.run.jobs import JobOutcome

        queued, self._queue = self._queue, []
        return [JobOutcome(j.job_id, self.core.run(j), f"sync-{i}", 1, time.time(), time.time()) for i, j in enumerate(queued)]

    @property
    def size(self) -> int:
        return self._size

    def idle(self) -> int:
        return self._size

    def shutdown(self) -> None:
        pass


def score_weighted(model, tokenizer, split, subset=None, shard=None):
    """`score` as an EvalResult that `EvalResult.combine` can put together from shards."""
    from evomerge.evaluate.result import EvalResult

    out = score(model, tokenizer, split, subset, shard)
    per = np.asarray(out["per_sample"]["t"])
    return EvalResult(
        objectives=dict(out["objectives"]), higher_is_better={"acc": True}, per_sample={"t": per},
        doc_ids={"t": list(range(len(per)))}, counts={"t": len(per)},
        task_scores={"t": float(per.mean())}, objective_weights={"acc": {"t": 1.0}},
    )  # fmt: skip


def _scheduler(llama_family: dict[str, Path], tmp_path: Path, optimizer: str, size: int, **options):
    from evomerge.optim import make_optimizer
    from evomerge.recipe import Recipe
    from evomerge.run.scheduler import Scheduler

    a, b = str(llama_family["a"]), str(llama_family["b"])
    opt = make_optimizer(optimizer, dim=1, bounds=[[0.0, 1.0]], x0=[0.5], seed=3, objectives={"acc": True}, **options)

    def decode(cand) -> Recipe:  # two distinct recipes only: most candidates repeat one
        weight = 1.0 if cand.genome[0] < 0.5 else 3.0
        return Recipe.parse({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": weight}}]})

    pool = SyncPool({**EVALUATOR, "callable": "tests.test_run:score_weighted"}, size)
    ledger = Ledger.open(tmp_path / f"{optimizer}-{size}.sqlite")
    sched = Scheduler(
        stage="s", optimizer=opt, pool=pool, ledger=ledger, decode=decode, subset_for=lambda g: (None, ""),
        fitness=opt.objectives.score, on_tell=lambda counters: None, shardable=True,
    )  # fmt: skip
    return sched, pool, ledger


def test_scheduler_never_evaluates_a_recipe_twice(llama_family: dict[str, Path], tmp_path: Path) -> None:
    sched, pool, ledger = _scheduler(llama_family, tmp_path, "random", 1, max_evals=10)
    sched.run()
    written = ledger.rows()
    assert len(written) == 10 and [r.candidate_id for r in written] == list(range(10))
    assert len({r.recipe_hash for r in written}) == 2
    assert len(pool.jobs) == 2 and sched.evaluated == 2
    first = {r.recipe_hash: r for r in reversed(written)}
    for row in written:
        assert row.objectives == first[row.recipe_hash].objectives
        assert row.meta.get("reused_from") in (None, first[row.recipe_hash].seq)


def test_scheduler_splits_a_small_generation_across_idle_workers(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from evomerge.recipe import Recipe
    from evomerge.run.jobs import Job

    sched, pool, ledger = _scheduler(llama_family, tmp_path, "cmaes", 4, popsize=2, max_evals=2)
    sched.run()
    written = ledger.rows()
    shards = [job.shard for job in pool.jobs]
    assert len(written) == 2 and all(s is not None and s[1] >= 2 for s in shards)
    assert sum(1 for s in shards if s is not None) == 4  # 2 candidates x 2 shards on 4 workers
    for row in written:  # shards put together give the unsharded scores
        whole = pool.core.run(Job("check", Recipe.from_string(row.recipe_yaml), "search", None, None))
        assert row.objectives["acc"] == pytest.approx(whole.objectives["acc"], rel=1e-12)
        assert row.per_sample["t"] == pytest.approx(whole.per_sample["t"].tolist(), rel=1e-12)


def test_set_overrides_by_index_and_stage_name() -> None:
    from evomerge.config import apply_sets, parse_sets

    data = {"seed": 0, "stages": [{"name": "ps", "budget": {"evaluations": 8}}, {"name": "dfs"}], "ray": {}}
    sets = parse_sets(["seed=3", "stages.ps.budget.evaluations=20", "stages.1.budget={seconds: 60}", "ray.workers=2", "models.sources=[a, b]"])
    out = apply_sets(data, sets)
    assert out["seed"] == 3 and out["stages"][0]["budget"]["evaluations"] == 20
    assert out["stages"][1]["budget"] == {"seconds": 60} and out["ray"]["workers"] == 2
    assert out["models"]["sources"] == ["a", "b"] and data["seed"] == 0  # the input is untouched


def test_a_run_on_ray_workers_matches_the_in_process_run(ray_session, llama_family: dict[str, Path], tmp_path: Path) -> None:
    """Two Ray workers (the session's local Ray) and the in-process pool write the same ledger."""
    exp = experiment(llama_family, ray={"workers": 2, "num_cpus_per_worker": 1})
    exp_file = write_exp(tmp_path / "ray.yaml", exp)
    code, out = cli("run", exp_file, "--out", tmp_path / "ray")
    assert code == 0, out
    code, out = cli("run", exp_file, "--out", tmp_path / "local", "--local")
    assert code == 0, out
    on_ray, local = rows(tmp_path / "ray"), rows(tmp_path / "local")
    assert [r.comparable() for r in on_ray] == [r.comparable() for r in local]
    assert {r.worker for r in on_ray if r.split == "search"} != {"local-0"}


def test_m2n2_model_mode_resumes_after_a_crash_with_the_same_ledger(llama_family: dict[str, Path], tmp_path: Path) -> None:
    """The archive members written before the crash are taken up again; the resumed run tells
    the optimizer exactly what the uninterrupted one did."""
    from evomerge.run.driver import resume_run, start_run

    stage = {
        "name": "m2n2",
        "evaluator": dict(EVALUATOR),
        "optimizer": {"name": "m2n2", "mode": "model", "archive_size": 3},
        "budget": {"evaluations": 7},
    }
    exp = experiment(llama_family, stages=[stage])
    exp["models"] = {"sources": [str(llama_family[k]) for k in "abc"]}
    start_run(write_exp(tmp_path / "ref.yaml", exp), out=tmp_path / "reference", echo=lambda _: None)
    score.interrupt_calls = 0
    stage["evaluator"] = {**EVALUATOR, "args": {"interrupt_at": 5}}  # during the first child
    with pytest.raises(KeyboardInterrupt):
        start_run(write_exp(tmp_path / "crash.yaml", exp), out=tmp_path / "crashed", echo=lambda _: None)
    assert len(rows(tmp_path / "crashed")) == 4 and (tmp_path / "crashed" / "archive" / "m2n2" / "2").is_dir()
    resume_run(tmp_path / "crashed", echo=lambda _: None)
    assert [r.comparable() for r in rows(tmp_path / "crashed")] == [r.comparable() for r in rows(tmp_path / "reference")]
    best = [json.loads((tmp_path / d / "best" / "scores.json").read_text()) for d in ("crashed", "reference")]
    assert best[0] == best[1]


def test_run_best_takes_the_best_stage_only_when_the_stages_share_the_evaluator(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from evomerge.run.ledger import LedgerRow
    from evomerge.run.stages import run_best

    def row(stage: str, cid: int, fitness: float, split: str = "search") -> LedgerRow:
        recipe = f"merge_method: linear\nmodels:\n- model: m{stage}{cid}\n"
        return LedgerRow(
            seq=0, stage=stage, candidate_id=cid, generation=0, split=split, genome=[0.5], recipe_hash=f"{stage}{cid}",
            recipe_yaml=recipe, objectives={"acc": fitness}, higher_is_better={"acc": True}, fitness=fitness,
            per_sample={"t": [1.0, 0.0]}, worker="w", started=0.0, finished=1.0, status="ok", error=None,
        )  # fmt: skip

    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        for r in (row("ps", 0, 0.4), row("ps", 1, 0.6), row("ps", 1, 0.55, "holdout"), row("dfs", 0, 0.5), row("dfs", 1, 0.6)):
            ledger.append(r)
        same = [SimpleNamespace(name=n, evaluator={"kind": "x"}, evaluator_overrides={}) for n in ("ps", "dfs")]
        best = run_best(same, ledger)
        # over both stages; the tie at 0.6 goes to the earlier stage
        assert (best.stage, best.candidate_id, best.holdout_score) == ("ps", 1, 0.55)
        assert "over stages 'ps', 'dfs'" in best.selection
        other = [same[0], SimpleNamespace(name="dfs", evaluator={"kind": "y"}, evaluator_overrides={})]
        best = run_best(other, ledger)
        assert (best.stage, best.candidate_id) == ("dfs", 1) and "evaluators differ" in best.selection
        assert run_best(same[:1], ledger).stage == "ps"
