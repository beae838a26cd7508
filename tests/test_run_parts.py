"""The run directory's parts on their own: its layout and lock, the checkpoint pacer."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.run.checkpoint import CheckpointPacer, checkpoint_path
from evomerge.run.rundir import RunDir, acquire_lock, is_run_dir, lock_holder, require_run_dir


def test_a_run_directory_holds_both_files_and_its_layout_is_named_once(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert not is_run_dir(tmp_path)
    run.experiment.write_text("name: x\n")
    assert not is_run_dir(tmp_path)  # an experiment alone is not a run
    run.ledger.write_bytes(b"")
    assert is_run_dir(tmp_path) and require_run_dir(tmp_path) == tmp_path
    assert run.stage_model("ps") == tmp_path / "stages" / "ps" / "best_model"
    assert run.archive("m2n2") == tmp_path / "archive" / "m2n2"
    assert checkpoint_path(tmp_path) == run.checkpoint / "state.json"
    with pytest.raises(ConfigError, match="not a run directory"):
        require_run_dir(tmp_path / "nothing")


def test_the_lock_names_its_holder_and_refuses_a_second_driver(tmp_path: Path) -> None:
    import os

    assert lock_holder(tmp_path) is None
    handle = acquire_lock(tmp_path)
    try:
        assert lock_holder(tmp_path) == os.getpid()
        with pytest.raises(ConfigError, match=f"another process \\(pid {os.getpid()}\\)"):
            acquire_lock(tmp_path)
    finally:
        handle.close()
    assert lock_holder(tmp_path) is None  # released: a stopped run


def test_the_pacer_skips_checkpoints_that_would_cost_more_than_a_twentieth_of_the_time() -> None:
    now = [0.0]
    pacer = CheckpointPacer(ratio=20, clock=lambda: now[0])
    writes: list[float] = []

    def write() -> None:
        writes.append(now[0])
        now[0] += 1.0  # a checkpoint takes 1 s

    assert pacer.maybe_write(write)  # the first is always written
    now[0] += 5.0
    assert not pacer.maybe_write(write)  # 5 s since the last one < 20 x 1 s
    now[0] += 15.0
    assert pacer.maybe_write(write) and writes == [0.0, 21.0]


def test_a_raised_budget_reopens_an_optimizer_that_stopped_on_it() -> None:
    from evomerge.evaluate.result import EvalResult
    from evomerge.optim import make_optimizer

    opt = make_optimizer("random", dim=2, bounds=[(0.0, 1.0)] * 2, x0=None, seed=0, objectives={"acc": True}, max_evals=2)
    cands = opt.ask(2)
    opt.tell(cands, [EvalResult(objectives={"acc": 0.5}, higher_is_better={"acc": True}) for _ in cands])
    assert opt.ask(1) == [] and opt.stopped and not opt.reopen()  # the budget is still spent
    opt.max_evals = 4  # what `resume --set stages[0].budget.evaluations=4` gives the restored optimizer
    assert opt.reopen() and opt.stopped is None and len(opt.ask(2)) == 2


def test_a_job_carries_a_recipe_or_raw_tensors() -> None:
    import torch

    from evomerge.recipe import Recipe
    from evomerge.run.jobs import Job, TensorsPayload

    recipe = Recipe.from_string("merge_method: passthrough\nmodels:\n- model: genome:abc\n")
    tensors = TensorsPayload(template="zoo:digits/base", tensors={"w": torch.zeros(2)}, recipe=recipe)
    assert Job("t", tensors, "search").recipe is recipe  # the recipe that names the tensors in the ledger
    assert Job("r", recipe, "search").recipe is recipe
