"""Run a plan's tasks on a few threads and hand the results out in plan order.

Shared by both executors (`evomerge.merge.engine` with torch, `evomerge.merge.fast` with
numpy). Results come out in plan order, with at most ``2 * workers`` ordinary tasks merged
ahead of the consumer. The few *large* tasks (the embeddings and the head, each ~20% of a
small model's elements) are started first instead: in plan order the head comes last and would
run on one core while the others wait, and the embeddings, first, would hold the consumer while
the lookahead runs dry. Their results wait for their turn, which costs their size in memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

LARGE_FACTOR = 8  # a task is large when it has at least this many times the median task's elements


def large_tasks(sizes: Sequence[int]) -> set[int]:
    """Indices of the tasks with at least LARGE_FACTOR x the median size (none for < 4 tasks)."""
    if len(sizes) < 4:
        return set()
    median = sorted(sizes)[len(sizes) // 2]
    return {i for i, size in enumerate(sizes) if size >= LARGE_FACTOR * max(median, 1)}


def ordered_parallel(
    tasks: Sequence[T], run: Callable[[T], R], sizes: Sequence[int], workers: int, *, prefix: str = "evomerge-merge"
) -> Iterator[tuple[T, R]]:
    """Yield ``(task, run(task))`` in the order of ``tasks``, computed by ``workers`` threads.

    Closing the iterator early cancels what has not started and waits for what has.
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield task, run(task)
        return
    large = large_tasks(sizes)
    futures: dict[int, Future] = {}
    ordinary = deque(i for i in range(len(tasks)) if i not in large)
    executor = ThreadPoolExecutor(workers, thread_name_prefix=prefix)
    try:
        for i in sorted(large, key=lambda i: -sizes[i]):
            futures[i] = executor.submit(run, tasks[i])

        def top_up(position: int) -> None:
            """Keep 2 * workers ordinary tasks at or after ``position`` in flight."""
            ahead = sum(1 for j in futures if j >= position and j not in large)
            while ordinary and ahead < 2 * workers:
                j = ordinary.popleft()
                futures[j] = executor.submit(run, tasks[j])
                ahead += 1

        for position, task in enumerate(tasks):
            top_up(position)
            if position not in futures:  # not reached by the lookahead (cannot happen; be safe)
                futures[position] = executor.submit(run, task)
            result = futures.pop(position).result()
            yield task, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
