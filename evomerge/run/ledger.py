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
Rows whose fitness is an estimate (`estimate`) rank in a top k of their own, so the best
estimates keep their genomes for their re-scoring in full (`evomerge.fidelity.stage`).
Holdout and baseline rows never keep a long genome (their search row has it).

Two more savings, for runs of tens of thousands of rows (M2N2 on digits: 1,437 per-image scores
per row): the document ids of a row's `meta.doc_ids`, the same for every row of an evaluator
without subsampling, are stored once in the `doc_ids` table and the row holds
`{"$ref": DIGEST}` (rows read back through `Ledger` have them expanded); per-sample lists of whole
numbers (0/1 correctness) are written as JSON integers, read back as such (compare equal to the
floats). ~30 KB per such row became ~3 KB.

Completeness: `seq` numbers run 1, 2, 3, ... without gaps (rows are never deleted), so a ledger
that lost rows (a copy made without its `-wal` file, rows deleted by hand) shows it: `gaps()`
lists the missing numbers, and a run's checkpoint records `counts()` and the last seq it saw
(`evomerge.run.integrity`). `sync()` (before every run checkpoint) also copies the write-ahead
log into the main file (`PRAGMA wal_checkpoint(PASSIVE)`), so the main file alone holds every
row a checkpoint counts. A rebuild (`evomerge resume --rebuild`) calls `fill_gaps()`: new rows
then take the missing numbers, smallest first, so rows re-created in their original order get
their original seqs back. `cursor` is the seq of the last row the run has written or replayed
(`passed`): what a checkpoint taken now has told the optimizer.

Errors of the database file (damaged, not a database, disk full, read-only) are raised as one
line naming the file (`evomerge.faults.sqlite_fault`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.faults import sqlite_fault

if TYPE_CHECKING:
    from evomerge.evaluate.result import EvalResult

SCHEMA_VERSION = 2  # 2: columns docs and estimate (fidelity); a version-1 ledger is migrated on open
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
    ("docs", "INTEGER"),
    ("estimate", "INTEGER NOT NULL DEFAULT 0"),
)
_ADDED = {"docs": "NULL", "estimate": "0"}  # schema 2's columns and their values in a version-1 ledger
_JSON_FIELDS = ("genome", "objectives", "higher_is_better", "per_sample", "meta")


@dataclass
class LedgerRow:
    """One evaluation. `fitness` is the stage's primary objective turned so that higher is better
    (-inf for a failed row); `subset` names the documents scored when the evaluator draws a
    subset (empty: all of the split); `meta` holds extras such as `reused_from` (the seq of the
    row whose scores a repeated recipe took instead of being evaluated again) or M2N2 parents.
    `docs` is the number of documents the row's scores rest on (None: a row of a version-1 ledger
    that kept no per-sample scores) and `estimate` whether its fitness is an estimate from fewer
    documents than its split holds (`evomerge.fidelity`); the stage's best and top-k are always
    rows with `estimate` False."""

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
    docs: int | None = None
    estimate: bool = False

    @property
    def documents_evaluated(self) -> int:
        """Documents evaluated for this row: `meta.new_docs` under a fidelity strategy, 0 for a
        row that took another row's scores, else the documents its scores rest on."""
        if "new_docs" in self.meta:
            return int(self.meta["new_docs"])
        if "reused_from" in self.meta:
            return 0
        return int(self.docs) if self.docs is not None else sum(len(v) for v in self.per_sample.values())

    @classmethod
    def from_result(
        cls,
        result: EvalResult,
        fitness: float | None,
        *,
        stage: str,
        candidate_id: int,
        generation: int,
        split: str,
        recipe_hash: str,
        recipe_yaml: str,
        worker: str,
        started: float,
        finished: float,
        genome: list[float] | None = None,
        subset: str = "",
        meta: dict[str, Any] | None = None,
        estimate: bool = False,
    ) -> LedgerRow:
        """The row of one evaluation's `result`, scored `fitness` (None: failed, the row's fitness
        is -inf); `seq` is given by `Ledger.append`; `docs` counts the result's documents."""
        failed = result.failed
        return cls(
            seq=0, stage=stage, candidate_id=candidate_id, generation=generation, split=split, genome=genome,
            recipe_hash=recipe_hash, recipe_yaml=recipe_yaml,
            objectives={k: float(v) for k, v in result.objectives.items()},
            higher_is_better=dict(result.higher_is_better),
            fitness=-math.inf if fitness is None else float(fitness),
            per_sample={} if failed else {k: np.asarray(v, dtype=float).tolist() for k, v in result.per_sample.items()},
            worker=worker, started=started, finished=finished,
            status="failed" if failed else "ok",
            error=(result.error or "non-finite objective") if failed else None,
            subset=subset, meta=dict(meta or {}), docs=result_docs(result), estimate=bool(estimate),
        )  # fmt: skip

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


