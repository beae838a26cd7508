"""The ledger: one SQLite row per evaluation of a run (`<run>/ledger.sqlite`, WAL mode).

Rows are appended in the order the scheduler tells the optimizer (search rows) or records
holdout scores, so `seq` is the run's history: replaying the search rows of a stage in `seq`
order gives the optimizer exactly the tells of the original run. Every append commits at once,
so a driver killed with `kill -9` loses at most the evaluation it had not written yet.

Lists and dicts are stored as JSON text (non-finite floats as JSON's `Infinity`/`NaN`), so the
file opens with any SQLite client.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

SCHEMA_VERSION = 1
BASELINE_PREFIX = "baseline:"

_COLUMNS = (
    ("seq", "INTEGER PRIMARY KEY"),
    ("stage", "TEXT NOT NULL"),
    ("candidate_id", "INTEGER NOT NULL"),
    ("generation", "INTEGER NOT NULL"),
    ("split", "TEXT NOT NULL"),
    ("genome", "TEXT"),
    ("recipe_hash", "TEXT NOT NULL"),
    ("recipe_yaml", "TEXT NOT NULL"),
    ("objectives", "TEXT NOT NULL"),
    ("higher_is_better", "TEXT NOT NULL"),
    ("fitness", "REAL"),
    ("per_sample", "TEXT NOT NULL"),
    ("worker", "TEXT NOT NULL"),
    ("started", "REAL NOT NULL"),
    ("finished", "REAL NOT NULL"),
    ("status", "TEXT NOT NULL"),
    ("error", "TEXT"),
    ("subset", "TEXT NOT NULL DEFAULT ''"),
    ("meta", "TEXT NOT NULL DEFAULT '{}'"),
)
_JSON_FIELDS = ("genome", "objectives", "higher_is_better", "per_sample", "meta")


@dataclass
class LedgerRow:
    """One evaluation. `fitness` is the stage's primary objective turned so that higher is better
    (-inf for a failed row); `subset` names the documents scored when the evaluator draws a
    subset (empty: all of the split); `meta` holds extras such as `reused_from` (the seq of the
    row whose scores a repeated recipe took instead of being evaluated again) or M2N2 parents."""

    seq: int
    stage: str
    candidate_id: int
    generation: int
    split: str
    genome: list[float] | None
    recipe_hash: str
    recipe_yaml: str
    objectives: dict[str, float]
    higher_is_better: dict[str, bool]
    fitness: float
    per_sample: dict[str, list[float]]
    worker: str
    started: float
    finished: float
    status: str
    error: str | None
    subset: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def comparable(self) -> dict[str, Any]:
        """The row without what legitimately differs between two runs of the same experiment
        (timings, worker names): what a resumed run must reproduce."""
        data = {name: getattr(self, name) for name, _ in _COLUMNS}
        for name in ("started", "finished", "worker"):
            data.pop(name)
        data["meta"] = {k: v for k, v in self.meta.items() if k not in ("reused_from",)}
        return data


class Ledger:
    """Append-only store of LedgerRows. Use `Ledger.open(path)`; safe to read while a run writes."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool):
        self._conn = conn
        self.path = path
        self.readonly = readonly

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> Ledger:
        path = Path(path)
        if readonly:
            if not path.is_file():
                raise ConfigError("no ledger here (is this a run directory?)", file=str(path))
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            columns = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
            conn.execute(f"CREATE TABLE IF NOT EXISTS evaluations ({columns})")
            conn.execute("CREATE INDEX IF NOT EXISTS by_hash ON evaluations (recipe_hash, split, stage)")
            conn.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute("INSERT OR IGNORE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.commit()
        return cls(conn, path, readonly)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing ------------------------------------------------------------------------
    def append(self, row: LedgerRow) -> LedgerRow:
        """Store the row and commit. `row.seq` <= 0 takes the next number; returns the row."""
        if self.readonly:
            raise RuntimeError("ledger opened read-only")
        if row.seq <= 0:
            row.seq = self.last_seq() + 1
        values = []
        for name, _ in _COLUMNS:
            value = getattr(row, name)
            values.append(json.dumps(value) if name in _JSON_FIELDS else value)
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._conn:
            self._conn.execute(f"INSERT INTO evaluations VALUES ({marks})", values)
        return row

    # ---- reading ------------------------------------------------------------------------
    def rows(self, stage: str | None = None, split: str | None = None, *, after_seq: int = 0) -> list[LedgerRow]:
        """Rows in seq order, optionally of one stage and/or one split, after a given seq."""
        where, args = _where(stage=stage, split=split)
        query = f"SELECT * FROM evaluations WHERE seq > ?{where} ORDER BY seq"
        return [self._row(r) for r in self._conn.execute(query, [after_seq, *args])]

    def stages(self) -> list[str]:
        """Stage names in the order their first row was written (baseline rows, whose stage is
        `baseline:NAME`, are not a stage: see `baselines`)."""
        cur = self._conn.execute("SELECT stage FROM evaluations GROUP BY stage ORDER BY MIN(seq)")
        return [r[0] for r in cur if not r[0].startswith(BASELINE_PREFIX)]

    def baselines(self) -> list[LedgerRow]:
        """Rows of the hand-set baseline recipes a run scored for reference (stage `baseline:NAME`)."""
        cur = self._conn.execute("SELECT * FROM evaluations WHERE stage LIKE 'baseline:%' ORDER BY seq")
        return [self._row(r) for r in cur]

    def find(self, recipe_hash: str, split: str, stage: str | None = None, subset: str | None = None) -> LedgerRow | None:
        """The first successful-or-failed row that scored this recipe on this split (and stage /
        subset when given)."""
        where, args = _where(stage=stage, subset=subset)
        query = f"SELECT * FROM evaluations WHERE recipe_hash = ? AND split = ?{where} ORDER BY seq LIMIT 1"
        cur = self._conn.execute(query, [recipe_hash, split, *args])
        found = cur.fetchone()
        return self._row(found) if found else None

    def last_seq(self) -> int:
        return int(self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM evaluations").fetchone()[0])

    def count(self, stage: str | None = None, split: str | None = None) -> int:
        query, args = "SELECT COUNT(*) FROM evaluations WHERE 1=1", []
        if stage is not None:
            query += " AND stage = ?"
            args.append(stage)
        if split is not None:
            query += " AND split = ?"
            args.append(split)
        return int(self._conn.execute(query, args).fetchone()[0])

    def _row(self, values: tuple) -> LedgerRow:
        data = {name: value for (name, _), value in zip(_COLUMNS, values, strict=True)}
        for name in _JSON_FIELDS:
            data[name] = json.loads(data[name]) if data[name] is not None else None
        data["meta"] = data["meta"] or {}
        data["fitness"] = float("-inf") if data["fitness"] is None else data["fitness"]
        return LedgerRow(**data)


def _where(**filters: str | None) -> tuple[str, list[Any]]:
    """` AND column = ?` for every filter that is set, and its arguments (column names are ours)."""
    given = {column: value for column, value in filters.items() if value is not None}
    return "".join(f" AND {column} = ?" for column in given), list(given.values())
