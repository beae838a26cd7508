"""The Python API (`evomerge.api`, re-exported by `evomerge`) on the `test` zoo, no CLI involved:
an experiment built from a mapping with a scoring function defined here (no module path), run,
resumed after an interruption, read back (status, best, the ledger as a DataFrame), exported,
reported; merging a recipe with a merge method and a run with an optimizer both registered from
this file; a function defined inside a test (pickled by value) scoring on a Ray worker; and user
errors as one-line EvomergeErrors."""

from __future__ import annotations

import dataclasses
import importlib.util
import sqlite3
from pathlib import Path

import pytest
import torch

import evomerge as em
from evomerge.run.ledger import Ledger, LedgerRow

# tracking= of run and resume, read back with TensorBoard's reader when it is installed
TENSORBOARD = {"tensorboard": {}} if importlib.util.find_spec("tensorboard") else None


def tensorboard_fitness(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tracking" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("ps/search/fitness")]


def score(model, tokenizer, split):
    """Per-sample scores in (0, 1) from the logits on fixed random token sequences."""
    gen = torch.Generator().manual_seed(0 if split == "search" else 1)
    ids = torch.randint(0, model.config.vocab_size, (8, 6), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits[:, -1, :].double()
    per = torch.sigmoid(4.0 * (logits[:, 0] - logits[:, 1])).numpy()
    return {"objectives": {"acc": float(per.mean())}, "per_sample": {"t": per.tolist()}}


def experiment(evaluator=None, **changes) -> dict:
    """One PS stage over two zoo experts; the evaluator a plain function by default (registered by
    name: no module path written)."""
    evaluator = evaluator or {"kind": "python", "callable": score, "objectives": {"acc": True}}
    stage = {"name": "ps", "space": "ps_ties", "evaluator": evaluator, "optimizer": {"name": "cmaes", "popsize": 2}}
    stage.update(budget={"evaluations": 4}, holdout_top_k=1)
    models = {"base": "zoo:test/base", "sources": ["zoo:test/add", "zoo:test/reverse"]}
    return {"name": "api", "seed": 3, "models": models, "stages": [stage], "ray": {"workers": 0}, **changes}


@pytest.fixture(scope="module")
def test_zoo() -> Path:
    from evomerge.zoo import build_zoo

    return build_zoo("test")


@pytest.fixture(scope="module")
def finished(test_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> em.Run:
    return em.run(em.Experiment(experiment()), out=tmp_path_factory.mktemp("api") / "run", echo=None)


def comparable(df) -> list[dict]:
    return df.drop(columns=["started", "finished", "worker"]).to_dict("records")


def test_run_status_best_and_ledger(finished: em.Run) -> None:
    with Ledger.open(finished.run_dir / "ledger.sqlite", readonly=True) as ledger:
        rows = ledger.rows()
    df = finished.ledger()
    with sqlite3.connect(finished.run_dir / "ledger.sqlite") as conn:  # the table itself
        names = [column[1] for column in conn.execute("PRAGMA table_info(evaluations)")]
    assert names == [f.name for f in dataclasses.fields(LedgerRow)]
    assert list(df.columns) == [n for n in names if n != "per_sample"]
    assert len(df) == len(rows) == 5  # 4 search evaluations + the best's holdout row
    assert df["seq"].tolist() == [r.seq for r in rows] and df["fitness"].tolist() == [r.fitness for r in rows]
    full = finished.ledger(per_sample=True)
    assert list(full.columns) == names
    assert [len(p["t"]) for p in full["per_sample"]] == [8] * 5

    status = finished.status()
    assert status["finished"] and status["evaluations"] == 4 and status["failures"] == 0
    best = finished.best()
    assert best is not None and best.score == status["best"]["score"] == df[df.split == "search"]["fitness"].max()
    assert best.holdout_score == status["best"]["holdout"]
    frozen = finished.experiment()
    assert frozen.stages[0].evaluator["callable"] == "tests.test_api.score"


def test_export_and_report(finished: em.Run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    exported = finished.export(tmp_path / "merged")
    assert exported.recipe == finished.run_dir / "best" / "recipe.yaml" and exported.recipe.is_file()
    assert AutoModelForCausalLM.from_pretrained(exported.model).config.num_hidden_layers >= 1
    assert finished.export().model is None
    card = (exported.model / "README.md").read_text()
    assert "zoo:test/add" in card and "zoo:test/reverse" in card  # the references as the experiment wrote them
    err = one_line_error(lambda: finished.push_to_hub("someone/merged", out=tmp_path / "pushed"))  # HF_HUB_OFFLINE
    assert "\n" not in str(err)
    page = finished.report()
    assert page == finished.run_dir / "report" / "index.html" and page.is_file()
    assert any(p.name.startswith("fitness_") for p in page.parent.glob("*.png"))


def test_resume_gives_the_uninterrupted_ledger(finished: em.Run, tmp_path: Path) -> None:
    calls = {"n": 0}

    def crashing(model, tokenizer, split):
        calls["n"] += 1
        if calls["n"] == 3:  # the driver stops here, as at Ctrl-C
            raise KeyboardInterrupt
        return score(model, tokenizer, split)

    spec = em.python_evaluator(crashing, objectives={"acc": True}, name="api_crashing")
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="evomerge resume"):
        em.run(experiment(spec), out=run_dir, echo=None)
    done = len(em.Run(run_dir).ledger())
    assert 0 < done < 5 and not em.Run(run_dir).status()["finished"]
    resumed = em.resume(run_dir, tracking=TENSORBOARD, echo=None)  # a tracker added on resume
    assert resumed.status()["finished"]
    assert comparable(resumed.ledger(per_sample=True)) == comparable(finished.ledger(per_sample=True))
    if TENSORBOARD:  # it logged the search rows written after the resume
        assert len(tensorboard_fitness(run_dir)) == len(resumed.ledger().query("split == 'search'")) - done
    # a finished run's last stage reopens with a raised budget (a mapping, as with_overrides takes)
    em.resume(run_dir, overrides={"stages.ps.budget.evaluations": 6}, echo=None)
    assert em.Run(run_dir).status()["evaluations"] == 6


def test_with_overrides_and_validate(test_zoo: Path) -> None:
    exp = em.Experiment("tiny_ps")
    assert exp.name == "tiny_ps" and exp.file.endswith("tiny_ps.yaml")
    quick = exp.with_overrides("stages.ps.budget.evaluations=5", {"ray.workers": 0, "seed": 9})
    config = quick.validate()
    assert config.stages[0].budget.evaluations == 5 and config.ray.workers == 0 and config.seed == 9
    assert exp.to_dict()["stages"][0]["budget"]["evaluations"] == 300  # unchanged
    assert config.stages[0].space["kind"] == "ps"  # resolved: the space inlined
    small = em.Experiment(experiment())
    assert small.validate(models=True).name == "api"


def one_line_error(call) -> em.EvomergeError:
    with pytest.raises(em.EvomergeError) as info:
        call()
    assert "\n" not in str(info.value) and info.value.__cause__ is None
    return info.value


def test_user_errors_are_one_line(test_zoo: Path, tmp_path: Path) -> None:
    err = one_line_error(lambda: em.Experiment("tiny_ps").with_overrides("stages.ps.budget.evaluations=0").validate())
    assert isinstance(err, em.ConfigError) and err.file.endswith("tiny_ps.yaml")
    assert str(err) == f"{err.file}: stages[0].budget.evaluations: {err.message}"
    err = one_line_error(lambda: em.Experiment(experiment(seed="x")).validate())
    assert str(err).startswith("seed: ")
    err = one_line_error(lambda: em.Experiment("tiny_ps").with_overrides({"stages.nope.budget": 1}))
    assert err.field == "overrides" and "no item named 'nope'" in str(err)
    err = one_line_error(lambda: em.Experiment("tiny_ps").with_overrides("no-equals-sign"))
    assert err.field == "--set"
    err = one_line_error(lambda: em.Experiment("tiny_ps").with_overrides(("seed", 1)))
    assert err.field == "overrides" and "got tuple" in str(err)
    err = one_line_error(lambda: em.run(42))
    assert "an experiment is a YAML path, a built-in name or a mapping, got int" in str(err)
    err = one_line_error(lambda: em.Experiment("no_such_experiment"))
    assert "no built-in experiments named 'no_such_experiment'" in str(err)
    spec = {"kind": "python", "callable": "never_registered", "objectives": {"acc": True}}
    err = one_line_error(lambda: em.Experiment(experiment(spec)).validate(models=True))
    assert err.field == "stages[0].evaluator.callable" and "register_function" in str(err)
    err = one_line_error(lambda: em.Run(tmp_path).status())
    assert "not a run directory" in str(err)
    for call in (lambda: em.Run(tmp_path).ledger(), lambda: em.Run(tmp_path).best(), lambda: em.resume(tmp_path)):
        assert "not a run directory" in str(one_line_error(call))
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "mine.txt").write_text("not evomerge's")
    err = one_line_error(lambda: em.run(experiment(), out=tmp_path / "held", echo=None))
    assert "holds files that are not a run" in str(err)
    err = one_line_error(lambda: em.merge({"merge_method": "linear", "models": []}, tmp_path / "m"))
    assert "models" in str(err)


# ---- registries: a merge method and an optimizer registered from this file -------------------


def test_merge_with_a_method_registered_here(test_zoo: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from evomerge.merge.specs import ModelCount

    @em.merge_method("api_mean", models=ModelCount(2), doc="the plain mean (a test method)")
    def api_mean(base, tensors, model_params, params, ctx):
        return (tensors[0].float() + tensors[1].float()).div(2).to(tensors[0].dtype)

    recipe = em.Recipe.parse({"merge_method": "api_mean", "models": [{"model": "zoo:test/add"}, {"model": "zoo:test/reverse"}], "dtype": "float32"})
    out = em.merge(recipe, tmp_path / "merged")
    merged = load_file(next(out.glob("*.safetensors")))
    add = load_file(next((test_zoo / "add").glob("*.safetensors")))
    rev = load_file(next((test_zoo / "reverse").glob("*.safetensors")))
    name = next(n for n in merged if n.endswith("down_proj.weight"))
    torch.testing.assert_close(merged[name], (add[name] + rev[name]) / 2)


def test_run_with_an_optimizer_and_a_space_kind_registered_here(test_zoo: Path, tmp_path: Path) -> None:
    from evomerge.optim.simple import RandomSearch
    from tests.test_space_kind import MixSpace  # one gene: a linear mix of two models

    class CountingRandom(RandomSearch):
        asks = 0

        def ask(self, n=None):
            CountingRandom.asks += 1
            return super().ask(n)

    em.register_optimizer("api_random", CountingRandom, replace=True)
    em.register_space("test_mix", MixSpace, replace=True)
    exp = em.Experiment(experiment()).with_overrides(
        {"stages.ps.optimizer": {"name": "api_random"}, "stages.ps.space": {"kind": "test_mix"}, "stages.ps.budget.evaluations": 2}
    )
    run = em.run(exp, out=tmp_path / "run", tracking=TENSORBOARD, echo=None)
    assert CountingRandom.asks >= 1 and run.status()["evaluations"] == 2
    if TENSORBOARD:  # tracking= is the experiment's tracking: section
        search = run.ledger().query("split == 'search'")
        assert tensorboard_fitness(run.run_dir) == pytest.approx(search["fitness"].tolist(), rel=1e-6)
    assert all(em.Recipe.from_string(text).merge_method == "linear" for text in run.ledger()["recipe_yaml"])


def test_import_evomerge_is_cheap() -> None:
    import subprocess
    import sys

    code = "import sys, evomerge\nprint(sorted(m for m in ('evomerge.api', 'evomerge.config', 'torch', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the API is imported on first use (module __getattr__)


# ---- a function defined in a test scores on a Ray worker ---------------------------------------


def test_a_local_function_scores_on_ray_workers(finished: em.Run, ray_session, tmp_path: Path) -> None:
    offset = 0.25  # a closure: cloudpickle sends it by value, the worker could not import it

    def shifted(model, tokenizer, split):
        out = score(model, tokenizer, split)
        return {"acc": out["objectives"]["acc"] + offset}

    spec = em.python_evaluator(shifted, objectives={"acc": True})
    exp = em.Experiment(experiment(spec)).with_overrides({"ray": {"workers": 1, "num_cpus_per_worker": 1}, "stages.ps.budget.evaluations": 2})
    run = em.run(exp, out=tmp_path / "run", echo=None)
    df = run.ledger()
    assert df["status"].tolist() == ["ok"] * len(df) and all(w.startswith("ray-") for w in df["worker"])
    first, local = df.iloc[0], finished.ledger().iloc[0]  # the same seed: the same first candidate
    assert first.recipe_hash == local.recipe_hash
    assert first.objectives["acc"] == pytest.approx(local.objectives["acc"] + offset)


# ---- the worked example ------------------------------------------------------------------------


def test_the_worked_example_runs(test_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """examples/notebook.py, as a user runs it, on the `test` zoo with a budget of 4."""
    import runpy
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "notebook.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--preset", "test", "--evaluations", "4", "--out", str(tmp_path)])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "best: candidate" in out and "documents scored per evaluation: 64" in out
    assert len(em.Run(tmp_path / "run").ledger().query("split == 'search'")) == 4
    assert (tmp_path / "fitness.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "run" / "report" / "index.html").is_file()