def result_docs(result: EvalResult) -> int:
    """Documents an evaluation scored: its counts, else its per-sample scores."""
    if result.counts:
        return int(sum(int(v) for v in result.counts.values()))
    return int(sum(np.asarray(v).size for v in result.per_sample.values()))


class Ledger:
    """Append-only store of LedgerRows. Use `Ledger.open(path)`; safe to read while a run writes."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool):
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._keep_k: dict[str, int] = {}
        self._top: dict[tuple[str, bool], list[tuple[float, int, str]]] = {}  # (stage, estimate) -> (-fitness, seq, hash), best first
        self._doc_ids: dict[str, Any] = {}  # digest -> doc ids (both ways)
        self._counts: dict[str, dict[str, int]] | None = None  # stage -> split -> rows (kept up to date)
        self._gaps: list[int] | None = None  # missing seqs new rows take (fill_gaps), smallest first
        self.cursor = 0  # the last seq written or replayed (module docstring)
        self.observer: Any = None  # called with each row after it is written (evomerge.tracking)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> Ledger:
        path = Path(path)
        if readonly and not path.is_file():
            raise ConfigError("no ledger here (is this a run directory?)", file=str(path))
        conn = None
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
                # a file that is not a ledger, or a damaged one, fails here and not halfway through
                conn.execute("SELECT COUNT(*), MAX(seq) FROM evaluations").fetchone()
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
                _migrate(conn)
                conn.commit()
            _old_columns_view(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            raise sqlite_fault(exc, path) from None
        ledger = cls(conn, path, readonly)
        ledger.cursor = ledger.last_seq()
        return ledger

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing ------------------------------------------------------------------------
    def append(self, row: LedgerRow) -> LedgerRow:
        """Store the row and commit. `row.seq` <= 0 takes the next number (the smallest missing
        one after `fill_gaps`); returns the row."""
        if self.readonly:
            raise RuntimeError("ledger opened read-only")
        if row.seq <= 0:
            row.seq = self._gaps.pop(0) if self._gaps else self.last_seq() + 1
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
        try:
            with self._conn:
                if new_doc_ids is not None:
                    self._conn.execute("INSERT OR IGNORE INTO doc_ids VALUES (?, ?)", new_doc_ids)
                self._conn.execute(f"INSERT INTO evaluations VALUES ({marks})", values)
        except sqlite3.IntegrityError:
            raise  # a bug (a seq taken twice), not a fault of the file
        except sqlite3.DatabaseError as exc:
            raise sqlite_fault(exc, self.path) from None
        if new_doc_ids is not None:
            self._doc_ids[new_doc_ids[0]] = json.loads(new_doc_ids[1])
        if self._counts is not None:
            splits = self._counts.setdefault(row.stage, {})
            splits[row.split] = splits.get(row.split, 0) + 1
        self.passed(row.seq)
        if self.observer is not None:
            self.observer(row)
        return row

    def passed(self, seq: int) -> None:
        """The run has told (or recorded) the row numbered `seq`: the cursor moves on to it."""
        self.cursor = max(self.cursor, int(seq))

    def sync(self) -> None:
        """Copy the write-ahead log into the main file as far as readers allow (PASSIVE: never
        waits), then flush both to disk: every committed row is on disk, and in the main file
        alone unless a reader held the log back."""
        if not self.readonly:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.DatabaseError as exc:
                raise sqlite_fault(exc, self.path) from None
        for suffix in ("", "-wal"):
            path = f"{self.path}{suffix}"
            if os.path.exists(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # ---- completeness -------------------------------------------------------------------
    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per stage and split: {stage: {split: rows}} (baseline stages included)."""
        if self._counts is None or self.readonly:
            counts: dict[str, dict[str, int]] = {}
            for stage, split, n in self._iter("SELECT stage, split, COUNT(*) FROM evaluations GROUP BY stage, split"):
                counts.setdefault(stage, {})[split] = int(n)
            if self.readonly:
                return counts
            self._counts = counts
        return {stage: dict(splits) for stage, splits in self._counts.items()}

    def gaps(self, upto: int | None = None) -> list[tuple[int, int]]:
        """Missing seqs from 1 to `upto` (default: the last seq) as (first, last) ranges."""
        top = self.last_seq() if upto is None else max(int(upto), 0)
        present = int(self._one("SELECT COUNT(*) FROM evaluations WHERE seq <= ?", [top])[0])
        if present == top:
            return []
        ranges: list[tuple[int, int]] = []
        expected = 1
        for (seq,) in self._iter("SELECT seq FROM evaluations WHERE seq <= ? ORDER BY seq", [top]):
            if seq > expected:
                ranges.append((expected, seq - 1))
            expected = seq + 1
        if expected <= top:
            ranges.append((expected, top))
        return ranges

    def fill_gaps(self) -> int:
        """From now on new rows take the missing seqs below the last one, smallest first (a
        rebuild re-creates lost rows in their original order); returns how many there are."""
        self._gaps = [seq for first, last in self.gaps() for seq in range(first, last + 1)]
        return len(self._gaps)

    def row_stage(self, seq: int, *, before: bool = False) -> str | None:
        """The stage of the row numbered `seq` (`before`: of the last row before it)."""
        if before:
            found = self._one("SELECT stage FROM evaluations WHERE seq < ? ORDER BY seq DESC LIMIT 1", [int(seq)])
        else:
            found = self._one("SELECT stage FROM evaluations WHERE seq = ?", [int(seq)])
        return found[0] if found else None

    def keep_genomes(self, stage: str, top_k: int) -> None:
        """Keep the long genomes of stage's top `top_k` search rows (module docstring)."""
        self._keep_k[stage] = max(1, int(top_k))
        self._top.pop((stage, False), None)
        self._top.pop((stage, True), None)

    def _enters_top(self, row: LedgerRow) -> bool:
        """Whether a search row enters its stage's top k (and record it there)."""
        if row.split != "search" or row.status != "ok" or not math.isfinite(row.fitness):
            return False
        k = self._keep_k.get(row.stage, 1)
        key = (row.stage, bool(row.estimate))  # estimates rank apart: one may be re-scored in full
        top = self._top.get(key)
        if top is None:
            top, seen = [], set()
            query = "SELECT fitness, seq, recipe_hash FROM evaluations WHERE stage = ? AND split = 'search' AND status = 'ok' AND estimate = ? ORDER BY fitness DESC, seq"
            for fitness, seq, digest in self._iter(query, [row.stage, int(bool(row.estimate))]):
                if fitness is None or not math.isfinite(fitness) or digest in seen:
                    continue
                seen.add(digest)
                top.append((-fitness, seq, digest))
                if len(top) >= k:
                    break
            self._top[key] = top
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
        found = self._one("SELECT * FROM evaluations WHERE seq = ?", [int(seq)])
        return self._row(found) if found else None

    def rows(self, stage: str | None = None, split: str | None = None, *, after_seq: int = 0, generation: int | None = None) -> list[LedgerRow]:
        """Rows in seq order, optionally of one stage, split and/or generation, after a given seq."""
        where, args = _where(stage=stage, split=split, generation=generation)
        query = f"SELECT * FROM evaluations WHERE seq > ?{where} ORDER BY seq"
        return [self._row(r) for r in self._iter(query, [after_seq, *args])]

    def top(self, stage: str, k: int | None = None, split: str = "search", *, estimates: bool = False) -> list[LedgerRow]:
        """Successful rows of a stage with a finite fitness, best first (ties: the earlier row),
        one per recipe, at most `k`; reads only the rows it returns in full. Rows whose fitness
        is an estimate count only with `estimates`."""
        only = "" if estimates else " AND estimate = 0"
        query = f"SELECT seq, recipe_hash, fitness FROM evaluations WHERE stage = ? AND split = ? AND status = 'ok'{only} ORDER BY fitness DESC, seq"
        seqs, seen = [], set()
        for seq, digest, fitness in self._iter(query, [stage, split]):
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
        for cid, digest, recipe_yaml, meta in self._iter(query, [stage]):
            if cid not in out:
                out[int(cid)] = (digest, recipe_yaml, [int(p) for p in json.loads(meta or "{}").get("parents", [])])
        return out

    def summary(self, stage: str, split: str = "search") -> dict[str, Any]:
        """Counts and times of a stage's rows without reading them: rows, failures, first start,
        last finish, the first row's objective directions and the last failed row's error."""
        where = "FROM evaluations WHERE stage = ? AND split = ?"
        rows, failures, first, last = self._one(
            f"SELECT COUNT(*), COALESCE(SUM(status != 'ok'), 0), MIN(started), MAX(finished) {where}", [stage, split]
        )
        directions = self._one(f"SELECT higher_is_better {where} ORDER BY seq LIMIT 1", [stage, split])
        error = self._one(f"SELECT error, seq {where} AND status != 'ok' ORDER BY seq DESC LIMIT 1", [stage, split])
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
        cur = self._iter("SELECT stage FROM evaluations GROUP BY stage ORDER BY MIN(seq)")
        return [r[0] for r in cur if not r[0].startswith(BASELINE_PREFIX)]

    def baselines(self) -> list[LedgerRow]:
        """Rows of the hand-set baseline recipes a run scored for reference (stage `baseline:NAME`)."""
        cur = self._iter("SELECT * FROM evaluations WHERE substr(stage, 1, ?) = ? ORDER BY seq", (len(BASELINE_PREFIX), BASELINE_PREFIX))
        return [self._row(r) for r in cur]

    def find(self, recipe_hash: str, split: str, stage: str | None = None, subset: str | None = None) -> LedgerRow | None:
        """The first successful-or-failed row that scored this recipe on this split (and stage /
        subset when given)."""
        where, args = _where(stage=stage, subset=subset)
        query = f"SELECT * FROM evaluations WHERE recipe_hash = ? AND split = ?{where} ORDER BY seq LIMIT 1"
        found = self._one(query, [recipe_hash, split, *args])
        return self._row(found) if found else None

    def estimated(self, stage: str, above: float | None, k: int) -> list[LedgerRow]:
        """The best (at most `k`) search rows of a stage whose fitness is an estimate, one per
        recipe, of recipes that have no full-fidelity search row, with a fitness above `above`
        (None: any): what must be scored in full before the stage's top-k is read."""
        query = (
            "SELECT seq, recipe_hash, fitness FROM evaluations e WHERE stage = ? AND split = 'search' AND status = 'ok' AND estimate = 1"
            " AND NOT EXISTS (SELECT 1 FROM evaluations f WHERE f.stage = e.stage AND f.split = 'search' AND f.recipe_hash = e.recipe_hash AND f.estimate = 0)"
            " ORDER BY fitness DESC, seq"
        )
        seqs, seen = [], set()
        for seq, digest, fitness in self._iter(query, [stage]):
            if fitness is None or not math.isfinite(fitness) or (above is not None and fitness <= above) or digest in seen:
                continue
            seen.add(digest)
            seqs.append(seq)
            if len(seqs) >= k:
                break
        return [row for seq in seqs if (row := self.get(seq)) is not None]

    def doc_counts(self, stage: str) -> list[tuple[str, float, int | None, bool, str, dict[str, Any]]]:
        """(recipe hash, fitness, docs, estimate, status, meta without doc ids) of every search
        row of a stage, in seq order, without reading scores (`evomerge.fidelity.figures`)."""
        query = (
            "SELECT recipe_hash, fitness, docs, estimate, status, meta, CASE WHEN docs IS NULL THEN per_sample END"
            " FROM evaluations WHERE stage = ? AND split = 'search' ORDER BY seq"
        )
        out = []
        for digest, fitness, docs, estimate, status, meta, per_sample in self._iter(query, [stage]):
            info = {k: v for k, v in json.loads(meta or "{}").items() if k != "doc_ids"}
            if docs is None and per_sample:  # a version-1 row read through the view: count its scores
                docs = sum(len(v) for v in json.loads(per_sample).values()) or None
            out.append((digest, float("-inf") if fitness is None else float(fitness), docs, bool(estimate), status, info))
        return out

    def find_all(self, recipe_hash: str, split: str, stage: str, subset: str) -> list[LedgerRow]:
        """Every successful row that scored this recipe on this split, stage and subset, in seq
        order (a fidelity strategy reuses their per-sample scores)."""
        query = "SELECT * FROM evaluations WHERE recipe_hash = ? AND split = ? AND stage = ? AND subset = ? AND status = 'ok' ORDER BY seq"
        return [self._row(r) for r in self._iter(query, [recipe_hash, split, stage, subset])]

    def last_seq(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(seq), 0) FROM evaluations")[0])

    def count(self, stage: str | None = None, split: str | None = None) -> int:
        query, args = "SELECT COUNT(*) FROM evaluations WHERE 1=1", []
        if stage is not None:
            query += " AND stage = ?"
            args.append(stage)
        if split is not None:
            query += " AND split = ?"
            args.append(split)
        return int(self._one(query, args)[0])

    def _iter(self, query: str, args: list[Any] | tuple = ()) -> Any:
        """The rows of a query, one at a time; a damaged file raises one line naming it."""
        try:
            yield from self._conn.execute(query, args)
        except sqlite3.DatabaseError as exc:
            raise sqlite_fault(exc, self.path) from None

    def _one(self, query: str, args: list[Any] | tuple = ()) -> Any:
        """The first row of a query (None when there is none)."""
        try:
            return self._conn.execute(query, args).fetchone()
        except sqlite3.DatabaseError as exc:
            raise sqlite_fault(exc, self.path) from None

    def _doc_ids_of(self, digest: str) -> Any:
        if digest not in self._doc_ids:
            found = self._one("SELECT value FROM doc_ids WHERE digest = ?", [digest])
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
        data["estimate"] = bool(data["estimate"])
        if data["docs"] is None and data["per_sample"]:
            data["docs"] = int(sum(len(v) for v in data["per_sample"].values()))
        return LedgerRow(**data)


