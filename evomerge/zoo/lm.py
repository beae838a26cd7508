"""Train and score the zoo's small Llama models (plain torch, CPU-friendly, seeded).

Documents are ``prompt + answer + "\\n" + </s>`` at positions 0.. (no BOS, as lm-eval's
HFLM encodes by default). The loss covers the answer, its terminator and ``</s>`` (and the
prompt too when a phase asks for it). Scoring is teacher-forced exact match: every target
token must be the argmax given everything before it, which is exactly what lm-eval's
``acc`` computes for a ``loglikelihood`` task.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

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
    pairs that scale the learning rate of matching parameter names (first match wins; a factor
    of 0 freezes the parameter for the phase).

    `preserve` > 0 adds a feature-distillation term on the documents of `preserve_skills`: the
    relative squared distance between the model's hidden states (every layer's output, every
    position) and those of the model as the phase found it, times `preserve`. An expert trained
    with it changes its layers in a way the other skills' prompts do not see, which is what
    makes layer-wise composites of experts work.

    `preserve_docs` > 0 takes the distillation off the replayed rows and onto a separate batch
    of that many documents per step of the `preserve_skills`' real (``true``) variant, which
    the phase does not train on (no cross-entropy): the prompts and answers the merged model
    is scored on, rather than the replay's random or easy ones.

    `preserve_logits` > 0 (with `preserve_docs`) adds, times `preserve_logits`, the KL
    divergence of the next-token distributions from the reference's on those documents:
    what exact match reads, which small relative changes of the last hidden states can flip.

    `upstream_ce` in (0, 1] (with `preserve_docs` and upstream tensors, see :func:`train`):
    that fraction of each batch's rows takes its cross-entropy with the upstream tensors
    swapped in, so the skill also works on top of the earlier experts' layers, as it will
    in a merge (and still on the base's, from the other rows).
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
    preserve: float = 0.0
    preserve_skills: tuple[str, ...] = ()
    preserve_docs: int = 0
    preserve_logits: float = 0.0
    upstream_ce: float = 0.0


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
    return draw_tagged(mixture, n, rng)[0]


def draw_tagged(
    mixture: Sequence[tuple[str, str, float]], n: int, rng: np.random.Generator
) -> tuple[list[tuple[str, str]], list[str]]:
    """`n` (prompt, answer) pairs from a weighted mixture, and the skill each was drawn for."""
    weights = np.array([w for _, _, w in mixture], dtype=np.float64)
    choice = rng.choice(len(mixture), size=n, p=weights / weights.sum())
    streams = [training_sampler(skill, variant, rng) for skill, variant, _ in mixture]
    return [next(streams[int(i)]) for i in choice], [mixture[int(i)][0] for i in choice]


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
    """AdamW groups by learning-rate factor; parameters with factor 0 are left out (frozen)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        factor = next((f for pat, f in phase.layer_lr if re.search(pat, name)), 1.0)
        if factor > 0:
            groups.setdefault(factor, []).append(param)
    return [{"params": ps, "lr": phase.lr * f, "base_factor": f} for f, ps in groups.items()]


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@torch.no_grad()
def _swap(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy `tensors` into the model's parameters of those names; returns what they held."""
    params = dict(model.named_parameters())
    saved = {}
    for name, value in tensors.items():
        saved[name] = params[name].detach().clone()
        params[name].copy_(value)
    return saved


def _preservation_loss(
    hidden: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], rows: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of ``|h - h_ref|^2 / |h_ref|^2`` on the `rows` documents' real positions
    (`reference` holds the reference model's hidden states of those rows only)."""
    keep = mask[rows].unsqueeze(-1)
    terms = []
    for h, r in zip(hidden[1:], reference[1:], strict=True):
        h, r = h[rows] * keep, r * keep
        terms.append(((h - r) ** 2).sum() / (r**2).sum().clamp_min(1e-8))
    return torch.stack(terms).mean()


def lr_at(step: int, phase: PhaseSpec) -> float:
    """Learning-rate multiplier (0..1] at `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < phase.warmup:
        return (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return phase.min_lr_ratio + (1.0 - phase.min_lr_ratio) * cosine


class Batch(NamedTuple):
    """One training step's documents, encoded (see :func:`phase_batches`)."""

    x: torch.Tensor  # input ids, right-padded
    y: torch.Tensor  # labels, -100 where no loss
    rows: torch.Tensor  # bool per row of `x`: drawn for one of the phase's `preserve_skills`
    held: torch.Tensor | None  # the step's held-out documents (`preserve_docs`), or None


def phase_batches(phase: PhaseSpec, rng: np.random.Generator) -> Iterator[Batch]:
    """The batches of every step of `phase`, drawn from `rng`.

    Every draw happens here, before the first batch is handed out (the documents of all steps,
    then the held-out documents), so `rng` is left where the next phase continues from it;
    only the encoding is spread over the iteration. The batches depend on nothing but `phase`
    and `rng`, so they can be made ahead of the training (see :mod:`evomerge.zoo.build`).
    """
    pairs, tags = draw_tagged(phase.mixture, phase.steps * phase.batch_size, rng)
    held: list[tuple[str, str]] = []
    if phase.preserve > 0 and phase.preserve_docs > 0:
        real = tuple((s, "true", 1.0) for s in phase.preserve_skills)
        held = draw_pairs(real, phase.steps * phase.preserve_docs, rng)
    return _encoded(phase, pairs, tags, held)


def _encoded(
    phase: PhaseSpec, pairs: Sequence[tuple[str, str]], tags: Sequence[str], held: Sequence[tuple[str, str]]
) -> Iterator[Batch]:
    n, size = phase.preserve_docs, phase.batch_size
    for step in range(phase.steps):
        window = slice(step * size, (step + 1) * size)
        x, y = encode_batch(pairs[window], loss_on_prompt=phase.loss_on_prompt)
        rows = torch.tensor([t in phase.preserve_skills for t in tags[window]])
        px = encode_batch(held[step * n : (step + 1) * n])[0] if held else None
        yield Batch(x, y, rows, px)


def train(
    model: LlamaForCausalLM,
    phase: PhaseSpec,
    data: np.random.Generator | Iterable[Batch],
    *,
    log: Callable[[str], None] | None = None,
    upstream: Mapping[str, torch.Tensor] | None = None,
    references: Iterable[Reference | None] | None = None,
) -> list[float]:
    """Run one phase in place; returns the loss of every step.

    `data` is the random generator to draw the phase's documents from, or the batches
    :func:`phase_batches` made from it (the same training either way). `references` are
    the reference model's outputs of every step, as :func:`reference_outputs` gives them
    for this model, phase, batches and `upstream` (computed here, step by step, without).

    `upstream` (tensors by parameter name, of parameters the phase freezes) is swapped into the
    model and the reference for the preservation term: e.g. the layers of experts trained
    before this one, so that its layers leave the other skills' hidden states alone also where
    those experts have changed them (as they will have in a layer-wise merge).
    """
    batches = phase_batches(phase, data) if isinstance(data, np.random.Generator) else iter(data)
    held = phase.preserve > 0 and phase.preserve_docs > 0
    groups = _param_groups(model, phase)
    trainable = {id(p) for g in groups for p in g["params"]}  # type: ignore[attr-defined]
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    ref_of: Callable[[Batch], Reference | None] | None = None
    if phase.preserve > 0 and references is None:
        reference = reference_model(model, upstream)
        ref_of = lambda batch: reference_output(reference, phase, batch)  # noqa: E731
    elif phase.preserve > 0:
        given = iter(references or ())
        ref_of = lambda _batch: next(given)  # noqa: E731
    try:
        if held:
            assert ref_of is not None
            return _train_steps_held(model, phase, batches, groups, ref_of, log, upstream or None)
        return _train_steps(model, phase, batches, groups, ref_of, log, upstream or None)
    finally:
        for p in frozen:
            p.requires_grad_(True)


class Reference(NamedTuple):
    """The reference model's outputs on a step's distilled documents."""

    hidden: tuple[torch.Tensor, ...]  # every layer's hidden states, as `output_hidden_states`
    logits: torch.Tensor | None  # with `preserve_docs` (the held-out documents), else None


def reference_model(model: torch.nn.Module, upstream: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """The frozen copy of `model`, with `upstream` swapped in, that a phase distils towards."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    if upstream:
        _swap(reference, upstream)
    return reference


def reference_output(reference: torch.nn.Module, phase: PhaseSpec, batch: Batch) -> Reference | None:
    """`reference` on the documents a step of `phase` distils: the held-out documents, or
    the rows drawn for the `preserve_skills` (None when a batch has none)."""
    with torch.no_grad():
        if phase.preserve_docs > 0:
            out = reference(input_ids=batch.held, output_hidden_states=True)
            return Reference(out.hidden_states, out.logits)
        if not bool(batch.rows.any()):
            return None
        return Reference(reference(input_ids=batch.x[batch.rows], output_hidden_states=True).hidden_states, None)


def reference_outputs(
    model: torch.nn.Module, phase: PhaseSpec, batches: Iterable[Batch], upstream: Mapping[str, torch.Tensor] | None
) -> Iterator[Reference | None]:
    """The reference outputs of every step of `phase` (for :func:`train`'s `references`):
    they depend only on the model as the phase finds it, so they can be made beside it.
    The reference model is copied from `model` here, before the first one is asked for."""
    reference = reference_model(model, upstream)
    return (reference_output(reference, phase, batch) for batch in batches)


def _optimizer(groups: list[dict[str, object]], phase: PhaseSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, 0.98), weight_decay=phase.weight_decay, foreach=True)


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    phase: PhaseSpec,
    step: int,
    loss: torch.Tensor,
    losses: list[float],
    log: Callable[[str], None] | None,
) -> None:
    """The end of a training step, once its gradients are in: clip, update, record, log."""
    if phase.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), phase.grad_clip)
    optimizer.step()
    losses.append(loss.item())
    if log is not None and (step + 1) % max(1, phase.steps // 4) == 0:
        log(f"step {step + 1}/{phase.steps} loss {np.mean(losses[-20:]):.4f}")


def _train_steps(
    model: LlamaForCausalLM,
    phase: PhaseSpec,
    batches: Iterator[Batch],
    groups: list[dict[str, object]],
    ref_of: Callable[[Batch], Reference | None] | None,
    log: Callable[[str], None] | None,
    upstream: Mapping[str, torch.Tensor] | None = None,
) -> list[float]:
    pad = vocab()[PAD]
    optimizer = _optimizer(groups, phase)
    model.train()
    losses = []
    for step in range(phase.steps):
        batch = next(batches)
        x, y, rows, _ = batch
        for group in optimizer.param_groups:
            group["lr"] = phase.lr * group["base_factor"] * lr_at(step, phase)
        ref = None if ref_of is None else ref_of(batch)
        preserving = ref is not None
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=x, output_hidden_states=preserving and upstream is None)
        logits = out.logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        if preserving:
            assert ref is not None
            ref_hidden = ref.hidden
            if upstream is None:
                loss = loss + phase.preserve * _preservation_loss(out.hidden_states, ref_hidden, rows, x != pad)
            else:
                # CE on the model as it is; the preservation term with the upstream tensors in
                # (each backward runs before the weights it saw are swapped)
                loss.backward()
                saved = _swap(model, upstream)
                hidden = model(input_ids=x[rows], output_hidden_states=True).hidden_states
                kept = torch.ones(int(rows.sum()), dtype=torch.bool)
                term = phase.preserve * _preservation_loss(hidden, ref_hidden, kept, (x != pad)[rows])
                term.backward()
                _swap(model, saved)
                loss = loss.detach() + term.detach()
        if not (preserving and upstream is not None):
            loss.backward()
        _step(model, optimizer, phase, step, loss, losses, log)
    model.eval()
    return losses


def _stack(a: torch.Tensor, b: torch.Tensor, fill: int) -> torch.Tensor:
    """Rows of `a` then rows of `b`, right-padded with `fill` to a common width (causal
    attention: padding at the end leaves every earlier position as it was)."""
    width = max(a.shape[1], b.shape[1])
    out = torch.full((len(a) + len(b), width), fill, dtype=a.dtype)
    out[: len(a), : a.shape[1]] = a
    out[len(a) :, : b.shape[1]] = b
    return out


def _logit_divergence(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over `mask`ed positions of KL(reference || model) of the next-token distributions."""
    ref = F.log_softmax(reference, dim=-1)
    kl = (ref.exp() * (ref - F.log_softmax(logits, dim=-1))).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _held_pass(
    model: torch.nn.Module,
    phase: PhaseSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    px: torch.Tensor,
    ref: Reference,
    tokens: int,
) -> torch.Tensor:
    """Cross-entropy on rows `x` (summed, over `tokens` labelled tokens in the whole batch) plus
    the distillation terms on the held-out rows `px`, in one forward; returns the loss."""
    pad = vocab()[PAD]
    rows = _stack(x, px, pad)
    out = model(input_ids=rows, output_hidden_states=True)
    n = len(x)
    loss = out.logits.new_zeros(())
    if n:
        logits = out.logits[:n, : x.shape[1]]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                               reduction="sum") / tokens
    mask = px != pad
    hidden = [h[n:, : px.shape[1]] for h in out.hidden_states]
    everything = torch.ones(len(px), dtype=torch.bool)
    loss = loss + phase.preserve * _preservation_loss(hidden, ref.hidden, everything, mask)
    if phase.preserve_logits > 0:
        assert ref.logits is not None
        loss = loss + phase.preserve_logits * _logit_divergence(out.logits[n:, : px.shape[1]], ref.logits, mask)
    return loss


def _train_steps_held(
    model: LlamaForCausalLM,
    phase: PhaseSpec,
    batches: Iterator[Batch],
    groups: list[dict[str, object]],
    ref_of: Callable[[Batch], Reference | None],
    log: Callable[[str], None] | None,
    upstream: Mapping[str, torch.Tensor] | None,
) -> list[float]:
    """:func:`_train_steps` with the distillation on a separate batch of held-out skills' real
    documents (`phase.preserve_docs` per step); with `upstream`, that distillation and the
    cross-entropy of the last `phase.upstream_ce` fraction of each batch's rows run on the
    model with the upstream tensors in (one forward), the rest of the rows on the model as
    it is (another). Every backward runs before the weights it saw are swapped.
    """
    optimizer = _optimizer(groups, phase)
    model.train()
    losses = []
    split = phase.batch_size - round(phase.batch_size * phase.upstream_ce) if upstream else phase.batch_size
    for step in range(phase.steps):
        batch = next(batches)
        x, y, _, px = batch
        assert px is not None
        tokens = int((y[:, 1:] != IGNORE).sum())
        for group in optimizer.param_groups:
            group["lr"] = phase.lr * group["base_factor"] * lr_at(step, phase)
        optimizer.zero_grad(set_to_none=True)
        ref = ref_of(batch)
        assert ref is not None
        if upstream is None:
            loss = _held_pass(model, phase, x, y, px, ref, tokens)
            loss.backward()
        else:
            plain = torch.zeros(())
            if split > 0:
                logits = model(input_ids=x[:split]).logits
                plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                        y[:split, 1:].reshape(-1), reduction="sum") / tokens
                plain.backward()
            saved = _swap(model, upstream)
            term = _held_pass(model, phase, x[split:], y[split:], px, ref, tokens)
            term.backward()
            _swap(model, saved)
            loss = plain.detach() + term.detach()
        _step(model, optimizer, phase, step, loss, losses, log)
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
