"""The ledger: one SQLite row per evaluation of a run (`<run>/ledger.sqlite`, WAL mode).

Rows are appended in the order the scheduler tells the optimizer (search rows) or records
holdout scores, so `seq` is the run's history: replaying the search rows of a stage in `seq`
order gives the optimizer exactly the tells of the original run. Every append commits at once,
so a driver killed with `kill -9` loses at most the evaluation it had not written yet.

Lists and dicts are stored as JSON text (non-finite floats as JSON's `Infinity`/`NaN`), so the
file opens with any SQLite client.

Long genomes (more than `LONG_GENOME` genes: a weights space, whose genome is a model's raw
parameters) would make the ledger gigabytes (19,210 genes x 50,000 rows), so a search row keeps
its long genome only when it enters its stage's top k by search fitness at the time it is
written (k = `keep_genomes(stage, k)`, default 1; distinct recipes; ties: the earlier row ranks
first). Every row that ends in the final top k was in the top k when written, so the stage's
best (and the rows its holdout scoring needs) always carry their genomes; other rows keep None.
Holdout and baseline rows never keep a long genome (their search row has it).

Two more savings, for runs of tens of thousands of rows (M2N2 on digits: 1,437 per-image scores
per row): the document ids of a row's `meta.doc_ids`, the same for every row of an evaluator
without subsampling, are stored once in the `doc_ids` table and the row holds
`{"$ref": DIGEST}` (rows read back through `Ledger` have them expanded); per-sample lists of whole
numbers (0/1 correctness) are written as JSON integers, read back as such (compare equal to the
floats). ~30 KB per such row became ~3 KB.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError

SCHEMA_VERSION = 1
BASELINE_PREFIX = "baseline:"
LONG_GENOME = 4096  # genes; longer genomes are kept only on top-k rows (module docstring)

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
        self._keep_k: dict[str, int] = {}
        self._top: dict[str, list[tuple[float, int, str]]] = {}  # stage -> (-fitness, seq, hash), best first
        self._doc_ids: dict[str, Any] = {}  # digest -> doc ids (both ways)

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
            # NORMAL: a commit survives the process being killed (kill -9) but is synced to disk
            # only at WAL checkpoints; `sync()` runs before every run checkpoint, so a checkpoint
            # never counts rows a power cut could take back. FULL cost 7 ms per row here.
            conn.execute("PRAGMA synchronous=NORMAL")
            columns = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
            conn.execute(f"CREATE TABLE IF NOT EXISTS evaluations ({columns})")
            conn.execute("CREATE INDEX IF NOT EXISTS by_hash ON evaluations (recipe_hash, split, stage)")
            conn.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute("CREATE TABLE IF NOT EXISTS doc_ids (digest TEXT PRIMARY KEY, value TEXT NOT NULL)")
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
        keep_genome = row.genome is None or len(row.genome) <= LONG_GENOME or self._enters_top(row)
        new_doc_ids = None
        values = []
        for name, _ in _COLUMNS:
            value = getattr(row, name)
            if name == "genome" and not keep_genome:
                value = None
            elif name == "per_sample":
                value = {k: _compact(v) for k, v in value.items()}
            elif name == "meta" and isinstance(value.get("doc_ids"), dict) and value["doc_ids"]:
                text = json.dumps(value["doc_ids"], separators=(",", ":"))
                digest = hashlib.sha256(text.encode()).hexdigest()[:16]
                if digest not in self._doc_ids:
                    new_doc_ids = (digest, text)
                value = {**value, "doc_ids": {"$ref": digest}}
            values.append(json.dumps(value, separators=(",", ":")) if name in _JSON_FIELDS else value)
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._conn:
            if new_doc_ids is not None:
                self._conn.execute("INSERT OR IGNORE INTO doc_ids VALUES (?, ?)", new_doc_ids)
            self._conn.execute(f"INSERT INTO evaluations VALUES ({marks})", values)
        if new_doc_ids is not None:
            self._doc_ids[new_doc_ids[0]] = json.loads(new_doc_ids[1])
        return row

    def sync(self) -> None:
        """Flush every committed row to disk (fsync of the database and its write-ahead log)."""
        import os

        for suffix in ("", "-wal"):
            path = f"{self.path}{suffix}"
            if os.path.exists(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def keep_genomes(self, stage: str, top_k: int) -> None:
        """Keep the long genomes of stage's top `top_k` search rows (module docstring)."""
        self._keep_k[stage] = max(1, int(top_k))
        self._top.pop(stage, None)

    def _enters_top(self, row: LedgerRow) -> bool:
        """Whether a search row enters its stage's top k (and record it there)."""
        if row.split != "search" or row.status != "ok" or not math.isfinite(row.fitness):
            return False
        k = self._keep_k.get(row.stage, 1)
        top = self._top.get(row.stage)
        if top is None:
            top, seen = [], set()
            query = "SELECT fitness, seq, recipe_hash FROM evaluations WHERE stage = ? AND split = 'search' AND status = 'ok' ORDER BY fitness DESC, seq"
            for fitness, seq, digest in self._conn.execute(query, [row.stage]):
                if fitness is None or not math.isfinite(fitness) or digest in seen:
                    continue
                seen.add(digest)
                top.append((-fitness, seq, digest))
                if len(top) >= k:
                    break
            self._top[row.stage] = top
        if any(digest == row.recipe_hash for _, _, digest in top):
            return False  # an earlier row of the same recipe holds it
        entry = (-row.fitness, row.seq, row.recipe_hash)
        if len(top) >= k and entry > top[-1]:
            return False
        top.append(entry)
        top.sort()
        del top[k:]
        return True

    # ---- reading ------------------------------------------------------------------------
    def get(self, seq: int) -> LedgerRow | None:
        """The row numbered `seq`."""
        found = self._conn.execute("SELECT * FROM evaluations WHERE seq = ?", [int(seq)]).fetchone()
        return self._row(found) if found else None

    def rows(self, stage: str | None = None, split: str | None = None, *, after_seq: int = 0) -> list[LedgerRow]:
        """Rows in seq order, optionally of one stage and/or one split, after a given seq."""
        where, args = _where(stage=stage, split=split)
        query = f"SELECT * FROM evaluations WHERE seq > ?{where} ORDER BY seq"
        return [self._row(r) for r in self._conn.execute(query, [after_seq, *args])]

    def top(self, stage: str, k: int | None = None, split: str = "search") -> list[LedgerRow]:
        """Successful rows of a stage with a finite fitness, best first (ties: the earlier row),
        one per recipe, at most `k`; reads only the rows it returns in full."""
        query = "SELECT seq, recipe_hash, fitness FROM evaluations WHERE stage = ? AND split = ? AND status = 'ok' ORDER BY fitness DESC, seq"
        seqs, seen = [], set()
        for seq, digest, fitness in self._conn.execute(query, [stage, split]):
            if fitness is None or not math.isfinite(fitness) or digest in seen:
                continue
            seen.add(digest)
            seqs.append(seq)
            if k is not None and len(seqs) >= k:
                break
        return [row for seq in seqs if (row := self.get(seq)) is not None]

    def lineage_info(self, stage: str) -> dict[int, tuple[str, str, list[int]]]:
        """candidate id -> (recipe hash, recipe YAML, parents) of a stage's successful search rows
        (the first row of an id), without reading their scores."""
        query = "SELECT candidate_id, recipe_hash, recipe_yaml, meta FROM evaluations WHERE stage = ? AND split = 'search' AND status = 'ok' ORDER BY seq"
        out: dict[int, tuple[str, str, list[int]]] = {}
        for cid, digest, recipe_yaml, meta in self._conn.execute(query, [stage]):
            if cid not in out:
                out[int(cid)] = (digest, recipe_yaml, [int(p) for p in json.loads(meta or "{}").get("parents", [])])
        return out

    def summary(self, stage: str, split: str = "search") -> dict[str, Any]:
        """Counts and times of a stage's rows without reading them: rows, failures, first start,
        last finish, the first row's objective directions and the last failed row's error."""
        where = "FROM evaluations WHERE stage = ? AND split = ?"
        rows, failures, first, last = self._conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(status != 'ok'), 0), MIN(started), MAX(finished) {where}", [stage, split]
        ).fetchone()
        directions = self._conn.execute(f"SELECT higher_is_better {where} ORDER BY seq LIMIT 1", [stage, split]).fetchone()
        error = self._conn.execute(f"SELECT error, seq {where} AND status != 'ok' ORDER BY seq DESC LIMIT 1", [stage, split]).fetchone()
        return {
            "rows": int(rows),
            "failures": int(failures),
            "started": first,
            "finished": last,
            "higher_is_better": json.loads(directions[0]) if directions else {},
            "last_error": error[0] if error else None,
            "last_error_seq": error[1] if error else None,
        }

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

    def _doc_ids_of(self, digest: str) -> Any:
        if digest not in self._doc_ids:
            found = self._conn.execute("SELECT value FROM doc_ids WHERE digest = ?", [digest]).fetchone()
            if found is None:
                raise ConfigError(f"the ledger has no doc_ids {digest} (a row refers to it)", file=str(self.path))
            self._doc_ids[digest] = json.loads(found[0])
        return self._doc_ids[digest]

    def _row(self, values: tuple) -> LedgerRow:
        data = {name: value for (name, _), value in zip(_COLUMNS, values, strict=True)}
        for name in _JSON_FIELDS:
            data[name] = json.loads(data[name]) if data[name] is not None else None
        data["meta"] = data["meta"] or {}
        ref = data["meta"].get("doc_ids")
        if isinstance(ref, dict) and set(ref) == {"$ref"}:
            data["meta"]["doc_ids"] = self._doc_ids_of(ref["$ref"])
        data["fitness"] = float("-inf") if data["fitness"] is None else data["fitness"]
        return LedgerRow(**data)


def _compact(values: Any) -> Any:
    """A per-sample list of whole numbers as ints (shorter JSON), anything else as it is."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fiu" and arr.size and np.isfinite(arr).all() and (arr == np.rint(arr)).all() and np.abs(arr).max() < 2**53:
        return arr.astype(np.int64).tolist()
    return values


def _where(**filters: str | None) -> tuple[str, list[Any]]:
    """` AND column = ?` for every filter that is set, and its arguments (column names are ours)."""
    given = {column: value for column, value in filters.items() if value is not None}
    return "".join(f" AND {column} = ?" for column in given), list(given.values())