def _migrate(conn: sqlite3.Connection) -> None:
    """A version-1 ledger gets schema 2's columns: `docs` from each row's per-sample scores (every
    version-1 row scored its whole selection) and `estimate` 0."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(evaluations)")}
    missing = [(name, kind) for name, kind in _COLUMNS if name not in have]
    if not missing:
        return
    for name, kind in missing:
        conn.execute(f"ALTER TABLE evaluations ADD COLUMN {name} {kind}")
    if "docs" in dict(missing):
        for seq, per_sample in conn.execute("SELECT seq, per_sample FROM evaluations").fetchall():
            docs = sum(len(v) for v in json.loads(per_sample or "{}").values())
            conn.execute("UPDATE evaluations SET docs = ? WHERE seq = ?", (docs if docs else None, seq))
    conn.execute("INSERT OR REPLACE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _old_columns_view(conn: sqlite3.Connection) -> None:
    """A version-1 ledger opened read-only (status, report of an old run) reads as schema 2: a
    temporary view (it shadows the table for this connection only) adds the new columns."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(evaluations)")}
    extra = [f"{_ADDED[name]} AS {name}" for name, _ in _COLUMNS if name not in have]
    if extra:
        conn.execute(f"CREATE TEMP VIEW evaluations AS SELECT *, {', '.join(extra)} FROM main.evaluations")


def _compact(values: Any) -> Any:
    """A per-sample list of whole numbers as ints (shorter JSON), anything else as it is."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fiu" and arr.size and np.isfinite(arr).all() and (arr == np.rint(arr)).all() and np.abs(arr).max() < 2**53:
        return arr.astype(np.int64).tolist()
    return values


def _where(**filters: str | int | None) -> tuple[str, list[Any]]:
    """` AND column = ?` for every filter that is set, and its arguments (column names are ours)."""
    given = {column: value for column, value in filters.items() if value is not None}
    return "".join(f" AND {column} = ?" for column in given), list(given.values())
