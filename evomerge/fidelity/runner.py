"""Scores a stage's search candidates under a fidelity strategy, inside the scheduler.

The scheduler keeps its rules (results told in ask order, rows written just before each tell, a
checkpoint after it); with a strategy other than `full` a candidate's search evaluation becomes a
sequence of evaluations of the documents it still lacks (`Subset(positions=...)`), and it is
ready to be told when the strategy says it is done. What this module adds:

- *Races.* A grouped strategy (racing) decides over the candidates of one generation. A race
  is closed (its members known) when its first candidate is the head of the tell order: all
  earlier candidates are told by then, so nothing but this race can change the asks; the runner
  then asks the optimizer for more until it hands out a later generation or nothing. Members
  score their first documents while the race waits to close. An ungrouped strategy
  (sequential) decides for each candidate alone, as soon as its documents are in.
- *Reproducible.* A decision depends only on the members' scores and notes (and on the strategy's
  state, which changes only at tells); a race decides only once it is closed. The estimate a
  candidate is told is computed at its tell, in ask order.
- *No document twice.* Scores a recipe already has in the ledger on this stage and subset
  (an earlier twin, a row replayed on resume, a full re-score) are taken from there.
- *Exact resume.* The checkpoint holds the strategy's state and the notes of every candidate of
  a race not yet fully told. On resume the optimizer re-asks what was in flight; a race whose
  first members were told before the checkpoint is rebuilt with them as *ghosts* (their scores
  read from their rows, never told again), so it decides as it did.
- *M2N2.* An optimizer that compares per-sample scores (`NEEDS_PER_SAMPLE`) is told each
  candidate's scores on the strategy's `core()` documents only: a set fixed for the whole stage
  that every candidate is scored on (racing's first rung, sequential's first chunk), so every
  archive member's vector covers the same documents. The ledger row keeps all its scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from evomerge.evaluate.result import EvalResult
from evomerge.fidelity.base import Member, Strategy
from evomerge.run.ledger import Ledger, LedgerRow


@dataclass
class Race:
    generation: int
    members: list[Member]  # ask order, ghosts included
    live: dict[int, Any] = field(default_factory=dict)  # cid -> Pending, until told
    closed: bool = False


class FidelityRunner:
    """See the module docstring. `doc_ids(generation)`: per task, the ids of the full search
    selection of a candidate of that generation (the evaluator's `doc_ids`)."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        ledger: Ledger,
        doc_ids: Callable[[int], dict[str, list]],
        state: dict[str, Any] | None = None,
    ) -> None:
        self.strategy = strategy
        self.info = strategy.info
        self.ledger = ledger
        self.doc_ids = doc_ids
        self.resumed = state is not None
        self.notes: dict[int, dict] = {int(k): dict(v) for k, v in (state or {}).get("notes", {}).items()}
        if state is not None:
            strategy.load_state_dict(state.get("strategy", {}))
        self.races: list[Race] = []
        self._race_of: dict[int, Race] = {}
        self._ids_cache: dict[str, dict[str, list]] = {}  # subset key -> task -> doc ids
        self._index: dict[str, dict[str, dict[Any, int]]] = {}  # subset key -> task -> doc id -> position
        self._opened: dict[int, dict] = {}  # cid -> its note right after open (what a resume restores)
        self._ghosted: set[int] = set()
        self._core = strategy.core() if self.info.needs_core else None

    # ---- the scheduler's hooks ----------------------------------------------------------
    def start(self, pending: Any, error: str | None, scheduler: Any) -> None:
        """A new candidate (a scheduler `Pending`): open it, put it in its race, request its
        first documents."""
        cand = pending.cand
        member = Member(cid=cand.id, generation=cand.generation, note=self.notes.pop(cand.id, {}))
        member.error = error
        pending.member = member
        race = self._race_for(cand.generation, cand.id, pending.subset_key)
        race.members.append(member)
        race.live[cand.id] = pending
        self._race_of[cand.id] = race
        if error is None:
            pending.known = self._known(pending.recipe_hash, pending.subset_key)
            self._open(member)
            self._request(member, pending, scheduler)
        else:
            member.done = True

    def advance(self, outstanding: list[Any], scheduler: Any) -> None:
        """Merge finished evaluations, close the head's race, let ready races decide, request
        what they want next; until nothing changes."""
        changed = True
        while changed:
            changed = False
            for race in self.races:
                for member in race.members:
                    p = race.live.get(member.cid)
                    if p is not None and p.delta is not None and p.delta.done:
                        scheduler.forget(p.delta)
                        self._merge(member, p)
                        changed = True
            if outstanding and self.strategy.GROUPED:
                changed |= self._close(outstanding, scheduler)
            for race in self.races:
                if self._ready(race):
                    self.strategy.decide([m for m in race.members if not m.done])
                    for m in race.members:
                        if not m.done:
                            self._request(m, race.live.get(m.cid), scheduler)
                    changed = True

    def result(self, pending: Any) -> tuple[EvalResult, EvalResult, bool]:
        """At its tell: (what the optimizer is told, what its ledger row holds, whether the
        fitness is an estimate)."""
        m: Member = pending.member
        objectives = self.strategy.estimate(m) if m.error is None else {}
        told, row = self._result(m, pending, objectives)
        estimate = m.error is None and (self.strategy.is_estimate(m) or any(not math.isfinite(v) for v in objectives.values()))
        return told, row, bool(estimate)

    def _result(self, m: Member, pending: Any, objectives: dict[str, float]) -> tuple[EvalResult, EvalResult]:
        info = self.info
        if m.error is not None:
            failed = EvalResult.failure(m.error, dict(info.directions), pending.seconds)
            return failed, failed
        ids = self._ids(pending.subset_key, m.generation)
        per_sample = {t: m.values(t) for t in sorted(m.scores)}
        doc_ids = {t: [ids[t][int(i)] for i in m.positions(t)] for t in sorted(m.scores)}
        row = EvalResult(
            objectives=objectives, higher_is_better=dict(info.directions), per_sample=per_sample, doc_ids=doc_ids,
            counts={t: len(v) for t, v in per_sample.items()}, seconds=pending.seconds,
            task_scores=m.task_means(), objective_weights={k: dict(v) for k, v in info.weights.items()},
        )  # fmt: skip
        told = row
        if self._core is not None:
            keep = {t: np.isin(m.positions(t), self._core[t]) for t in per_sample if t in self._core}
            told = replace(
                row,
                per_sample={t: v[keep[t]] for t, v in per_sample.items() if t in keep},
                doc_ids={t: [d for d, k in zip(doc_ids[t], keep[t], strict=True) if k] for t in keep},
            )
        return told, row

    def told(self, pending: Any, fitness: float | None) -> None:
        member: Member = pending.member
        self.strategy.told(member, fitness)
        race = self._race_of.pop(member.cid)
        race.live.pop(member.cid, None)
        if not race.live and race.closed:
            self.races.remove(race)
            for m in race.members:
                self._opened.pop(m.cid, None)

    def rescore(self, pendings: list[Any], scheduler: Any) -> list[EvalResult]:
        """Score each `Pending` (a row's recipe, with its subset and the scores the ledger has) on
        every document of the search set, evaluating only the documents it lacks; their full
        results (never estimates)."""
        members = []
        for p in pendings:
            m = Member(cid=p.cand.id, generation=p.cand.generation, want=self.strategy.all_documents())
            p.member, p.known = m, self._known(p.recipe_hash, p.subset_key)
            self._request(m, p, scheduler)
            members.append(m)
        while any(p.delta is not None for p in pendings):
            for m, p in zip(members, pendings, strict=True):
                if p.delta is not None and p.delta.done:
                    scheduler.forget(p.delta)
                    self._merge(m, p)
                    if m.error is None:
                        self._request(m, p, scheduler)
            if any(p.delta is not None and not p.delta.done for p in pendings):
                scheduler.evaluate_all([p.delta for p in pendings if p.delta is not None])
        out = []
        for m, p in zip(members, pendings, strict=True):
            m.done = True
            out.append(self._result(m, p, self.info.objectives(m.task_means()) if m.error is None else {})[1])
        return out

    def state_dict(self) -> dict[str, Any]:
        notes = {str(m.cid): self._opened[m.cid] for race in self.races if race.live for m in race.members if m.cid in self._opened}
        return {"strategy": self.strategy.state_dict(), "notes": notes}

    # ---- races --------------------------------------------------------------------------
    def _race_for(self, generation: int, cid: int, subset_key: str) -> Race:
        if self.strategy.GROUPED:
            for race in reversed(self.races):
                if race.generation == generation and not race.closed:
                    return race
        race = Race(generation, [], closed=not self.strategy.GROUPED)
        self.races.append(race)
        if self.strategy.GROUPED and self.resumed and generation not in self._ghosted:
            self._ghosted.add(generation)
            self._add_ghosts(race, cid, subset_key)
        return race

    def _add_ghosts(self, race: Race, cid: int, subset_key: str) -> None:
        """Candidates of this generation told before the run was resumed (module docstring)."""
        for row in self.ledger.rows(stage=self.info.stage, split="search", generation=race.generation):
            if row.candidate_id >= cid or "rescore_of" in row.meta or row.meta.get("fidelity_ghost"):
                continue
            ghost = Member(cid=row.candidate_id, generation=race.generation, note=self.notes.pop(row.candidate_id, {}))
            race.members.append(ghost)
            if not row.ok:
                ghost.error, ghost.done = row.error or "failed", True
                continue
            known = self._row_scores([row], subset_key)
            self._open(ghost)
            self._fill(ghost, known)
            if ghost.missing():  # cannot happen when the run is deterministic: it stays as told
                ghost.done = True

    def _close(self, outstanding: list[Any], scheduler: Any) -> bool:
        head = outstanding[0]
        race = self._race_of.get(head.cand.id) if getattr(head, "member", None) is not None else None
        if race is None or race.closed:
            return False
        opt = scheduler.opt
        later = any(p.cand.generation != race.generation for p in outstanding)  # asked already (a resumed run re-asks it)
        while not later and not opt.stopped:
            got = opt.ask(1)
            if not got:
                break
            outstanding.extend(scheduler._pending(c) for c in got)
            if any(c.generation != race.generation for c in got):
                break
        race.closed = True
        return True

    def _ready(self, race: Race) -> bool:
        if not race.closed:
            return False
        undone = [m for m in race.members if not m.done]
        if not undone:
            return False
        for m in undone:
            p = race.live.get(m.cid)
            if (p is not None and p.delta is not None) or m.missing():
                return False
        return True

    # ---- documents ----------------------------------------------------------------------
    def _open(self, member: Member) -> None:
        self.strategy.open(member)
        self._opened[member.cid] = json_copy(member.note)
        if self._core is not None:
            member.want = {t: np.union1d(member.want.get(t, np.zeros(0, np.int64)), self._core.get(t, np.zeros(0, np.int64))).astype(np.int64) for t in self.info.n_docs}

    def _request(self, member: Member, pending: Any, scheduler: Any) -> None:
        """Score what the member wants and lacks: from known scores, else one evaluation."""
        if pending is None:  # a ghost: its scores are all known
            if member.missing():
                member.done = True
            return
        self._fill(member, pending.known)
        missing = member.missing()
        if not missing:
            return
        positions = tuple((t, tuple(int(i) for i in missing[t])) for t in sorted(missing))
        digest = hashlib.sha256(repr(positions).encode()).hexdigest()[:16]
        subset = replace(pending.evaluation.subset, positions=positions)
        sub_key = f"{pending.subset_key}|docs={digest}"
        key = f"{self.info.stage}|search|{sub_key}|{pending.recipe_hash}"
        pending.delta = scheduler.evaluation(key, pending.evaluation.payload, "search", subset, sub_key)
        pending.delta_positions = missing

    def _fill(self, member: Member, known: dict[str, dict[int, float]]) -> None:
        for task, pos in member.missing().items():
            have = known.get(task, {})
            for p in pos.tolist():
                if p in have:
                    member.scores.setdefault(task, {})[p] = have[p]
        _in_order(member)

    def _merge(self, member: Member, pending: Any) -> None:
        ev, positions = pending.delta, pending.delta_positions
        pending.delta = pending.delta_positions = None
        result: EvalResult = ev.result
        pending.add_timing(ev)
        if ev.reused_from is None:
            pending.new_docs += sum(len(pos) for pos in positions.values())
        if result.error is not None:
            member.error, member.done = result.error, True
            return
        for task, pos in positions.items():
            values = np.asarray(result.per_sample.get(task, []), dtype=np.float64).ravel()
            if len(values) != len(pos) or not np.isfinite(values).all():
                member.error, member.done = f"task {task}: {len(values)} finite scores for {len(pos)} documents", True
                return
            member.scores.setdefault(task, {}).update(zip(pos.tolist(), values.tolist(), strict=True))
        _in_order(member)

    def row_scores(self, row: LedgerRow) -> dict[str, dict[int, float]]:
        """A row's per-sample scores by document position (task -> position -> score)."""
        return self._row_scores([row], row.subset)

    def _known(self, recipe_hash: str, subset_key: str) -> dict[str, dict[int, float]]:
        rows = self.ledger.find_all(recipe_hash, "search", self.info.stage, subset_key)
        return self._row_scores(rows, subset_key)

    def _row_scores(self, rows: list[LedgerRow], subset_key: str) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        if not rows:
            return out
        index = self._positions(subset_key, rows[0].generation)
        for row in rows:
            for task, ids in row.meta.get("doc_ids", {}).items():
                where = index.get(task, {})
                for doc, value in zip(ids, row.per_sample.get(task, []), strict=False):
                    if doc in where:
                        out.setdefault(task, {})[where[doc]] = float(value)
        return out

    def _positions(self, subset_key: str, generation: int) -> dict[str, dict[Any, int]]:
        if subset_key not in self._index:
            ids = self._ids(subset_key, generation)
            self._index[subset_key] = {t: {d: i for i, d in enumerate(v)} for t, v in ids.items()}
        return self._index[subset_key]

    def _ids(self, subset_key: str, generation: int) -> dict[str, list]:
        """Doc ids of the full selection; the subset key names it (one per generation when the
        evaluator subsamples per generation, else one for the stage)."""
        if subset_key not in self._ids_cache:
            self._ids_cache[subset_key] = self.doc_ids(generation)
        return self._ids_cache[subset_key]


def _in_order(member: Member) -> None:
    """Scores in position order, however they arrived (evaluated in rungs, or read from rows), so a
    strategy iterating them sums in the same order in a resumed run."""
    member.scores = {t: dict(sorted(got.items())) for t, got in sorted(member.scores.items())}


def json_copy(note: dict) -> dict:
    """A deep copy of a JSON-safe note (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(note))
