"""Train a preset's models into a directory and measure them (the contents of ``zoo.json``).

Called by :func:`evomerge.zoo.build_zoo`, which owns caching and atomicity; these
functions just fill the directory they are given. Every random draw comes from a
generator seeded by the preset's spec, so two builds give identical tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

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


def build_lm(preset: LMPreset, out: Path, progress: Progress) -> dict[str, Any]:
    """Train the base and the experts into ``out/<name>/``; returns the manifest's measured part."""
    with single_thread():
        return _build_lm(preset, out, progress)


def _build_lm(preset: LMPreset, out: Path, progress: Progress) -> dict[str, Any]:
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    model = lm.new_model(preset.model, torch.Generator().manual_seed(preset.init_seed))
    progress(f"base: pre-training {preset.base.steps} steps")
    lm.train(model, preset.base, np.random.default_rng(preset.base_seed), log=lambda m: progress(f"  base {m}"))
    base = _state(model)
    save_lm(model, out / "base")
    states: dict[str, StateDict] = {"base": base}
    models: dict[str, dict[str, Any]] = {
        "base": {"path": "base", "skill": None, "holdout_accuracy": holdout_accuracy(model, preset.eval_skills)}
    }
    progress(f"base: holdout accuracy {models['base']['holdout_accuracy']}")
    upstream: StateDict = {}  # the own layers of the experts trained so far
    for expert in preset.experts:
        model.load_state_dict(base)
        progress(f"{expert.name}: fine-tuning on {expert.skill}, {expert.phase.steps} steps")
        rng = np.random.default_rng(expert.seed)
        lm.train(model, expert.phase, rng, log=lambda m, n=expert.name: progress(f"  {n} {m}"),
                 upstream=dict(upstream))
        upstream.update({k: v.detach().clone() for k, v in model.named_parameters()
                         if lm.layer_index(k) in expert.own_layers})
        if expert.drift is not None:
            progress(f"{expert.name}: drift phase, {expert.drift.steps} steps")
            lm.train(model, expert.drift, rng, log=lambda m, n=expert.name: progress(f"  {n} drift {m}"))
        states[expert.name] = _state(model)
        save_lm(model, out / expert.name)
        acc = holdout_accuracy(model, preset.eval_skills)
        models[expert.name] = {"path": expert.name, "skill": expert.skill, "holdout_accuracy": acc}
        progress(f"{expert.name}: holdout accuracy {acc}")
    train_seconds = time.perf_counter() - t0
    train_cpu_seconds = time.process_time() - cpu0
    merges = task_arithmetic_figures(model, states, preset, progress)
    model.load_state_dict(base)
    return {
        "models": models,
        "task_arithmetic": merges,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
    }


def task_arithmetic_figures(
    model: torch.nn.Module, states: Mapping[str, StateDict], preset: LMPreset, progress: Progress
) -> list[dict[str, Any]]:
    """Holdout accuracy of plain task arithmetic for every pair of experts and all of them."""
    names = [e.name for e in preset.experts]
    skill_of = {e.name: e.skill for e in preset.experts}
    groups = [list(p) for p in itertools.combinations(names, 2)]
    if len(names) > 2:
        groups.append(names)
    rows = []
    for group, lam in itertools.product(groups, preset.ta_lambdas):
        merged = task_arithmetic(states["base"], [states[n] for n in group], [lam] * len(group))
        model.load_state_dict(merged)
        acc = holdout_accuracy(model, [skill_of[n] for n in group])
        rows.append({
            "models": group,
            "lambda": lam,
            "holdout_accuracy": acc,
            "mean": round(float(np.mean(list(acc.values()))), 4),
        })
        progress(f"task arithmetic {'+'.join(group)} lambda={lam}: {acc}")
    return rows


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
