"""A stage under a fidelity strategy: its runner, and the full re-scoring of its best.

Nothing is selected on an estimate alone: before a stage's holdout top-k is scored (and so
before its best is reported or exported), `rescore_estimates` scores in full every recipe whose
estimated fitness would place it in the top k of the full-fidelity rows, until no estimate would
(`Ledger.top` reads only full-fidelity rows). A strategy that `bounds_estimates` puts a recipe
there on the lower confidence bound of its estimate instead: the best of many noisy estimates is
inflated by the selection itself, and a bound asks for the evidence that it beats the k-th. A
re-score evaluates only the documents the recipe lacks; its row (`meta.rescore_of`: the
estimate's row) is a search row with `estimate` False that the optimizer is not told. The holdout is scored only after, and no strategy ever
sees a holdout score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.fidelity import check_fidelity, split_spec
from evomerge.fidelity.base import StageInfo
from evomerge.fidelity.runner import FidelityRunner
from evomerge.optim.base import Candidate
from evomerge.run.ledger import Ledger, LedgerRow
from evomerge.run.scheduler import Evaluation, Pending, Scheduler


def check_stage_fidelity(spec: Any, evaluator_cls: type, *, file: str | None, where: str) -> None:
    """A strategy other than `full` needs an evaluator that scores chosen documents."""
    cls, _ = check_fidelity(spec, file=file, where=f"{where}.fidelity")
    if not cls.FULL and not getattr(evaluator_cls, "SELECTS_DOCUMENTS", False):
        name, _ = split_spec(spec)
        raise ConfigError(
            f"strategy '{name}' scores chosen documents; evaluator kind '{evaluator_cls.kind}' cannot select them (use fidelity: full)",
            file=file,
            field=f"{where}.fidelity",
        )


def make_runner(
    spec: Any,
    *,
    stage: str,
    evaluator: Any,
    directions: dict[str, bool],
    primary: str,
    seed: int,
    subset_for: Callable[[int], tuple[Any, str]],
    top_k: int,
    needs_core: bool,
    per_generation: bool,
    ledger: Ledger,
    state: dict[str, Any] | None,
    baseline_rows: list[LedgerRow],
) -> FidelityRunner | None:
    """The stage's runner (None for `full`: the scheduler's own path). `state`: the checkpoint's
    (None: the stage starts, and the strategy observes the baselines' search scores)."""
    cls, options = check_fidelity(spec)
    if cls.FULL:
        return None

    def doc_ids(generation: int) -> dict[str, list]:
        return evaluator.doc_ids("search", subset_for(generation)[0])

    n_docs = {t: len(ids) for t, ids in doc_ids(0).items()}
    weights = {k: dict(v) for k, v in evaluator.objective_weights.items()}
    info = StageInfo(
        stage=stage, n_docs=n_docs, weights=weights, directions=dict(directions), primary=primary,
        seed=seed, top_k=max(1, top_k), needs_core=needs_core, per_generation=per_generation,
    )  # fmt: skip
    runner = FidelityRunner(cls(options, info), ledger=ledger, doc_ids=doc_ids, state=state)
    if state is None:
        for row in baseline_rows:
            if row.ok and row.split == "search":
                runner.strategy.observe(runner.row_scores(row))
    return runner


def _entering(runner: FidelityRunner, ledger: Ledger, bar: float | None, n: int) -> list[LedgerRow]:
    """The best `n` estimated rows above `bar` (None: any): on their estimates, or for a strategy
    that `bounds_estimates` on their lower bounds (best bound first)."""
    stage, strategy = runner.info.stage, runner.strategy
    if not strategy.bounds_estimates:
        return ledger.estimated(stage, bar, n)
    rows = ledger.estimated(stage, bar, ledger.count(stage=stage, split="search"))  # a bound is below its estimate
    bounds = [strategy.lower_bound(runner.row_scores(row), float(row.fitness)) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: -bounds[i])  # stable: ties keep the estimates' order
    return [rows[i] for i in order if bar is None or bounds[i] > bar][:n]


def rescore_estimates(
    runner: FidelityRunner, scheduler: Scheduler, ledger: Ledger, *, k: int,
    payload: Callable[[LedgerRow], Any], subset_for: Callable[[int], tuple[Any, str]], fitness: Callable[[EvalResult], float | None],
) -> int:  # fmt: skip
    """Score in full what would enter the stage's top k on an estimate (module docstring);
    returns how many recipes were re-scored."""
    stage = runner.info.stage
    k = max(1, k)
    done = 0
    while True:
        full = ledger.top(stage, k)
        bar = full[-1].fitness if len(full) >= k else None
        rows = _entering(runner, ledger, bar, k if bar is not None else k - len(full))
        todo = [(row, p) for row in rows if (p := payload(row)) is not None]
        if not todo:
            return done
        pendings = []
        for row, p in todo:
            subset, _ = subset_for(row.generation)
            cand = Candidate(id=row.candidate_id, generation=row.generation, genome=None)
            ev = Evaluation(f"{stage}|search|{row.subset}|{row.recipe_hash}|rescore", p, "search", subset)
            pendings.append(Pending(cand, None, row.recipe_hash, row.subset, ev))
        results = runner.rescore(pendings, scheduler)
        now = time.time()
        for (row, _), pending, result in zip(todo, pendings, results, strict=True):
            ev = pending.evaluation
            meta: dict[str, Any] = {"rescore_of": row.seq, "new_docs": pending.new_docs}
            if result.doc_ids:
                meta["doc_ids"] = result.doc_ids
            ledger.append(
                LedgerRow.from_result(
                    result, None if result.failed else fitness(result),
                    stage=stage, candidate_id=row.candidate_id, generation=row.generation, split="search",
                    genome=row.genome,  # a long one is kept when the row enters the top k (Ledger.append)
                    recipe_hash=row.recipe_hash, recipe_yaml=row.recipe_yaml, worker=ev.worker or "ledger",
                    started=ev.started or now, finished=ev.finished or now, subset=row.subset, meta=meta,
                )
            )  # fmt: skip
        done += len(todo)
        if len(todo) < len(rows):  # rows whose payload is gone (a weights row without its genome)
            return done
