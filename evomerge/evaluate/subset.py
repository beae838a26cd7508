"""Which documents of a split a candidate is scored on: limits, seeded subsamples, shards.

The scheduler passes a :class:`Subset` with every search evaluation. It is a value object,
two integers, so it crosses Ray and the ledger as it is:

- ``seed`` is the experiment seed; ``generation`` the optimizer generation of the candidate.
- An evaluator with ``subsample: {size: N, per_generation: true}`` scores every candidate of
  a generation on the same N documents, drawn from ``(seed, generation, task)``; the next
  generation draws a fresh N (the 200-example mini-batches of Sakana's DFS run). With
  ``per_generation: false`` the N documents are drawn from ``(seed, task)`` once and stay the
  same for the whole run. Without a subset the evaluator uses ``Subset(seed=its own seed,
  generation=0)``.
- ``limit: N`` instead takes the first N documents of the split (lm-eval's ``--limit``).
- ``positions`` (set by a fidelity strategy, `evomerge.fidelity`) keeps only these positions of
  each task's selection above (per task; a task it does not name scores no document), so a
  candidate can be scored on a few documents and later on more, never on one twice.

Selections are sorted by document index, so a subset is scored in split order, and the
same (seed, generation) gives the same documents in any process.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Subset:
    """The seed and generation a search evaluation draws its documents from."""

    seed: int = 0
    generation: int = 0
    positions: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    def picked(self, key: str) -> tuple[int, ...] | None:
        """The positions kept of task `key` (None: every document of the selection)."""
        if self.positions is None:
            return None
        return dict(self.positions).get(key, ())


def select(
    n_docs: int,
    *,
    key: str,
    limit: int | None = None,
    size: int | None = None,
    per_generation: bool = True,
    subset: Subset | None = None,
) -> np.ndarray:
    """Indices (sorted) of the documents to score out of `n_docs`.

    `key` names the task, so tasks of one evaluator draw independent subsets. `limit` keeps the
    first documents; `size` draws a seeded sample (after `limit`, if both are set).
    """
    idx = np.arange(n_docs if limit is None else min(limit, n_docs))
    chosen = _sample(idx, key=key, size=size, per_generation=per_generation, subset=subset)
    picked = subset.picked(key) if subset is not None else None
    return chosen if picked is None else chosen[np.asarray(picked, dtype=np.int64)]


def _sample(idx: np.ndarray, *, key: str, size: int | None, per_generation: bool, subset: Subset | None) -> np.ndarray:
    if size is None or size >= len(idx):
        return idx
    subset = subset or Subset()
    words = [subset.seed & 0xFFFFFFFF, zlib.crc32(key.encode())]
    if per_generation:
        words.append(subset.generation & 0xFFFFFFFF)
    rng = np.random.default_rng(words)
    return np.sort(rng.choice(idx, size=size, replace=False))


def shard_slice(n_items: int, shard: tuple[int, int] | None) -> slice:
    """Contiguous block `i` of `n` (sizes differ by at most one); the whole range for None.

    Contiguous blocks keep concatenation in shard order equal to the unsharded order, which is
    what `EvalResult.combine` relies on.
    """
    if shard is None:
        return slice(0, n_items)
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    base, extra = divmod(n_items, n)
    start = i * base + min(i, extra)
    return slice(start, start + base + (1 if i < extra else 0))
