"""Documents evaluated, a first-class figure: what `status`, `status --json` and the report show
per stage (`stage_documents`).

- `evaluated`: documents the stage scored on its search split (each row's `meta.new_docs`, the
  documents evaluated for it, else its `docs`; a row that took another row's scores, 0),
  re-scores in full included;
- `full`: what a full-fidelity run of the same candidates scores (told candidates x the search
  set's documents) and `ratio` = full / evaluated;
- `estimates`: rows whose fitness is an estimate, and `estimate_error` where the full score of
  the same recipe is known (a re-score or a full twin): n, the mean and largest |estimate - full|
  and the mean signed error (fitness units: higher is better).
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.run.ledger import Ledger


def stage_documents(ledger: Ledger, stage: str) -> dict[str, Any] | None:
    """The documents figure of a stage (None before its first search row)."""
    rows = ledger.doc_counts(stage)
    if not rows:
        return None
    n_full = max((docs or 0 for _, _, docs, estimate, status, _ in rows if not estimate and status == "ok"), default=0)
    n_full = n_full or max(docs or 0 for _, _, docs, _, _, _ in rows)  # no full row yet: the most any row has
    evaluated = told = 0
    full_fitness: dict[str, float] = {}
    for digest, fitness, docs, estimate, status, meta in rows:
        if "new_docs" in meta:
            evaluated += int(meta["new_docs"])
        elif "reused_from" not in meta:
            evaluated += int(docs or 0)
        if "rescore_of" not in meta:
            told += 1
        if not estimate and status == "ok" and math.isfinite(fitness):
            full_fitness.setdefault(digest, fitness)
    errors = [fitness - full_fitness[digest] for digest, fitness, _, estimate, status, _ in rows if estimate and status == "ok" and digest in full_fitness]
    full = told * n_full
    return {
        "evaluated": evaluated,
        "full": full,
        "ratio": (full / evaluated) if evaluated else None,
        "estimates": sum(1 for r in rows if r[3]),
        "estimate_error": {
            "n": len(errors),
            "mean_abs": float(sum(abs(e) for e in errors) / len(errors)),
            "max_abs": float(max(abs(e) for e in errors)),
            "mean": float(sum(errors) / len(errors)),
        } if errors else None,
    }  # fmt: skip


def run_documents(figures: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The stages' figures summed: documents evaluated, what a full-fidelity run scores, ratio."""
    known = [f for f in figures if f]
    if not known:
        return None
    evaluated, full = sum(f["evaluated"] for f in known), sum(f["full"] for f in known)
    return {"evaluated": evaluated, "full": full, "ratio": (full / evaluated) if evaluated else None}


def documents_line(name: str, figure: dict[str, Any] | None) -> str | None:
    """`  ps documents 12,345 of 67,890 a full run scores (5.50x fewer), 40 estimates, error ...`"""
    if not figure:
        return None
    ratio = f" ({figure['ratio']:.2f}x fewer)" if figure.get("ratio") else ""
    text = f"  {name:<10} documents {figure['evaluated']:,} of {figure['full']:,} a full-fidelity run scores{ratio}"
    if figure["estimates"]:
        text += f", {figure['estimates']} estimates"
        error = figure.get("estimate_error")
        if error:
            text += f" (error where the full score is known: mean |d| {error['mean_abs']:.4f}, max {error['max_abs']:.4f}, n={error['n']})"
    return text
