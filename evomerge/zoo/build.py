"""Train a preset's models into a directory and measure them (the contents of ``zoo.json``).

Called by :func:`evomerge.zoo.build_zoo`, which owns caching and atomicity; these
functions just fill the directory they are given. Every random draw comes from a
generator seeded by the preset's spec, so two builds give identical tensors.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import multiprocessing as mp
import os
import queue
import resource
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from evomerge.merge.hfconfig import complete_checkpoint
from evomerge.zoo import digits, lm
from evomerge.zoo.presets import DigitsPreset, LMPreset
from evomerge.zoo.tasks import eval_docs
from evomerge.zoo.tokenizer import build_tokenizer

Progress = Callable[[str], None]
StateDict = dict[str, torch.Tensor]


def save_lm(model: LlamaForCausalLM, directory: Path) -> Path:
    """A Hugging Face checkpoint (config.json, model.safetensors) with the zoo tokenizer beside it.

    The weights are written with safetensors directly (what `save_pretrained` would write for
    an untied model, without its progress bar).
    """
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save_pretrained(directory)
    complete_checkpoint(directory)  # config.save_pretrained alone names no architectures and no dtype
    return directory


def task_arithmetic(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                    weights: Sequence[float]) -> StateDict:
    """``base + sum_i w_i * (expert_i - base)`` on every tensor (plain task arithmetic)."""
    out: StateDict = {}
    for name, b in base.items():
        delta = sum(w * (e[name] - b) for e, w in zip(experts, weights, strict=True))
        out[name] = b + delta
    return out


def holdout_accuracy(model: torch.nn.Module, skills: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy on each skill's holdout documents (the lm-eval `acc`)."""
    return {s: round(lm.accuracy(model, eval_docs(s)["holdout"]), 4) for s in skills}


