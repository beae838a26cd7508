"""`irt`: candidates scored on a few anchor documents, their full-set fitness estimated by IRT.

Phases (the model itself is `evomerge.fidelity.irt`):

1. Warm-up: the first `warmup` candidates of the stage are scored on every search document.
   With the baselines' search rows (`observe`) they are the training models of the first fit.
   Candidates asked before that fit exists (the rest of the first generation) are scored on
   `core()`, a seeded sample of `anchors` documents, and estimated from it at their tell.
2. Fit: once the warm-up's last candidate is told, a 2PL model is fitted on every row the
   strategy has (seeded by the stage seed and the fit's number).
3. Anchors (`rotate`, the default): the first candidate of every later generation refits the
   model on every row so far, anchor-only rows included, and draws that generation's `anchors`
   documents afresh, split across the primary objective's tasks by their weights
   (`irt.draw_anchors`: a `spread` share uniform over each task, by default all of it, the rest
   in proportion to each document's Fisher information at the abilities of the candidates told
   since the last draw),
   seeded by the stage seed and the generation. A fixed set of a few anchors per task saturates
   as a search moves: every candidate of a generation right on them, or wrong on them, so all
   get one estimate and the optimizer has nothing to rank. A rotating draw follows the
   candidates to the documents where they still differ; every document is observed now and
   then, so refits keep learning all of them; one model ranks a whole generation (no refit on
   its tells). With `rotate: false` the anchors are chosen once per fit (`irt.choose_anchors`),
   and refits come with new fully scored rows and every `refit_every` told candidates.
4. Every later candidate is scored on its anchors and told its estimate (`estimator`: the
   anchors' weighted mean, by default, which a uniform draw makes unbiased; or p-IRT, gp-IRT from
   the fitted model) of each task's mean over the full search set, marked as an estimate in the
   ledger. With the defaults the told fitness is a plain sample mean and the fits only decide a
   draw with `spread` < 1: a p-IRT estimate pulls a candidate with a skill the fitted population
   lacks back toward that population, and the search can lose the skill. With `shrink` (rotate), each task's estimate is moved that share
   of the way toward the mean score of the candidates told before the generation's draw (the
   previous generation): one factor for a whole generation keeps its ranking, and noisy
   overestimates (a plain anchor mean of a few documents) are pulled down, so fewer of them
   would enter the top k and need a full re-score at the end of the stage.
   With a `novelty_margin`, a candidate whose weighted anchor mean on some task exceeds the best
   of the fully scored models by more than the margin has abilities the model has not seen,
   where a 2PL fitted below them extrapolates badly; it is scored on every document instead
   (the runner scores only the documents it lacks), told exactly, and becomes a training row.
   Every `full_every`-th candidate after the warm-up (0: none) is also scored in full.
5. At the end of the stage the estimates that would enter the top k are scored in full
   (`fidelity.stage.rescore_estimates`), with `rescore_z` on a lower bound of each: its anchor
   mean less z standard errors of a uniform sample (`fidelity.base.sample_stderr`). The best of
   some hundred unbiased but noisy estimates is inflated by the selection itself; the bound
   re-scores the ones with the evidence to beat the k-th full row, not every lucky draw.

A candidate's documents are decided when it is asked, from the fit of that moment, and kept in
its note; its estimate comes from the fit of the moment it is told (in ask order). The rows, the
fit and the counters are the strategy's state, saved with every checkpoint, so a resumed run
fits, chooses and estimates exactly as an uninterrupted one.

Documents are positions in each task's search selection (`fidelity.base`): with a per-generation
`subsample` the same position is a different document each generation, so the model would mix
documents; use `limit` or a fixed subsample with `irt`.

For an optimizer that needs common documents (M2N2, `StageInfo.needs_core`) every candidate is
also scored on `core()`: a seeded sample of `anchors` documents fixed for the whole stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.fidelity import irt
from evomerge.fidelity.base import (
    Member,
    Positions,
    StageInfo,
    Strategy,
    StrategyOptions,
    permutation,
    prefix,
    sample_stderr,
)


class IrtOptions(StrategyOptions):
    """Defaults chosen with experiments/benchmarks/fitness_cost.py over more seeds than its three
    (see experiments/RESULTS.md); `estimator: p_irt, spread: 0.5` were the earlier defaults, and
    `rotate: false`, `estimator: gp_irt` and a `novelty_margin` give anchors chosen once per fit."""

    anchors: int = Field(24, ge=1)  # anchor documents per candidate, over all tasks
    warmup: int = Field(5, ge=1)  # candidates scored in full before the first fit
    novelty_margin: float | None = Field(None, ge=0)  # None: never score a novel candidate in full
    refit_every: int = Field(0, ge=0)  # without rotate: told candidates between refits (0: on new full rows only)
    full_every: int = Field(0, ge=0)  # after the warm-up, every n-th candidate in full (0: none)
    estimator: Literal["gp_irt", "p_irt", "anchor_mean"] = "anchor_mean"  # anchor_mean: unbiased with spread 1 (uniform draws)
    anchor_focus: Literal["top", "mean"] = "top"  # without rotate: anchors informative at the best model's ability, or on average
    rotate: bool = True  # fresh anchors for every generation, drawn from a fit refreshed at its start
    spread: float = Field(1.0, ge=0, le=1)  # rotate: uniform share of a draw (the rest by information)
    shrink: float = Field(0.0, ge=0, le=1)  # rotate: estimates pulled this share toward the previous generation's mean
    rescore_z: float | None = Field(None, ge=0)  # final re-scoring on estimate - z x its sampling error (None: 1 with anchor_mean, else 0)

    @model_validator(mode="after")
    def _bound(self) -> IrtOptions:
        if self.rescore_z and self.estimator != "anchor_mean":
            raise ValueError(f"rescore_z bounds the sampling error of estimator anchor_mean, not of {self.estimator}")
        return self

    @property
    def z(self) -> float:
        """The `rescore_z` in force."""
        if self.rescore_z is not None:
            return self.rescore_z
        return 1.0 if self.estimator == "anchor_mean" else 0.0


class IrtStrategy(Strategy):
    name = "irt"
    Options = IrtOptions

    def __init__(self, options: IrtOptions, info: StageInfo) -> None:
        super().__init__(options, info)
        self.tasks = list(info.n_docs)
        self.offsets = dict(zip(self.tasks, np.cumsum([0] + [info.n_docs[t] for t in self.tasks[:-1]]).tolist(), strict=True))
        self.rows: list[dict[str, dict[int, float]]] = []  # training rows: task -> position -> score
        self.opened = 0  # candidates opened (asked) so far in the stage
        self.told_count = 0
        self.fits = 0
        self.model: irt.IrtModel | None = None
        self.rows_at_fit = 0  # rows the model was fitted on
        self.drawn_for: int | None = None  # rotate: the generation the current anchors were drawn for
        self.rows_at_draw = 0  # rotate: rows there were at that draw
        self.prior: dict[str, float] = {}  # shrink: task -> mean score of the rows told before this generation's draw

    # ------------------------------------------------------------------ documents
    def open(self, member: Member) -> None:
        if "full" not in member.note:
            if self.options.rotate:
                self._rotate(member.generation)
            k = self.opened - self.options.warmup
            every = self.options.full_every
            member.note["full"] = k < 0 or (every > 0 and k % every == every - 1)
            member.note["anchors"] = None if member.note["full"] else self._anchor_positions()
            member.note["novel_above"] = None if member.note["full"] or self.model is None else self._novelty_thresholds()
            self.opened += 1
        if member.note["full"]:
            member.want = self.all_documents()
            return
        if member.note.get("novel"):
            member.want = self.all_documents()
            return
        want = {t: np.asarray([int(p) for p, _ in pairs], dtype=np.int64) for t, pairs in member.note["anchors"].items()}
        if self.info.needs_core:
            core = self.core()
            want = {t: np.union1d(want.get(t, np.zeros(0, dtype=np.int64)), core[t]) for t in core}
        member.want = want

    def _anchor_positions(self) -> dict[str, list[list[float]]]:
        """task -> [[position, weight], ...] of the current anchors (before the first fit: the
        seeded `core()` sample, equally weighted)."""
        out: dict[str, list[list[float]]] = {t: [] for t in self.tasks}
        if self.model is None:
            for t, pos in self.core().items():
                out[t] = [[int(p), 1.0 / len(pos)] for p in pos.tolist()]
            return out
        for j, w in zip(self.model.anchors.tolist(), self.model.anchor_weights.tolist(), strict=True):
            task, pos = self._item(j)
            out[task].append([pos, w])
        return out

    def _rotate(self, generation: int) -> None:
        """The first candidate of a generation (once a model exists): refit on every row so far
        and draw this generation's anchors at the abilities of the candidates told since the
        last draw (`irt.draw_anchors`), seeded by the stage seed and the generation. Called when a
        candidate opens, so it depends only on the state the last tell left: a resumed run draws
        the same anchors."""
        if self.model is None or generation == self.drawn_for:
            return
        if len(self.rows) > self.rows_at_fit:
            self._fit()
        recent = [row for row in self.rows[self.rows_at_draw :] if any(row.values())] or self.rows[-1:]
        abilities = np.stack([self.model.ability(self._observed(row)) for row in recent])
        rng = np.random.default_rng([self.info.seed & 0xFFFFFFFF, generation & 0xFFFFFFFF, 0x1D2A])
        counts = irt.allocate(self.options.anchors, self._task_weights(), dict(self.info.n_docs))
        irt.draw_anchors(self.model, counts, abilities, rng, spread=self.options.spread, responses=self._matrix(full_only=True))
        if self.options.shrink > 0:
            self.prior = _task_means(recent, self.tasks)
        self.drawn_for = generation
        self.rows_at_draw = len(self.rows)

    def _observed(self, row: Mapping[str, Mapping[int, float]]) -> dict[int, float]:
        return {self.offsets[t] + int(p): float(v) for t, got in row.items() for p, v in got.items()}

    def _novelty_thresholds(self) -> dict[str, float] | None:
        """task -> the highest weighted anchor mean of a fully scored row, plus the margin."""
        margin = self.options.novelty_margin
        if margin is None:
            return None
        anchors = self._anchor_positions()
        best: dict[str, float] = {}
        for row in self.rows:
            if any(len(row.get(t, {})) < n for t, n in self.info.n_docs.items()):
                continue
            for t, pairs in anchors.items():
                if pairs:
                    best[t] = max(best.get(t, -math.inf), _anchor_mean(row[t], pairs))
        return {t: v + margin for t, v in best.items()}

    def decide(self, members: list[Member]) -> None:
        for m in members:
            above = m.note.get("novel_above")
            if m.error is None and not m.note.get("novel") and above and m.note.get("anchors"):
                got = m.scores
                if any(t in above and _anchor_mean(got.get(t, {}), pairs) > above[t] for t, pairs in m.note["anchors"].items() if pairs):
                    m.note["novel"] = True
                    m.want = self.all_documents()
                    continue
            m.done = True

    def _item(self, j: int) -> tuple[str, int]:
        for t in reversed(self.tasks):
            if j >= self.offsets[t]:
                return t, j - self.offsets[t]
        raise IndexError(j)

    def core(self) -> Positions:
        sizes = self.info.n_docs
        counts = irt.allocate(self.options.anchors, self._task_weights(), sizes)
        return prefix({t: permutation(self.info, t, salt="irt-core") for t in sizes}, counts)

    def _task_weights(self) -> dict[str, float]:
        primary = self.info.weights.get(self.info.primary, {})
        return {t: float(primary.get(t, 0.0)) for t in self.tasks}

    # ------------------------------------------------------------------ estimates
    def estimate(self, member: Member) -> dict[str, float]:
        if self.model is None or member.is_full(self.info) or member.error is not None:
            return super().estimate(member)
        est = self.model.estimate(self._observed(member.scores))
        values = {t: est[t][self.options.estimator] for t in self.tasks}
        return self.info.objectives(_shrunk(values, self.prior, self.options.shrink))

    @property
    def bounds_estimates(self) -> bool:
        return self.options.z > 0

    def lower_bound(self, scores: Mapping[str, Mapping[int, float]], fitness: float) -> float:
        """The told anchor mean less `rescore_z` standard errors of a uniform sample (a draw with
        `spread` < 1 is not one: the bound is then approximate)."""
        return fitness - self.options.z * sample_stderr(self.info, scores)

    # ------------------------------------------------------------------ learning
    def observe(self, scores: Mapping[str, Mapping[int, float]]) -> None:
        self.rows.append(_row(scores))

    def told(self, member: Member, fitness: float | None) -> None:
        if member.error is None and member.scores:
            self.rows.append(_row(member.scores))
        self.told_count += 1
        o = self.options
        if self.model is None:
            due = self.told_count >= o.warmup
        elif o.rotate:
            due = False  # refits come with each generation's draw, so one model ranks a generation
        else:
            full = member.error is None and member.is_full(self.info)
            due = full or (o.refit_every > 0 and (self.told_count - o.warmup) % o.refit_every == 0)
        if due:
            self._fit()

    def _matrix(self, full_only: bool = False) -> np.ndarray:
        """The rows as models x documents (NaN: not scored), rows without scores left out (with
        `full_only`: only rows scored on every document)."""
        matrix = np.full((len(self.rows), self.info.total), np.nan)
        for i, row in enumerate(self.rows):
            for j, v in self._observed(row).items():
                matrix[i, j] = v
        keep = ~np.isnan(matrix).any(axis=1) if full_only else ~np.isnan(matrix).all(axis=1)
        return matrix[keep]

    def _fit(self) -> None:
        matrix = self._matrix()
        if len(matrix) < 2 or np.isnan(matrix).all(axis=0).any():
            return  # not every document has a score yet (e.g. failed warm-up candidates)
        groups = [t for t in self.tasks for _ in range(self.info.n_docs[t])]
        seed = [self.info.seed & 0xFFFFFFFF, self.fits]
        seed_int = int(np.random.default_rng(seed).integers(2**31))
        model = irt.fit(matrix, groups, seed=seed_int, config=irt.IrtConfig(anchor_focus=self.options.anchor_focus))
        if not self.options.rotate:  # rotating anchors are drawn for each generation instead
            counts = irt.allocate(self.options.anchors, self._task_weights(), dict(self.info.n_docs))
            irt.choose_anchors(model, counts, seed=seed_int, responses=matrix)
        self.model = model
        self.fits += 1
        self.rows_at_fit = len(self.rows)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": [{t: [[int(p), float(v)] for p, v in sorted(got.items())] for t, got in row.items()} for row in self.rows],
            "opened": self.opened,
            "told": self.told_count,
            "fits": self.fits,
            "model": None if self.model is None else self.model.state_dict(),
            "rows_at_fit": self.rows_at_fit,
            "drawn_for": self.drawn_for,
            "rows_at_draw": self.rows_at_draw,
            "prior": dict(self.prior),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows = [{t: {int(p): float(v) for p, v in pairs} for t, pairs in row.items()} for row in state.get("rows", [])]
        self.opened = int(state.get("opened", 0))
        self.told_count = int(state.get("told", 0))
        self.fits = int(state.get("fits", 0))
        self.rows_at_fit = int(state.get("rows_at_fit", 0))
        self.drawn_for = state.get("drawn_for")
        self.rows_at_draw = int(state.get("rows_at_draw", 0))
        self.prior = {str(t): float(v) for t, v in state.get("prior", {}).items()}
        model = state.get("model")
        self.model = None if model is None else irt.IrtModel.from_state(model)


def _anchor_mean(scores: Mapping[int, float], pairs: list) -> float:
    """The weighted mean of `scores` over anchors [[position, weight], ...] (NaN if one is missing)."""
    total = sum(w for _, w in pairs)
    if total <= 0 or any(int(p) not in scores for p, _ in pairs):
        return math.nan
    return sum(w * scores[int(p)] for p, w in pairs) / total


def _task_means(rows: list[dict[str, dict[int, float]]], tasks: list[str]) -> dict[str, float]:
    """task -> the mean over rows of each row's mean score on the task (rows without it left out)."""
    out = {}
    for t in tasks:
        means = [sum(row[t].values()) / len(row[t]) for row in rows if row.get(t)]
        if means:
            out[t] = sum(means) / len(means)
    return out


def _shrunk(values: dict[str, float], prior: Mapping[str, float], shrink: float) -> dict[str, float]:
    """Each task's estimate moved `shrink` of the way to its prior (James-Stein style: one factor
    for a whole generation keeps its ranking, and pulls the noisiest overestimates down)."""
    if shrink <= 0:
        return values
    return {t: v + shrink * (prior[t] - v) if t in prior and math.isfinite(v) else v for t, v in values.items()}


def _row(scores: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    return {t: {int(p): float(v) for p, v in got.items() if math.isfinite(float(v))} for t, got in scores.items()}
