"""The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*): one
chunked kernel over sparsified, weighted task vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import native
from evomerge.merge.methods.base import (
    CHUNK,
    BoundMethod,
    MergeContext,
    Workspace,
    as_float,
    check_shapes,
    chunk_for,
    flat,
    scratch_buffers,
    usable_out,
    work_dtype,
)
from evomerge.merge.sparsify import Mask, share_scratch
from evomerge.merge.specs import (
    _DENSITY,
    _EPSILON,
    _GAMMA,
    MethodSpec,
)
from evomerge.merge.weights import sum_float32


class _Delta:
    """``x - base`` in the working dtype, computed when a sparsifier asks: a new tensor per call
    that nobody else holds (``fresh``), so |delta| and the rank tables may reuse its memory."""

    fresh = True

    def __init__(self, t: Tensor, base: Tensor, dtype: torch.dtype):
        self.t, self.base, self.dtype = t, base, dtype
        self.numel, self.device = t.numel(), t.device
        self._flat: tuple[Tensor, Tensor] | None = None

    def __call__(self) -> Tensor:
        return self.t.to(self.dtype) - self.base.to(self.dtype)

    def chunk(self, start: int, stop: int, out: Tensor) -> Tensor:
        """The flat ``self()[start:stop]``, written into ``out`` (of ``self.dtype``), the same values."""
        if self._flat is None:  # reshape copies a non-contiguous tensor: once, not per chunk
            self._flat = (self.t.reshape(-1), self.base.reshape(-1))
        t, base = self._flat[0][start:stop], self._flat[1][start:stop]
        if t.dtype == base.dtype == out.dtype:
            return torch.sub(t, base, out=out)
        return out.copy_(t).sub_(base.to(out.dtype))


class TaskArithmeticFamily(BoundMethod):
    """task_arithmetic, ties, dare_*, breadcrumbs*, della*: one kernel, mergekit's variants.

    ``sparsify`` is None, ``"magnitude"`` (TIES: keep the ``max(1, int(density N))``
    largest |delta|), ``"random"`` (DARE: keep each with probability ``density``),
    ``"outliers"`` (breadcrumbs: drop the ``int(gamma N)`` largest and keep the next
    ``int(density N)``) or ``"della"`` (MagPrune: per row, keep probability from
    ``density - epsilon`` for the smallest to ``density + epsilon`` for the largest).
    ``density >= 1`` keeps everything, unscaled. ``rescale`` multiplies a sparsified delta by
    ``|delta|_1 / |kept|_1`` (mergekit's L1 rescaling). ``int8_mask`` is accepted and has no
    numerical effect (a memory option in mergekit). Without TIES consensus, ``normalize``
    divides by the sum of all weights (kept as is when that sum is within 1e-8 of 0).
    """

    def __init__(self, spec: MethodSpec):
        super().__init__(spec)
        self.sparsify, self.consensus = spec.sparsify, spec.consensus

    # -- masks
    def _mask(self, i: int, base: Tensor, t: Tensor, values: Mapping[str, Any], ctx: MergeContext,
              dtype: torch.dtype) -> Mask | None:
        """None: keep everything (no sparsification, or density >= 1)."""
        if self.sparsify is None:
            return None
        density = as_float(self._model_value(values, _DENSITY, i), "density")
        if density >= 1:
            return None
        n = t.numel()
        key = ctx.keys[i] if i < len(ctx.keys) else (ctx.tensor_name, i)
        delta = _Delta(t, base, dtype)
        sp = ctx.sparsifier
        if self.sparsify == "magnitude":
            k = max(1, int(density * n)) if density > 0 else 0
            return sp.magnitude(key, delta, n, 0, k)
        if self.sparsify == "outliers":
            gamma = as_float(self._model_value(values, _GAMMA, i), "gamma")
            if problem := _GAMMA.problem(gamma):
                raise ValueError(f"{problem} (model #{i}, tensor '{ctx.tensor_name}')")
            target = max(0, int(density * n))
            n_top = int(gamma * n)
            n_bot = max(0, n - target - n_top)
            hi = n - n_bot
            return sp.magnitude(key, delta, n, hi - target, hi)
        noise_id = (int(ctx.seed), ctx.tensor_name, i)
        if self.sparsify == "random":
            return sp.random(noise_id, n, density, device=t.device)
        if self.sparsify == "della":
            eps = as_float(self._model_value(values, _EPSILON, i), "epsilon")
            return sp.della(key, delta, tuple(t.shape), noise_id, density, eps)
        raise AssertionError(self.sparsify)

    def prepare(self, base, tensors, model_params, params, ctx) -> None:
        """Build this tensor's masks and drop them, so that a caching sparsifier computes its
        tables now (see `evomerge.merge.engine.prepare_masks`); `merge` checks the rest."""
        if base is None or not tensors or self.sparsify is None or len(model_params) != len(tensors):
            return
        check_shapes(ctx.tensor_name, base, tensors)
        dtype = work_dtype([base, *tensors])
        for i, t in enumerate(tensors):
            self._mask(i, base, t, model_params[i], ctx, dtype)

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102 - see class doc
        if base is None:
            raise ValueError(f"merge method '{self.name}' needs base_model (tensor '{ctx.tensor_name}')")
        check_shapes(ctx.tensor_name, base, tensors)
        if not tensors:  # the engine never calls with none (the plan checks the count); kept for callers in code
            return base
        weights = [as_float(w, "weight") for w in self._per_model(model_params, "weight", len(tensors))]
        for i, density in enumerate(self._per_model(model_params, "density", len(tensors))):
            # mergekit silently treats density > 1 as 1 and < 0 as 0; out of [0, 1] is a typo here.
            if problem := _DENSITY.problem(as_float(density, "density")):
                raise ValueError(f"{problem} (model #{i}, tensor '{ctx.tensor_name}')")
        g = {spec.name: self._global_value(params, spec) for spec in self.global_params}
        dtype = work_dtype([base, *tensors])
        masks = [self._mask(i, base, t, model_params[i], ctx, dtype) for i, t in enumerate(tensors)]
        # applied one after another: one set of chunk buffers for all (and all tensors, with a workspace)
        share_scratch(masks, ctx.workspace.mask_scratch() if ctx.workspace is not None else None)
        return task_arithmetic_kernel(
            base, tensors, weights, masks,
            rescale=bool(g["rescale"]), consensus=self.consensus, normalize=bool(g["normalize"]),
            lam=as_float(g["lambda"], "lambda"), dtype=dtype,
            out=out if usable_out(out, base.shape, dtype, [base, *tensors]) else None, workspace=ctx.workspace,
        )


def _rescale_factors(bf: Tensor, flats: list[Tensor], masks: list[Mask | None], dtype: torch.dtype,
                     chunk: int, eps: float = 1e-7, workspace: Workspace | None = None) -> list[float | None]:
    """mergekit's L1 rescale: |delta|_1 / |kept delta|_1 per model (None: leave as is)."""
    n = bf.numel()
    factors: list[float | None] = []
    buf, absd = scratch_buffers(workspace, 2, min(chunk, n), dtype, bf.device)

    def l1(x: Tensor) -> float:
        if dtype in (torch.float16, torch.bfloat16):  # summed in float32 (vector_norm is ~5x slower)
            return float(torch.abs(x, out=absd[: x.numel()]).sum(dtype=torch.float32))
        return float(torch.linalg.vector_norm(x, 1, dtype=torch.float64))

    for tf, mask in zip(flats, masks, strict=True):
        if mask is None or mask.all_kept or mask.none_kept:
            factors.append(None)
            continue
        before = after = 0.0
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            d = buf[: e - s]
            torch.sub(tf[s:e], bf[s:e], out=d)
            before += l1(d)
            after += l1(mask.apply_(s, e, d))
        # The sums are rounded to the working dtype, as mergekit computes them there.
        b_t = torch.tensor(before, dtype=dtype)
        a_t = torch.tensor(after, dtype=dtype)
        factors.append(None if float(b_t) < eps or float(a_t) < eps else float(b_t / a_t))
    return factors


def _weight_sum(w_t: Tensor) -> float:
    """The weights' sum in their tensor's dtype: summed in float32 (`weights.sum_float32`, as the
    numpy executor sums them), then rounded to it; float64 weights in float64."""
    if w_t.dtype == torch.float64:
        return float(w_t.sum())
    return float(torch.tensor(sum_float32(w_t.tolist()), dtype=w_t.dtype))


def task_arithmetic_kernel(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    masks: Sequence[Mask | None],
    *,
    rescale: bool,
    consensus: bool,
    normalize: bool,
    lam: float,
    dtype: torch.dtype | None = None,
    chunk: int = CHUNK,
    out: Tensor | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """``base + lam * merge_i(w_i * rescale_i * mask_i * (x_i - base))`` chunk by chunk.

    The result is written into ``out`` when given (contiguous, base's shape, the working dtype,
    no memory shared with the inputs; it is returned), else into a new tensor. Besides it the
    kernel holds a few chunk-sized buffers (from ``workspace`` when given), never a full-size
    temporary.

    With ``consensus`` (TIES), an entry counts only where its sign equals the elected sign
    ``sign(sum_i w_i delta_i)`` (ties to +), and ``normalize`` divides by the summed weights
    of the counted entries (1 where none count). The fast path rewrites the sign test as
    sums, ``num = (S + M*sum|D_i|) / 2`` and ``den = (sum w_i|s_i| + M*sum w_i s_i) / 2``
    with ``M = +-1`` the elected sign, so one pass over the models suffices and no boolean
    tensors (slow in torch) are made; it needs non-negative weights (den is then exactly 0
    only where num is). Other weights take the exact, plain path.
    """
    dtype = dtype or work_dtype([base, *tensors])
    shape = base.shape
    bf = flat(base, dtype)
    n = bf.numel()
    if chunk == CHUNK:  # the default: the device's
        chunk = chunk_for(base.device, dtype)
    if out is None:
        result = torch.empty(shape, dtype=dtype, device=base.device)
    elif usable_out(out, shape, dtype, [base, *tensors]):
        result = out
    else:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} apart from the inputs")
    out = result.view(-1)
    if n == 0:
        return result
    # Weights rounded to the working dtype, as mergekit holds them in a tensor of that dtype.
    w_t = torch.tensor(list(weights), dtype=dtype)
    wr = w_t.tolist()
    flats = [flat(t, dtype) for t in tensors]
    live = [
        (tf, w, None if (m is not None and m.all_kept) else m)
        for tf, w, m in zip(flats, wr, masks, strict=True)
        if w != 0 and not (m is not None and m.none_kept)
    ]
    factors = (
        _rescale_factors(bf, [x[0] for x in live], [x[2] for x in live], dtype, chunk, workspace=workspace)
        if rescale else None
    )
    live = [(tf, w, m, factors[j] if factors else None) for j, (tf, w, m) in enumerate(live)]
    if not consensus:
        divisor = _weight_sum(w_t) if normalize else 1.0
        if abs(divisor) < 1e-8:
            divisor = 1.0
        _linear_sum(bf, live, out, lam / divisor, chunk, dtype, workspace)
        return result
    tiny = torch.finfo(dtype).tiny
    if all(w > 0 and (not normalize or w >= 4 * tiny) for _, w, _, _ in live):
        if not _ties_compiled(bf, live, out, normalize, lam):
            _ties_fast(bf, live, out, normalize, lam, chunk, dtype, workspace)
    else:
        _ties_exact(bf, live, out, normalize, lam, chunk, dtype)
    return result


def _masked_delta(d: Tensor, tf: Tensor, bb: Tensor, s: int, e: int, m: Mask | None, f: float | None) -> Tensor:
    torch.sub(tf[s:e], bb, out=d)
    if m is not None:
        m.apply_(s, e, d)
    if f is not None:
        d.mul_(f)
    return d


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """What a kernel accumulates ``dtype`` inputs in: float32 for 16-bit floats (their deltas and
    masks stay in their own dtype, so the kept elements are the reference's), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _weighted_delta(D: Tensor, dh: Tensor | None, tf: Tensor, bb: Tensor, s: int, e: int, m: Mask | None,
                    f: float | None, w: float) -> Tensor:
    """``D`` = w * rescale * kept delta of one chunk. Without ``dh`` (float32/float64 inputs) in
    the inputs' dtype with mergekit's roundings; with it (16-bit inputs) the kept delta is
    formed in ``dh`` (the input dtype) and scaled once in ``D``'s float32."""
    if dh is None:
        return _masked_delta(D, tf, bb, s, e, m, f).mul_(w)
    _masked_delta(dh, tf, bb, s, e, m, None)
    return D.copy_(dh).mul_(w if f is None else w * f)


def _linear_sum(bf: Tensor, live: list, out: Tensor, alpha: float, chunk: int, dtype: torch.dtype,
                workspace: Workspace | None = None) -> None:
    """out = bf + alpha * sum_j w_j * kept delta_j; each chunk accumulates in out's own chunk
    (16-bit inputs: in a float32 chunk, rounded to out's dtype once)."""
    n = bf.numel()
    if not live:
        out.copy_(bf)
        return
    acc = _accumulator(dtype)
    if acc != dtype:
        _linear_sum_half(bf, live, out, alpha, chunk, dtype, workspace)
        return
    (d,) = scratch_buffers(workspace, 1, min(chunk, n), dtype, bf.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        bb, a, dd = bf[s:e], out[s:e], d[: e - s]
        for j, (tf, w, m, f) in enumerate(live):
            _masked_delta(dd, tf, bb, s, e, m, f)
            if j == 0:
                torch.mul(dd, w, out=a)
            else:
                a.add_(dd, alpha=w)
        torch.add(bb, a, alpha=alpha, out=a)


def _linear_sum_half(bf: Tensor, live: list, out: Tensor, alpha: float, chunk: int, dtype: torch.dtype,
                     workspace: Workspace | None) -> None:
    """`_linear_sum` for 16-bit inputs, accumulated in float32. Without masks or rescaling
    (task_arithmetic) it reads each input once: ``(1 - alpha sum w) base + sum alpha w_j x_j``."""
    plain = all(m is None and f is None for _, _, m, f in live)
    keep_base = 1.0 - alpha * sum(w for _, w, _, _ in live)
    if plain and _task_arithmetic_compiled(bf, [tf for tf, *_ in live], [alpha * w for _, w, _, _ in live], keep_base, out):
        return
    n = bf.numel()
    c = min(chunk, n)
    (a,) = scratch_buffers(workspace, 1, c, torch.float32, bf.device)
    (dh,) = [None] if plain else scratch_buffers(workspace, 1, c, dtype, bf.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        bb, aa = bf[s:e], a[: e - s]
        if plain:
            aa.copy_(bb).mul_(keep_base)
            for tf, w, _, _ in live:
                aa.add_(tf[s:e], alpha=alpha * w)  # float32 += 16-bit: computed in float32
            out[s:e].copy_(aa)
            continue
        dd = dh[: e - s]
        for j, (tf, w, m, f) in enumerate(live):
            if j == 0:
                _weighted_delta(aa, dd, tf, bb, s, e, m, f, w)
            else:
                _masked_delta(dd, tf, bb, s, e, m, None)
                aa.add_(dd, alpha=w if f is None else w * f)
        out[s:e].copy_(aa.mul_(alpha).add_(bb))


def _bits(t: Tensor) -> np.ndarray | None:
    """A contiguous CPU bfloat16 tensor's bit patterns (uint16, no copy), else None."""
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
        return None
    return t.detach().view(torch.int16).numpy().view(np.uint16)


def _task_arithmetic_compiled(bf: Tensor, inputs: list[Tensor], scales: list[float], keep: float, out: Tensor) -> bool:
    """`_linear_sum_half`'s plain sum by its compiled twin (`native.task_arithmetic_bf16`, bit for
    bit) for CPU bfloat16 tensors; False where it does not apply."""
    if native.for_torch_kernels() is None:
        return False
    arrays = [_bits(t) for t in (bf, *inputs, out)]
    if any(a is None for a in arrays):
        return False
    native.task_arithmetic_bf16(arrays[0], arrays[1:-1], scales, keep, arrays[-1])
    return True


def _ties_compiled(bf: Tensor, live: list, out: Tensor, normalize: bool, lam: float) -> bool:
    """`_ties_fast` by its compiled twin (`native.ties_bf16`, bit for bit) for CPU bfloat16 tensors
    whose masks are magnitude thresholds (TIES) and that are not rescaled; False where it does
    not apply."""
    if not live or native.for_torch_kernels() is None or any(f is not None for *_, f in live):
        return False
    shrinks = [native.KEEP_ALL if m is None else m.shrink(torch.bfloat16) for _, _, m, _ in live]
    arrays = [_bits(t) for t in (bf, *(tf for tf, *_ in live), out)]
    if any(s is None for s in shrinks) or any(a is None for a in arrays):
        return False
    native.ties_bf16(arrays[0], arrays[1:-1], [w for _, w, _, _ in live], shrinks, normalize=normalize, lam=lam, out=arrays[-1])
    return True


def _ties_fast(bf: Tensor, live: list, out: Tensor, normalize: bool, lam: float, chunk: int,
               dtype: torch.dtype, workspace: Workspace | None = None) -> None:
    """The sum S of a chunk accumulates in out's own chunk (overwritten by the result last).
    16-bit inputs: each kept delta is formed (and masked) in the inputs' dtype, then the sums
    run in float32 chunks with w_j folded in (D_j is not rounded to 16 bits), rounded once."""
    n = bf.numel()
    if not live:
        out.copy_(bf)
        return
    c = min(chunk, n)
    half = _accumulator(dtype) != dtype
    acc = _accumulator(dtype)
    # wsg and wabs only count the weights with normalize; a 16-bit merge keeps S apart from out
    dabs, d, sg, ones, *wbufs = scratch_buffers(workspace, (6 if normalize else 4) + half, c, acc, bf.device)
    (dh,) = scratch_buffers(workspace, 1, c, dtype, bf.device) if half else [None]
    ones.fill_(1)
    tiny = torch.finfo(acc).tiny
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k = e - s
        bb = bf[s:e]
        S_, da, dd, sg_ = (wbufs[-1][:k] if half else out[s:e]), dabs[:k], d[:k], sg[:k]
        ws, wa = (wbufs[0][:k], wbufs[1][:k]) if normalize else (None, None)
        for j, (tf, w, m, f) in enumerate(live):
            if half:  # dd = kept delta_j in float32; the sums weigh it by wj
                dd.copy_(_masked_delta(dh[:k], tf, bb, s, e, m, None))
                wj = w if f is None else w * f
            else:  # dd = D_j = w_j * kept delta_j, rounded as mergekit does
                _masked_delta(dd, tf, bb, s, e, m, f).mul_(w)
                wj = 1.0
            if j == 0:
                torch.mul(dd, wj, out=S_) if half else S_.copy_(dd)
            else:
                S_.add_(dd, alpha=wj)
            if normalize:  # w_j > 0, so sign(D_j) is the sign of the kept delta
                torch.sign(dd, out=sg_)
                if j == 0:
                    torch.abs(dd, out=da)
                    torch.mul(sg_, w, out=ws)
                    torch.mul(sg_, sg_, out=wa).mul_(w)
                else:
                    da.addcmul_(dd, sg_, value=wj)
                    ws.add_(sg_, alpha=w)
                    wa.addcmul_(sg_, sg_, value=w)
            elif j == 0:
                torch.abs(dd, out=da)
            else:
                da.add_(dd.abs_(), alpha=wj)
            if j == 0 and half and wj != 1:
                da.mul_(wj)
        # M = +1 where S >= 0, else -1 (S is -0.0 only where every D_j is a zero: M does not
        # matter there); then num' = S + M*sum|D| = 2 * num, in S
        torch.copysign(ones[:k], S_, out=sg_)
        S_.addcmul_(da, sg_)
        if half:  # the base in float32 (ops mixing dtypes are not vectorized), in dd
            bb = dd.copy_(bb)
        result = dd if half else out[s:e]
        if normalize:
            wa.addcmul_(ws, sg_).clamp_min_(tiny)  # den' = 2 * den; 0 only where num' is 0
            torch.addcdiv(bb, S_, wa, value=lam, out=result)
        else:
            torch.add(bb, S_, alpha=lam / 2, out=result)
        if half:
            out[s:e].copy_(result)


def _ties_exact(bf: Tensor, live: list, out: Tensor, normalize: bool, lam: float, chunk: int,
                dtype: torch.dtype) -> None:
    """mergekit's TIES consensus step as written (any weights, boolean masks)."""
    n = bf.numel()
    c = min(chunk, n)
    nm = len(live)
    D = torch.empty((max(nm, 1), c), dtype=dtype, device=bf.device)
    W = torch.tensor([w for _, w, _, _ in live] or [0.0], dtype=dtype, device=bf.device).view(-1, 1)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k = e - s
        bb = bf[s:e]
        if not live:
            out[s:e].copy_(bb)
            continue
        Dk = D[:nm, :k]
        for j, (tf, w, m, f) in enumerate(live):
            _masked_delta(Dk[j], tf, bb, s, e, m, f).mul_(w)
        S = Dk.sum(dim=0)
        majority = torch.where(S >= 0, 1.0, -1.0).to(dtype)
        agree = Dk.sign() == majority
        num = (Dk * agree).sum(dim=0)
        if normalize:
            den = (W * agree).sum(dim=0)
            den[den == 0] = 1
            num /= den
        if lam != 1:
            num *= lam
        torch.add(bb, num, out=out[s:e])
