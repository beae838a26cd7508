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
