"""Does a run's ledger hold every row its checkpoint counts?

A checkpoint records the last seq it saw (`ledger_seq`) and the rows per stage and split
(`ledger_rows`); the ledger's seqs run 1, 2, 3, ... without gaps. A ledger that lost rows - a
copy made without `ledger.sqlite-wal` after a kill -9, a sync tool, a crash of the file system,
rows deleted by hand - therefore shows it: a lower last seq, fewer rows of a stage, or a gap in
the seqs. `status`, `resume`, `export` and `report` refuse such a run with one line saying what is
missing and how to recover: put the `-wal` file back beside the ledger, or
`evomerge resume RUN --rebuild` (see `evomerge.run.driver.Run.rebuild_state`).

Rows written after the checkpoint and lost are not a gap: the checkpoint never counted them, and a
resume evaluates those candidates again, as after a kill -9 before they were written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.config import Experiment, read_experiment
from evomerge.errors import ConfigError
from evomerge.run.checkpoint import load_checkpoint
from evomerge.run.ledger import BASELINE_PREFIX, Ledger
from evomerge.run.rundir import (
    RunDir,
    experiment_data,
    lock_holder,
    require_run_dir,
)


class LedgerIncomplete(ConfigError):
    """The ledger lacks rows its run's checkpoint counts."""


@dataclass
class LedgerGap:
    """What a ledger lacks: rows per (stage, split) the checkpoint counts beyond what the ledger
    holds, missing seq ranges (below the last seq the checkpoint or the ledger knows), and the
    stages whose rows are missing (those the checkpoint counts more rows of; else the stage of the
    row before each gap: a gap between two stages is put on the earlier one)."""

    short: dict[tuple[str, str], int] = field(default_factory=dict)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    stages: set[str] = field(default_factory=set)

    @property
    def missing(self) -> int:
        by_seq = sum(last - first + 1 for first, last in self.ranges)
        return max(by_seq, sum(self.short.values()))

    def describe(self) -> str:
        parts = []
        for (stage, split), n in self.short.items():  # in the order the stages wrote their rows
            parts.append(f"{n} {split} row{'s' if n != 1 else ''} of stage '{stage}'")
        if self.ranges:
            seqs = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.ranges)
            parts.append(f"seq {seqs}")
        elif self.stages and not self.short:
            parts.append(f"stage {', '.join(sorted(self.stages))}")
        return "; ".join(parts)

    def first_stage(self, stage_names: list[str]) -> int:
        """The index of the first stage whose rows are missing (baselines belong to the first)."""
        found = [0 if s.startswith(BASELINE_PREFIX) or s not in stage_names else stage_names.index(s) for s in self.stages]
        return min(found) if found else 0


def find_gap(ledger: Ledger, ckpt: dict[str, Any] | None) -> LedgerGap | None:
    """What `ledger` lacks of what `ckpt` counts (and any gap in its seqs); None when whole."""
    ckpt = ckpt or {}
    expected_seq = int(ckpt.get("ledger_seq") or 0)
    gap = LedgerGap()
    counts = ledger.counts()
    for stage, splits in (ckpt.get("ledger_rows") or {}).items():
        for split, n in splits.items():
            have = counts.get(stage, {}).get(split, 0)
            if have < int(n):
                gap.short[(stage, split)] = int(n) - have
                gap.stages.add(stage)
    gap.ranges = ledger.gaps(max(expected_seq, ledger.last_seq()))
    if not gap.short:  # rows the checkpoint did not count: the stage of the row before the gap
        for first, _ in gap.ranges:
            before = ledger.row_stage(first, before=True)
            gap.stages.add(before if before is not None else BASELINE_PREFIX)
    if not gap.short and not gap.ranges:
        return None
    return gap


def incomplete(run_dir: str | Path, ledger: Ledger, gap: LedgerGap, *, counted: bool = True) -> LedgerIncomplete:
    """The one-line refusal: what is missing and the two ways to recover (`counted`: the
    checkpoint counted the rows; else only the gaps in the seqs show them)."""
    what = "the checkpoint counts are missing" if counted else "are missing (gaps in the seqs)"
    return LedgerIncomplete(
        f"{gap.missing} row(s) {what} ({gap.describe()}); restore "
        f"{ledger.path.name}-wal beside it if the ledger was copied without it, or re-evaluate the missing rows "
        f"with `evomerge resume {run_dir} --rebuild`",
        file=str(ledger.path),
    )


def check_ledger(run_dir: str | Path, ledger: Ledger, ckpt: dict[str, Any] | None) -> None:
    """Raise LedgerIncomplete when the ledger lacks rows the checkpoint counts."""
    gap = find_gap(ledger, ckpt)
    if gap is not None:
        raise incomplete(run_dir, ledger, gap, counted=ckpt is not None)


def check_run_files(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory fit to read (status, export, report), or one line saying what is wrong:
    its experiment.yaml and checkpoint read, its ledger opens and holds every row the checkpoint
    counts (not checked while a driver holds the run: it is the ledger's writer). Returns the
    checkpoint (None before the first one)."""
    run_dir = require_run_dir(run_dir)
    experiment_data(run_dir)
    ckpt = load_checkpoint(run_dir)  # before the ledger: the ledger only grows after it
    with Ledger.open(RunDir(run_dir).ledger, readonly=True) as ledger:
        if lock_holder(run_dir) is None:
            check_ledger(run_dir, ledger, ckpt)
    return ckpt


def check_run_dir(run_dir: str | Path) -> tuple[Experiment, dict[str, Any] | None]:
    """`check_run_files`, and the run's experiment (its schema checked too)."""
    ckpt = check_run_files(run_dir)
    return read_experiment(run_dir), ckpt
