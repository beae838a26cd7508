"""Batched loglikelihood of tokenized (context, continuation) requests on an in-memory causal LM.

This is the per-candidate hot loop of the lm_eval evaluator. It computes what lm-eval's HFLM
computes for a causal model (`_loglikelihood_tokens`): the input is ``(context +
continuation)[-(max_length + 1):][:-1]``, right-padded with 0 and run without an attention mask;
the answer of a request is ``(sum of the log-softmax of its continuation tokens, every
continuation token is the argmax)``. It differs only in how the work is arranged, which is
what makes it cheaper than HFLM per candidate:

- a :class:`BatchPlan` (unique inputs sorted longest first, padded batches, gather indices) is built
  once per set of requests and reused for every candidate;
- identical inputs are run once (HFLM does this only for one-token continuations);
- the log-softmax is taken only at the continuation positions, not over the whole sequence,
  and when the model's forward takes `logits_to_keep` (transformers' causal LMs do) the output
  head runs only at the positions some request scores (for a large vocabulary, the head over
  every position is a good part of a forward pass).

Values equal HFLM's up to float rounding from different batch shapes (acc/greedy flags match
exactly except on exact logit ties). Token log-probabilities are summed in float64; HFLM sums
in the model's dtype, so for a bf16 model the log-likelihoods agree to bf16 precision only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TokenRequest = tuple[list[int], list[int]]


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T] right-padded with 0
    rows: torch.Tensor  # [K] row of each scored position
    positions: torch.Tensor  # [K] logit position of each scored token
    keep: torch.Tensor  # [P] sorted positions any row scores (for `logits_to_keep`)
    kept_positions: torch.Tensor  # [K] index of each scored position within `keep`
    targets: torch.Tensor  # [K] the continuation token scored there
    owner: torch.Tensor  # [K] request index (into the plan's requests) of each position


@dataclass
class BatchPlan:
    """Batches for a fixed list of requests (built once, run for every candidate)."""

    n_requests: int
    batches: list[_Batch]
    n_tokens: int  # input tokens actually run (after de-duplication), padding excluded

    def to(self, device: torch.device) -> BatchPlan:
        if all(b.input_ids.device == device for b in self.batches):
            return self
        moved = [
            _Batch(*(getattr(b, f).to(device) for f in _Batch.__dataclass_fields__))
            for b in self.batches
        ]
        return BatchPlan(self.n_requests, moved, self.n_tokens)


def make_plan(
    requests: list[TokenRequest], *, max_length: int, batch_size: int = 64, max_batch_tokens: int | None = None
) -> BatchPlan:
    """Group requests into padded batches of unique inputs, longest first."""
    unique: dict[tuple[int, ...], int] = {}
    inputs: list[tuple[int, ...]] = []
    scored: list[list[tuple[int, int, int]]] = []  # per unique input: (request, position, target)
    for r, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {r} has an empty context or continuation after tokenization")
        whole = (list(ctx) + list(cont))[-(max_length + 1) :]
        inp = tuple(whole[:-1])
        k = unique.setdefault(inp, len(inputs))
        if k == len(inputs):
            inputs.append(inp)
            scored.append([])
        # logits at position p predict token p + 1: the continuation's tokens sit at the end.
        start = len(inp) - len(cont)
        scored[k].extend((r, start + j, tok) for j, tok in enumerate(cont))
    order = sorted(range(len(inputs)), key=lambda k: (-len(inputs[k]), inputs[k]))
    batches: list[_Batch] = []
    i = 0
    while i < len(order):
        width = len(inputs[order[i]])
        n = batch_size
        if max_batch_tokens:
            n = max(1, min(n, max_batch_tokens // max(1, width)))
        chunk = order[i : i + n]
        i += len(chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, positions, targets, owner = [], [], [], []
        for b, k in enumerate(chunk):
            ids[b, : len(inputs[k])] = torch.tensor(inputs[k], dtype=torch.long)
            for r, p, tok in scored[k]:
                rows.append(b)
                positions.append(p)
                targets.append(tok)
                owner.append(r)
        keep = sorted(set(positions))
        where = {p: j for j, p in enumerate(keep)}
        kept = [where[p] for p in positions]
        batches.append(
            _Batch(ids, *(torch.tensor(v, dtype=torch.long) for v in (rows, positions, keep, kept, targets, owner)))
        )
    return BatchPlan(len(requests), batches, sum(len(x) for x in inputs))


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` accepts `logits_to_keep` (a tensor of sequence positions)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def run_plan(model: torch.nn.Module, plan: BatchPlan, *, keep_logits: bool | None = None) -> tuple[list[float], list[bool]]:
    """(loglikelihood, is_greedy) of every request of the plan, in request order.

    keep_logits: compute the output head only at scored positions (default: when supported).
    """
    device = next(model.parameters()).device
    plan = plan.to(device)
    if keep_logits is None:
        keep_logits = takes_logits_to_keep(model)
    ll = torch.zeros(plan.n_requests, dtype=torch.float64, device=device)
    misses = torch.zeros(plan.n_requests, dtype=torch.long, device=device)
    for batch in plan.batches:
        if keep_logits:
            logits = model(input_ids=batch.input_ids, logits_to_keep=batch.keep).logits
            selected = logits[batch.rows, batch.kept_positions]
        else:
            selected = model(input_ids=batch.input_ids).logits[batch.rows, batch.positions]
        picked = F.log_softmax(selected, dim=-1)
        token_lp = picked.gather(1, batch.targets[:, None]).squeeze(1)
        ll.index_add_(0, batch.owner, token_lp.to(torch.float64))
        misses.index_add_(0, batch.owner, (picked.argmax(-1) != batch.targets).long())
    if not torch.isfinite(ll).all():
        raise FloatingPointError("the model produced non-finite log-likelihoods (NaN or inf weights?)")
    return ll.tolist(), (misses == 0).tolist()


@torch.inference_mode()
def run_bare(model: torch.nn.Module, plan: BatchPlan) -> None:
    """Only the model's forward passes over the plan's batches (the benchmark's baseline)."""
    device = next(model.parameters()).device
    for batch in plan.to(device).batches:
        model(input_ids=batch.input_ids)
