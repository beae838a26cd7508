"""A run's trackers, each fed from a thread of its own, off the scheduler's path.

The driver opens a session when a run executes (`open_tracking`) and hooks it to the ledger:
after each row is written, `observe` puts the row on each tracker's queue (no other work on the
scheduler's thread). A tracker's thread starts it, logs the experiment's parameters once, turns
each row into metrics (`evomerge.tracking.metrics`) and logs them; at the end the driver hands
over the best's recipe and model card (`finish`) and `close` waits for the queues to drain (at
most `CLOSE_TIMEOUT_S`). Opening a session waits until every tracker has started (at most
`START_WAIT_S`): importing MLflow or W&B and creating MLflow's database take seconds of CPU,
which would otherwise share the interpreter with the first evaluations of in-process workers. One thread per tracker: a slow one (MLflow creating its database, W&B
starting its service) holds up no other. A tracker that raises is turned off for the rest of the
run with one warning line; the search never sees it.
"""

from __future__ import annotations

import copy
import json
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeWarning
from evomerge.fsutil import atomic_write_text
from evomerge.tracking.base import TrackedRun, Tracker
from evomerge.tracking.metrics import RowMetrics

CLOSE_TIMEOUT_S = 120.0
START_WAIT_S = 60.0
STATE_FILE = "state.json"
_END = object()


class TrackingSession:
    """See the module docstring. `trackers`: (name, tracker) in the order of `tracking:`."""

    def __init__(self, trackers: list[tuple[str, Tracker]], run: TrackedRun, params: dict[str, str], metrics: RowMetrics) -> None:
        self._run = run
        self._state = _read_state(run.tracking_dir) if trackers else {}
        self._lock = threading.Lock()
        self._status = "killed"
        self._workers = [_Worker(name, tracker, self, params, copy.deepcopy(metrics)) for name, tracker in trackers]
        deadline = time.monotonic() + START_WAIT_S
        for worker in self._workers:
            worker.ready.wait(max(0.0, deadline - time.monotonic()))

    @property
    def active(self) -> bool:
        return bool(self._workers)

    def observe(self, row: Any) -> None:
        """The ledger's hook: called after a row is written."""
        for worker in self._workers:
            worker.queue.put(("row", row))

    def finish(self, artifacts: Callable[[], dict[str, str]] | None) -> None:
        """The run ended: `artifacts()` gives the files to log (made once, on the first tracker
        thread that asks: it hashes the sources)."""
        self._status = "finished"
        if artifacts is not None:
            made = _Once(artifacts)
            for worker in self._workers:
                worker.queue.put(("artifacts", made))

    def close(self) -> None:
        """Log what is queued and close the trackers: "finished" after `finish`, else "killed"
        (Ctrl-C, or the run stopped) or "failed" (called while an exception propagates)."""
        if not self._workers:
            return
        if self._status != "finished":
            error = sys.exc_info()[0]
            self._status = "killed" if error is None or issubclass(error, KeyboardInterrupt) else "failed"
        for worker in self._workers:
            worker.queue.put(_END)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        late = [worker.name for worker in self._workers if worker.thread.is_alive()]
        if late:
            _warn(f"tracking: {', '.join(late)} did not finish logging within {CLOSE_TIMEOUT_S:.0f} s; the run ends without waiting")
        self._workers = []

    def _keep(self, name: str, state: dict[str, Any]) -> None:
        """What a tracker's `start` returned, kept in `<run>/tracking/state.json`."""
        with self._lock:
            self._state[name] = state
            self._run.tracking_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._run.tracking_dir / STATE_FILE, json.dumps(self._state, indent=2, sort_keys=True) + "\n")


class _Worker:
    """One tracker and its thread."""

    def __init__(self, name: str, tracker: Tracker, session: TrackingSession, params: dict[str, str], metrics: RowMetrics) -> None:
        self.name = name
        self.tracker: Tracker | None = tracker
        self.session = session
        self.params = params
        self.metrics = metrics
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ready = threading.Event()  # started and parameters logged (or failed)
        self.thread = threading.Thread(target=self._work, name=f"evomerge-tracking-{name}", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            state = self._call("start", dict(self.session._state.get(self.name) or {}))
            if state is not None:
                self._call_plain(lambda: self.session._keep(self.name, state))
            self._call("log_params", self.params)
        finally:
            self.ready.set()
        while True:
            item = self.queue.get()
            if item is _END:
                break
            kind, payload = item
            if kind == "row":
                metrics = self.metrics(payload)  # kept up to date even once the tracker is off
                self._call("log_metrics", metrics, payload.seq)
            else:
                for file, text in (self._call_plain(payload) or {}).items():
                    self._call("log_artifact", file, text)
        self._call("close", self.session._status)

    def _call(self, method: str, *args: Any) -> Any:
        if self.tracker is None:
            return None
        return self._call_plain(getattr(self.tracker, method), *args)

    def _call_plain(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # a tracker must never stop the search: it is turned off instead
            if self.tracker is not None:
                _warn(f"tracking: {self.name} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); it is off for the rest of the run")
            self.tracker = None
            return None


class _Once:
    """A function called at most once, from any thread; every caller gets its result (or its
    exception)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> Any:
        with self.lock:
            if not self.done:
                try:
                    self.value = self.fn()
                except Exception as exc:
                    self.error = exc
                self.done = True
        if self.error is not None:
            raise self.error
        return self.value


def _warn(message: str) -> None:
    warnings.warn(message, EvomergeWarning, stacklevel=2)


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
