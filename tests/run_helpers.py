"""Helpers shared by the run tests: the CLI in-process and a run's ledger rows."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from evomerge.cli import main
from evomerge.run.ledger import Ledger


def cli(*args: object) -> tuple[int, str]:
    """Run `evomerge ARGS` in this process; exit code and output (exceptions other than exit propagate)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def rows(run_dir: Path, **filters: str) -> list:
    """The run's ledger rows, optionally filtered like `Ledger.rows` (stage=, split=)."""
    with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
        return ledger.rows(**filters)


def row_count(run_dir: Path) -> int:
    """How many rows the run's ledger holds; 0 while it does not exist yet (a run starting up)."""
    try:
        with Ledger.open(run_dir / "ledger.sqlite", readonly=True) as ledger:
            return ledger.count()
    except Exception:
        return 0
