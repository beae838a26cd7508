"""Train and score the zoo's small Llama models (plain torch, CPU-friendly, seeded).

Documents are ``prompt + answer + "\\n" + </s>`` at positions 0.. (no BOS, as lm-eval's
HFLM encodes by default). The loss covers the answer, its terminator and ``</s>`` (and the
prompt too when a phase asks for it). Scoring is teacher-forced exact match: every target
token must be the argmax given everything before it, which is exactly what lm-eval's
``acc`` computes for a ``loglikelihood`` task.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoo.skills import TERMINATOR
from evomerge.zoo.tasks import Doc, training_sampler
from evomerge.zoo.tokenizer import BOS, EOS, PAD, encode, vocab

IGNORE = -100


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a zoo Llama."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 64
    init_std: float = 0.02


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase: a data mixture and an AdamW schedule (linear warmup, cosine decay).

    `mixture` holds ``(skill, variant, weight)`` triples; `layer_lr` holds ``(regex, factor)``
    pairs that scale the learning rate of matching parameter names (first match wins).
    """

    mixture: tuple[tuple[str, str, float], ...]
    steps: int
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_on_prompt: bool = False
    layer_lr: tuple[tuple[str, float], ...] = field(default_factory=tuple)


def llama_config(spec: ModelSpec) -> LlamaConfig:
    ids = vocab()
    return LlamaConfig(
        vocab_size=len(ids),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=spec.init_std,
        tie_word_embeddings=False,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        attn_implementation="eager",
    )


def new_model(spec: ModelSpec, generator: torch.Generator) -> LlamaForCausalLM:
    """A freshly initialised model; every parameter is drawn from `generator`.

    transformers initialises from the global RNG; that draw is isolated with `fork_rng` and
    then overwritten, so the caller's global RNG state is untouched and irrelevant.
    """
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(llama_config(spec))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, spec.init_std, generator=generator)
    return model


# --- data ----------------------------------------------------------------------------
def draw_pairs(
    mixture: Sequence[tuple[str, str, float]], n: int, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs from a weighted mixture of skill variants."""
    weights = np.array([w for _, _, w in mixture], dtype=np.float64)
    choice = rng.choice(len(mixture), size=n, p=weights / weights.sum())
    streams = [training_sampler(skill, variant, rng) for skill, variant, _ in mixture]
    return [next(streams[int(i)]) for i in choice]


def encode_batch(
    pairs: Sequence[tuple[str, str]], *, loss_on_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (``-100`` where no loss) for training documents."""
    ids = vocab()
    rows, labels = [], []
    for prompt, answer in pairs:
        p, a = encode(prompt), encode(answer + TERMINATOR) + [ids[EOS]]
        rows.append(p + a)
        labels.append((p if loss_on_prompt else [IGNORE] * len(p)) + a)
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), ids[PAD], dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        x[i, : len(r)] = torch.tensor(r)
        y[i, : len(lab)] = torch.tensor(lab)
    return x, y


# --- training ------------------------------------------------------------------------
def _param_groups(
    model: torch.nn.Module, phase: PhaseSpec
) -> list[dict[str, object]]:
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        factor = next((f for pat, f in phase.layer_lr if re.search(pat, name)), 1.0)
        groups.setdefault(factor, []).append(param)
    return [{"params": ps, "lr": phase.lr * f, "base_factor": f} for f, ps in groups.items()]


def lr_at(step: int, phase: PhaseSpec) -> float:
    """Learning-rate multiplier (0..1] at `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < phase.warmup:
        return (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return phase.min_lr_ratio + (1.0 - phase.min_lr_ratio) * cosine


def train(
    model: LlamaForCausalLM,
    phase: PhaseSpec,
    rng: np.random.Generator,
    *,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Run one phase in place; returns the loss of every step."""
    pairs = draw_pairs(phase.mixture, phase.steps * phase.batch_size, rng)
    optimizer = torch.optim.AdamW(
        _param_groups(model, phase),
        lr=phase.lr,
        betas=(0.9, 0.98),
        weight_decay=phase.weight_decay,
        foreach=True,
    )
    model.train()
    losses = []
    for step in range(phase.steps):
        chunk = pairs[step * phase.batch_size : (step + 1) * phase.batch_size]
        x, y = encode_batch(chunk, loss_on_prompt=phase.loss_on_prompt)
        for group in optimizer.param_groups:
            group["lr"] = phase.lr * group["base_factor"] * lr_at(step, phase)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if phase.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), phase.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, phase.steps // 4) == 0:
            log(f"step {step + 1}/{phase.steps} loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return losses


# --- scoring -------------------------------------------------------------------------
@torch.no_grad()
def exact_match(
    model: torch.nn.Module, docs: Iterable[Doc], *, batch_size: int = 400
) -> list[int]:
    """1/0 per document: is every token of ``doc.target`` the greedy next token?"""
    ids = vocab()
    docs = list(docs)
    out: list[int] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        rows = [(encode(d.prompt), encode(d.target)) for d in chunk]
        width = max(len(p) + len(t) for p, t in rows)
        x = torch.full((len(rows), width), ids[PAD], dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            x[i, : len(p) + len(t)] = torch.tensor(p + t)
        pred = model(input_ids=x).logits.argmax(-1)
        for i, (p, t) in enumerate(rows):
            got = pred[i, len(p) - 1 : len(p) + len(t) - 1]
            out.append(int(torch.equal(got, x[i, len(p) : len(p) + len(t)])))
    model.train(was_training)
    return out


def accuracy(model: torch.nn.Module, docs: Iterable[Doc]) -> float:
    scores = exact_match(model, docs)
    return float(np.mean(scores)) if scores else 0.0