def _state(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous setting.

    The zoo's matrices are too small to gain from intra-op threads, and on a busy machine
    OpenMP workers waiting on each other made two threads several times slower than one.
    One thread also fixes the order of floating-point reductions, so a build gives the
    same tensors on machines with different core counts.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_lm(preset: LMPreset, out: Path, progress: Progress, *, parallel: bool = True) -> dict[str, Any]:
    """Train the base and the experts into ``out/<name>/``; returns the manifest's measured part.

    Each expert's drift phase trains a copy of the model as its skill phase left it, and the
    next expert's skill phase follows the skill phase, not the drift (the model's leftover
    gradients, which gradient clipping counts, are the skill phase's). So
    the drift phases, like saving and scoring, feed no later training, and with `parallel`
    (where this process can fork: a POSIX system, no other thread running) they run in forked
    processes beside it, as do making the batches and the task-arithmetic figures. A forked
    child starts as an exact copy of this process and computes bit for bit what this process
    would have: ``parallel=False`` gives the same tensors and figures, one step after another.
    """
    with single_thread(), _Workers(parallel and can_fork()) as workers:
        return _build_lm(preset, out, progress, workers)


def can_fork() -> bool:
    """Whether the build may fork: a POSIX system and no other thread in this process (a fork
    copies only the calling thread, and a lock held by another thread would stay held), except
    tqdm's monitor (a progress bar, e.g. of a model load, leaves it sleeping in the background)."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name != "tqdm_monitor"]
    return "fork" in mp.get_all_start_methods() and not others


def _build_lm(preset: LMPreset, out: Path, progress: Progress, workers: _Workers) -> dict[str, Any]:
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    plan: list[tuple[lm.PhaseSpec, np.random.Generator]] = [(preset.base, np.random.default_rng(preset.base_seed))]
    for expert in preset.experts:
        rng = np.random.default_rng(expert.seed)  # the drift phase continues the skill phase's stream
        plan += [(expert.phase, rng)] + ([(expert.drift, rng)] if expert.drift is not None else [])
    feed = workers.feed(plan)
    model = lm.new_model(preset.model, torch.Generator().manual_seed(preset.init_seed))
    progress(f"base: pre-training {preset.base.steps} steps")
    lm.train(model, preset.base, feed.next_phase(), log=lambda m: progress(f"  base {m}"))
    base = _state(model)
    states: dict[str, StateDict] = {"base": base}
    models: dict[str, dict[str, Any]] = {}
    jobs = {"base": workers.start(_finish, model, out, "base", preset.eval_skills)}
    upstream: StateDict = {}  # the own layers of the experts trained so far
    for expert in preset.experts:
        _collect(jobs, models, states, progress, wait=False)
        model.load_state_dict(base)
        progress(f"{expert.name}: fine-tuning on {expert.skill}, {expert.phase.steps} steps")
        batches = list(feed.next_phase())
        lm.train(model, expert.phase, batches, log=lambda m, n=expert.name: progress(f"  {n} {m}"),
                 upstream=dict(upstream), references=workers.references(model, expert.phase, batches, upstream))
        upstream.update({k: v.detach().clone() for k, v in model.named_parameters()
                         if lm.layer_index(k) in expert.own_layers})
        drift = None if expert.drift is None else (expert.drift, list(feed.next_phase()))
        jobs[expert.name] = workers.start(_finish, model, out, expert.name, preset.eval_skills, drift)
    feed.stop()
    trained: list[float] = []

    def wait(names: list[str]) -> None:
        _collect(jobs, models, states, progress, ["base", *names])
        if not jobs:  # every model trained, saved and scored
            trained[:] = [time.perf_counter() - t0, _cpu_seconds() - cpu0]

    merges = task_arithmetic_figures(model, states, preset, progress, workers=workers, wait=wait)
    models = {name: models[name] for name in preset.model_names()}
    for name, expert in zip(preset.model_names(), (None, *preset.experts), strict=True):
        models[name] = {"path": name, "skill": None if expert is None else expert.skill, **models[name]}
    model.load_state_dict(base)
    return {
        "models": models,
        "task_arithmetic": merges,
        "train_seconds": round(trained[0], 1),
        "train_cpu_seconds": round(trained[1], 1),
    }


def _finish(
    model: LlamaForCausalLM, out: Path, name: str, skills: Sequence[str],
    drift: tuple[lm.PhaseSpec, list[lm.Batch]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], list[str]]:
    """A model's last steps: its drift phase (if any), saving, scoring. Returns its final
    tensors (as arrays: they come back through a pipe), its holdout accuracy and the
    progress lines it would have printed.

    The drift phase trains a copy of `model`, gradients included (gradient clipping counts
    the gradients that frozen parameters kept from earlier phases), and leaves `model` as
    the skill phase left it: the next expert's skill phase follows that, forked or not.
    """
    lines = []
    if drift is not None:
        phase, batches = drift
        model = _copy_with_grads(model)
        lines.append(f"{name}: drift phase, {phase.steps} steps")
        lm.train(model, phase, batches, log=lambda m: lines.append(f"  {name} drift {m}"))
    save_lm(model, out / name)
    acc = holdout_accuracy(model, skills)
    lines.append(f"{name}: holdout accuracy {acc}")
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, acc, lines


def _copy_with_grads(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A deep copy of `model` whose parameters also hold copies of its gradients."""
    twin = copy.deepcopy(model)
    for mine, theirs in zip(twin.parameters(), model.parameters(), strict=True):
        mine.grad = None if theirs.grad is None else theirs.grad.detach().clone()
    return twin


def _collect(
    jobs: dict[str, _Job], models: dict[str, dict[str, Any]], states: dict[str, StateDict], progress: Progress,
    names: Iterable[str] | None = None, *, wait: bool = True,
) -> None:
    """Take in the results of the `_finish` jobs of `names` (all; with ``wait=False`` only
    those already done): accuracies into `models`, final tensors into `states`."""
    for name in list(jobs if names is None else names):
        if name not in jobs or not (wait or jobs[name].done()):
            continue
        arrays, acc, lines = jobs.pop(name).result()
        for line in lines:
            progress(line)
        models[name] = {"holdout_accuracy": acc}
        if name != "base":  # the base's tensors are the main process's `base`
            states[name] = {k: torch.from_numpy(v) for k, v in arrays.items()}


def task_arithmetic_figures(
    model: torch.nn.Module, states: Mapping[str, StateDict], preset: LMPreset, progress: Progress,
    *, workers: _Workers | None = None, wait: Callable[[list[str]], None] | None = None,
) -> list[dict[str, Any]]:
    """Holdout accuracy of plain task arithmetic for every pair of experts and all of them.

    With `workers` and `wait` (which makes the named experts' final tensors appear in
    `states`): the merges without the last expert are scored while it is still finishing,
    the rest half here, half in a forked process.
    """
    names = [e.name for e in preset.experts]
    skill_of = {e.name: e.skill for e in preset.experts}
    groups = [list(p) for p in itertools.combinations(names, 2)]
    if len(names) > 2:
        groups.append(names)
    todo = [(g, lam) for g, lam in itertools.product(groups, preset.ta_lambdas)]
    wait = wait or (lambda _names: None)
    early = [i for i, (g, _) in enumerate(todo) if names[-1] not in g]
    wait(names[:-1])
    rows = {i: _ta_row(model, states, *todo[i], skill_of) for i in early}
    wait(names)
    rest = [i for i in range(len(todo)) if i not in rows]
    half = rest[: len(rest) // 2] if workers is not None else []
    job = workers.start(_ta_rows, model, states, [todo[i] for i in half], skill_of) if half else None
    rows.update({i: _ta_row(model, states, *todo[i], skill_of) for i in rest[len(half):]})
    if job is not None:
        rows.update(zip(half, job.result(), strict=True))
    out = [rows[i] for i in range(len(todo))]
    for row in out:
        progress(f"task arithmetic {'+'.join(row['models'])} lambda={row['lambda']}: {row['holdout_accuracy']}")
    return out


def _ta_row(
    model: torch.nn.Module, states: Mapping[str, StateDict], group: list[str], lam: float, skill_of: Mapping[str, str]
) -> dict[str, Any]:
    merged = task_arithmetic(states["base"], [states[n] for n in group], [lam] * len(group))
    model.load_state_dict(merged)
    acc = holdout_accuracy(model, [skill_of[n] for n in group])
    return {"models": group, "lambda": lam, "holdout_accuracy": acc, "mean": round(float(np.mean(list(acc.values()))), 4)}


def _ta_rows(
    model: torch.nn.Module, states: Mapping[str, StateDict], todo: list[tuple[list[str], float]],
    skill_of: Mapping[str, str],
) -> list[dict[str, Any]]:
    return [_ta_row(model, states, group, lam, skill_of) for group, lam in todo]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# ---- forked workers ---------------------------------------------------------------------------


class _Job:
    """``fn(*args)`` run in a forked child (or, without fork, right here); :meth:`result` gives
    what it returned. A forked child sees this process's memory as it was at the fork."""

    def __init__(self, fork: bool, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._proc: Any = None
        if not fork:
            self._value = fn(*args)
            return
        ctx = mp.get_context("fork")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
        self._proc.start()
        send.close()  # the child holds the only write end: its death reads as EOF

    def done(self) -> bool:
        return self._proc is None or self._recv.poll()

    def result(self) -> Any:
        if self._proc is None:
            return self._value
        try:
            ok, value = self._recv.recv()
        except EOFError:
            value, ok = None, None
        self._proc.join()
        self._recv.close()
        if ok is None:
            raise RuntimeError(f"zoo build: a worker process died (exit code {self._proc.exitcode}); "
                               "build again, or look at the memory left on this machine")
        if not ok:
            raise RuntimeError(f"zoo build: a worker process failed:\n{value}")
        return value

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
        if self._proc is not None:
            self._proc.join()


def _child(send: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # Behind the training on the CPU: what the main process waits for next runs at its own
    # priority (it streams), a job's result is only needed later.
    with contextlib.suppress(OSError):
        os.nice(5)
    try:
        message = (True, fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        message = (False, traceback.format_exc())
    send.send(message)
    send.close()


class _Stream:
    """The items that ``make()`` yields, made in a forked child ahead of their use and sent
    over one by one (``pack`` there, ``unpack`` here). With `ahead` the child makes them all
    as fast as it can (a queue buffers them: for what is small); without, it stays about one
    item ahead (a pipe)."""

    def __init__(self, make: Callable[[], Iterable[Any]], pack: Callable[[Any], Any], unpack: Callable[[Any], Any],
                 *, ahead: bool) -> None:
        ctx = mp.get_context("fork")
        self._unpack = unpack
        self._queue: Any = ctx.Queue() if ahead else None
        if self._queue is None:
            self._recv, channel = ctx.Pipe(duplex=False)
        else:
            channel = self._queue
        self._proc = ctx.Process(target=_stream_child, args=(channel, make, pack), daemon=True)
        self._proc.start()
        if self._queue is None:
            channel.close()  # the child holds the only write end: its death reads as EOF

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        kind, value = self._get()
        if kind == "item":
            return self._unpack(value)
        if kind == "end":
            raise StopIteration
        raise RuntimeError(f"zoo build: a worker process failed:\n{value}")

    def _get(self) -> tuple[str, Any]:
        if self._queue is None:
            try:
                return self._recv.recv()
            except EOFError:
                pass
        else:
            while True:
                try:
                    return self._queue.get(timeout=2.0)
                except queue.Empty:
                    if not self._proc.is_alive() and self._queue.empty():
                        break
        self._proc.join()
        raise RuntimeError(f"zoo build: a worker process died (exit code {self._proc.exitcode}); "
                           "build again, or look at the memory left on this machine")

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()
        if self._queue is None:
            self._recv.close()
        else:
            self._queue.close()
            self._queue.cancel_join_thread()


def _stream_child(channel: Any, make: Callable[[], Iterable[Any]], pack: Callable[[Any], Any]) -> None:
    put = channel.put if hasattr(channel, "put") else channel.send
    try:
        for item in make():
            put(("item", pack(item)))
        put(("end", None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        put(("error", traceback.format_exc()))


class _Feed:
    """The batches of a build's phases, in order: made by a forked child, all of them as fast
    as it can (they depend only on the phases and their seeded generators), or here when
    they are asked for."""

    def __init__(self, plan: list[tuple[lm.PhaseSpec, np.random.Generator]], fork: bool) -> None:
        self._plan = list(plan)
        self._next = 0
        self._stream = _Stream(lambda: _all_batches(self._plan), _pack, _unpack, ahead=True) if fork else None

    def next_phase(self) -> Iterator[lm.Batch]:
        """The batches of the next phase of the plan (consume them all before the next call)."""
        phase, rng = self._plan[self._next]
        self._next += 1
        if self._stream is None:
            return lm.phase_batches(phase, rng)
        return itertools.islice(self._stream, phase.steps)

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()


def _all_batches(plan: list[tuple[lm.PhaseSpec, np.random.Generator]]) -> Iterator[lm.Batch]:
    for phase, rng in plan:
        yield from lm.phase_batches(phase, rng)


Packed = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]


def _pack(batch: lm.Batch) -> Packed:
    """A batch as small arrays (token ids < 2^15, labels >= -100) for the pipe."""
    held = None if batch.held is None else batch.held.numpy().astype(np.int16)
    return batch.x.numpy().astype(np.int16), batch.y.numpy().astype(np.int16), batch.rows.numpy(), held


def _unpack(packed: Packed) -> lm.Batch:
    x, y, rows, held = packed
    return lm.Batch(torch.from_numpy(x).long(), torch.from_numpy(y).long(), torch.from_numpy(rows),
                    None if held is None else torch.from_numpy(held).long())


def _pack_reference(ref: lm.Reference | None) -> Any:
    if ref is None:
        return None
    return [h.numpy() for h in ref.hidden], None if ref.logits is None else ref.logits.numpy()


def _unpack_reference(packed: Any) -> lm.Reference | None:
    """Back to tensors in memory of torch's own (aligned as the reference's outputs were)."""
    if packed is None:
        return None
    hidden, logits = packed

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).clone()

    return lm.Reference(tuple(tensor(h) for h in hidden), None if logits is None else tensor(logits))


class _Workers:
    """The forked children of a build (none without `fork`); those still running when the
    build fails are terminated."""

    def __init__(self, fork: bool) -> None:
        self.fork = fork
        self._started: list[_Job | _Feed | _Stream] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(self.fork, fn, args)
        self._started.append(job)
        return job

    def feed(self, plan: list[tuple[lm.PhaseSpec, np.random.Generator]]) -> _Feed:
        feed = _Feed(plan, self.fork)
        self._started.append(feed)
        return feed

    def references(
        self, model: torch.nn.Module, phase: lm.PhaseSpec, batches: list[lm.Batch], upstream: StateDict
    ) -> _Stream | None:
        """The reference outputs of a phase that distils, made by a forked child while the
        phase trains (None: no such phase, or no fork; the training makes them itself)."""
        if not self.fork or phase.preserve <= 0:
            return None
        stream = _Stream(lambda: lm.reference_outputs(model, phase, batches, upstream or None),
                         _pack_reference, _unpack_reference, ahead=False)
        self._started.append(stream)
        return stream

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self._started:
            worker.stop()


def build_digits(preset: DigitsPreset, out: Path, progress: Progress) -> dict[str, Any]:
    """Train each digits expert into ``out/<name>/``; returns the manifest's measured part."""
    with single_thread():
        return _build_digits(preset, out, progress)


def _build_digits(preset: DigitsPreset, out: Path, progress: Progress) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for i, (name, classes) in enumerate(preset.experts):
        progress(f"{name}: training on digits {list(classes)}")
        model = digits.train_expert(classes, preset.seed + 100 * i, preset.train)
        model.save_pretrained(out / name)
        models[name] = {
            "path": name,
            "classes": list(classes),
            "test_accuracy": round(digits.accuracy(model, "test"), 4),
            "test_accuracy_own_classes": round(digits.accuracy(model, "test", classes), 4),
        }
        progress(f"{name}: test accuracy {models[name]['test_accuracy']}")
    return {"models": models}
