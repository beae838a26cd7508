"""Merge methods as pure tensor functions, with mergekit's semantics and defaults.

Each method merges *one* output tensor: ``merge(base, tensors, model_params, params, ctx)``.
The engine resolves parameters (gradients, filters, defaults from the :class:`ParamSpec`
tuples) to plain scalars before the call, and never passes the base among ``tensors``.

Semantics follow mergekit 0.1.5 (``mergekit-yaml``), checked tensor for tensor by
``tests/test_mergekit_parity.py``:

- ``linear``: ``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``, the default),
  computed in float32 (float64 for float64 inputs). No base. mergekit adds a ``base_model``
  that is not listed under ``models:`` as one more input (it then needs a ``weight`` from the
  top-level or slice ``parameters``, else mergekit stops with "Missing required parameter").
- ``slerp``: spherical interpolation from the base (t=0) to the one other model (t=1) over
  the whole flattened tensor; nearly parallel tensors (|cos| > 0.9995) interpolate linearly.
- task-arithmetic family (``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
  ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``): per model the task
  vector ``delta_i = x_i - base`` is sparsified (magnitude top-k, random DARE drop,
  breadcrumbs band, DELLA MagPrune), optionally rescaled to keep its L1 norm (``rescale``),
  and weighted; TIES-style methods keep only the entries that agree with the elected sign
  (``sign(sum_i w_i delta_i)``, ties to +); ``normalize`` divides by the weights that
  contributed; ``lambda`` scales the merged delta, which is added to the base.
- ``model_stock``: interpolates between the base and the average of the models with
  ``t = n cos / (1 + (n - 1) cos)``, cos the mean pairwise cosine of the task vectors
  (per output row with ``filter_wise``).
- ``passthrough``: the single input, times ``scale`` when given.

Random methods draw from :class:`~evomerge.merge.sparsify.Sparsifier` noise seeded by
``(ctx.seed, ctx.tensor_name, model index)``: reproducible, independent of tensor order.
mergekit's own random draws cannot be reproduced; their distribution is the same.

Compute happens in the promoted dtype of the inputs (float32 for ``linear``/``slerp`` on
half-precision inputs, as mergekit does); the result has that dtype and the inputs' shape.
Large tensors are processed in flat chunks of ``CHUNK`` elements that stay in cache.

Methods with ``writes_out = True`` also take ``merge(..., out=tensor)``: they may write the
result straight into ``out`` (e.g. a resident model's parameter) and return ``out``, which saves
allocating and copying a full-size result per tensor. ``out`` is a hint: when it cannot hold the
result as computed (shape, dtype, device, not contiguous, or sharing memory with an input) the
method returns a new tensor instead and the caller copies it. The values are the same either way.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from evomerge.merge.sparsify import Mask, OneShotSparsifier, Sparsifier, share_scratch
from evomerge.merge.specs import (
    _DENSITY,
    _EPSILON,
    _GAMMA,
    BUILTIN_METHODS,
    MethodSpec,
    ParamSpec,
    UnknownMethodError,  # noqa: F401  (re-exported: callers catch it from here)
    get_spec,
)

CHUNK = 1 << 16  # elements per chunk: 256 KiB per fp32 buffer (as fast as 512 KiB, half the scratch)

# ---- contract --------------------------------------------------------------------------------


class Workspace:
    """Chunk-sized scratch buffers that the tensors of one merge reuse, one set per thread.

    Without it every merged tensor allocates its kernel's chunk buffers and its masks' anew;
    freed between tensors, they fragment the heap, which then grows by a few hundred KB per
    tensor until the allocator is trimmed. With it a merge allocates them once per thread
    (a few chunks: ~``6 * CHUNK * 4`` bytes for float32) and frees them with the workspace.
    Buffers handed to a thread stay valid until that thread asks again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sets: dict[int, dict] = {}

    def _mine(self) -> dict:
        ident = threading.get_ident()
        with self._lock:
            return self._sets.setdefault(ident, {})

    def buffers(self, count: int, size: int, dtype: torch.dtype) -> list[Tensor]:
        """``count`` distinct flat buffers of ``size`` elements for this thread."""
        mine = self._mine()
        block = mine.get(dtype)
        if block is None or block.shape[0] < count or block.shape[1] < size:
            rows = max(count, block.shape[0] if block is not None else 0)
            cols = max(size, block.shape[1] if block is not None else 0)
            mine[dtype] = None  # free the old block first
            block = mine[dtype] = torch.empty((rows, cols), dtype=dtype)
        return [block[i, :size] for i in range(count)]

    def mask_scratch(self) -> dict:
        """This thread's scratch for masks (see `evomerge.merge.sparsify.share_scratch`)."""
        return self._mine().setdefault("masks", {})

    def nbytes(self) -> int:
        with self._lock:
            sets = list(self._sets.values())
        total = 0
        for mine in sets:
            tensors = [t for k, t in mine.items() if k != "masks" and t is not None] + list(mine.get("masks", {}).values())
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def _buffers(workspace: Workspace | None, count: int, size: int, dtype: torch.dtype) -> list[Tensor]:
    if workspace is not None:
        return workspace.buffers(count, size, dtype)
    return [torch.empty(size, dtype=dtype) for _ in range(count)]


@dataclass
class MergeContext:
    tensor_name: str  # output tensor name, e.g. "model.layers.3.mlp.down_proj.weight"
    keys: Sequence[Hashable]  # identity of each tensors[i] (source id, tensor name, base id)
    sparsifier: Sparsifier = field(default_factory=OneShotSparsifier)
    seed: int = 0  # recipe seed for DARE/DELLA
    workspace: Workspace | None = None  # chunk buffers shared with the merge's other tensors


@runtime_checkable
class MergeMethod(Protocol):
    name: str
    requires_base: bool
    model_params: tuple[ParamSpec, ...]
    global_params: tuple[ParamSpec, ...]

    def merge(
        self,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        model_params: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        ctx: MergeContext,
    ) -> Tensor: ...


def accepts_out(method: MergeMethod) -> bool:
    """Whether ``method.merge`` takes ``out=`` (declared: `MethodSpec.writes_out`)."""
    return bool(getattr(method, "writes_out", False))


def usable_out(out: Tensor | None, shape: Sequence[int], dtype: torch.dtype, inputs: Sequence[Tensor]) -> bool:
    """Whether a result of ``shape`` and ``dtype`` can be written straight into ``out``: same
    shape, dtype and device as the inputs, contiguous, and sharing no memory with any input
    (the kernels read the inputs while they write)."""
    if out is None or out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        return False
    if any(t.device != out.device for t in inputs):
        return False
    storage = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != storage for t in inputs)


# ---- shared helpers ------------------------------------------------------------------------


class _Method:
    """A kernel bound to its declaration (`evomerge.merge.specs.MethodSpec`): name, parameters
    and capabilities are the spec's."""

    def __init__(self, spec: MethodSpec):
        self.spec = spec
        self.name = spec.name
        self.requires_base = spec.requires_base
        self.writes_out = spec.writes_out
        self.model_params = spec.model_params
        self.global_params = spec.global_params

    def describe(self) -> str:
        """Human-readable summary of the method's capabilities and parameters."""
        return self.spec.describe()

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"

    def _check_inputs(self, base: Tensor | None, tensors: Sequence[Tensor], ctx: MergeContext) -> None:
        """The declared structure: a base when the method needs one, and the model count."""
        if self.requires_base and base is None:
            raise ValueError(f"merge method '{self.name}' needs base_model (tensor '{ctx.tensor_name}')")
        count = len(tensors) + (1 if base is not None and not self.requires_base else 0)
        if problem := self.spec.count_problem(count):
            raise ValueError(f"{problem} (tensor '{ctx.tensor_name}')")

    # parameter access with defaults and clear errors
    def _model_value(self, values: Mapping[str, Any], spec: ParamSpec, index: int) -> Any:
        value = values.get(spec.name) if values is not None else None
        if value is None:
            if spec.required:
                raise ValueError(f"merge method '{self.name}' needs '{spec.name}' ({spec.doc}) for model #{index}")
            return spec.default
        return value

    def _global_value(self, params: Mapping[str, Any], spec: ParamSpec) -> Any:
        value = params.get(spec.name) if params is not None else None
        if value is None:
            if spec.required:
                raise ValueError(f"merge method '{self.name}' needs parameter '{spec.name}' ({spec.doc})")
            return spec.default
        return value

    def _spec(self, name: str) -> ParamSpec:
        spec = self.spec.param(name)
        if spec is None:
            raise KeyError(name)
        return spec

    def _per_model(self, model_params: Sequence[Mapping[str, Any]], name: str, n: int) -> list[Any]:
        if len(model_params) != n:
            raise ValueError(f"merge method '{self.name}': {n} input tensors but {len(model_params)} parameter sets")
        spec = self._spec(name)
        return [self._model_value(model_params[i], spec, i) for i in range(n)]


def _work_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_shapes(name: str, base: Tensor | None, tensors: Sequence[Tensor]) -> None:
    shapes = {tuple(t.shape) for t in ([base] if base is not None else []) + list(tensors)}
    if len(shapes) > 1:
        raise ValueError(f"tensor '{name}': inputs have different shapes {sorted(shapes)}")


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).reshape(-1)


def _as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


# ---- linear ------------------------------------------------------------------------------------


class Linear(_Method):
    """Weighted average ``sum w_i x_i / sum w_i`` (model soups).

    There is no base: if a recipe sets ``base_model`` without listing it under ``models:``,
    mergekit merges it as one more input (weighted by the top-level ``weight``); listing the
    base under ``models:`` makes it an ordinary input. Raises when ``normalize`` is on and
    the weights sum to 0 (mergekit would write inf/NaN).
    """

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102 - see class doc
        if base is not None:
            raise ValueError("linear takes no base tensor: pass every input (the base too) in `tensors`")
        inputs = list(tensors)
        if not inputs:
            raise ValueError(f"linear merge of '{ctx.tensor_name}' got no input tensors")
        _check_shapes(ctx.tensor_name, None, inputs)
        weights = [_as_float(w, "weight") for w in self._per_model(model_params, "weight", len(inputs))]
        normalize = bool(self._global_value(params, self._spec("normalize")))
        first = inputs[0]
        if not first.is_floating_point():
            raise ValueError(f"linear merge of '{ctx.tensor_name}' needs floating-point tensors, got {first.dtype}")
        work = _work_dtype(inputs)
        acc_dtype = torch.float64 if work == torch.float64 else torch.float32
        w = torch.tensor(weights, dtype=acc_dtype)
        total = float(w.sum())
        if normalize and total == 0:
            raise ValueError(
                f"linear merge of '{ctx.tensor_name}': weights {weights} sum to 0 with normalize: true; "
                "change the weights or set normalize: false"
            )
        # accumulate in `out` itself when the result is kept in the accumulation dtype
        if acc_dtype == work and usable_out(out, first.shape, acc_dtype, inputs):
            acc = out.zero_()
        else:
            acc = torch.zeros(first.shape, dtype=acc_dtype)
        for t, wi in zip(inputs, w.tolist(), strict=True):
            acc.add_(t.to(acc_dtype), alpha=wi)
        if normalize:
            acc.div_(total)
        return acc.to(work)


# ---- slerp -------------------------------------------------------------------------------------


def slerp(
    t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8, *, out: Tensor | None = None
) -> Tensor:
    """Spherical interpolation of two whole tensors (flattened), linear when nearly parallel.

    The angle comes from the normalized tensors; the interpolation applies its coefficients
    to the raw tensors, as mergekit does. Norms below ``eps`` count as 1. The result goes into
    ``out`` (and ``out`` is returned) when `usable_out` allows it.
    """
    work = torch.float64 if torch.float64 in (v0.dtype, v1.dtype) else torch.float32
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    out_dtype = _work_dtype([v0, v1])
    if a.numel() == 0:
        return v0.to(out_dtype).clone()
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = float(torch.dot(a, b)) / (na * nb)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    if work == out_dtype and usable_out(out, v0.shape, work, [v0, v1]):
        torch.mul(a, ca, out=out.view(-1)).add_(b, alpha=cb)
        return out
    res = torch.mul(a, ca)
    res.add_(b, alpha=cb)
    return res.view(v0.shape).to(out_dtype)


class Slerp(_Method):
    """SLERP between the base (t = 0) and exactly one other model (t = 1)."""

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        _check_shapes(ctx.tensor_name, base, tensors)
        if not base.is_floating_point():
            raise ValueError(f"slerp of '{ctx.tensor_name}' needs floating-point tensors, got {base.dtype}")
        t = _as_float(self._global_value(params, self._spec("t")), "t")
        return slerp(t, base, tensors[0], out=out)


# ---- task-arithmetic family ----------------------------------------------------------------


class _Delta:
    """``x - base`` in the working dtype, computed when a sparsifier asks: a new tensor per call
    that nobody else holds (``fresh``), so |delta| and the rank tables may reuse its memory."""

    fresh = True

    def __init__(self, t: Tensor, base: Tensor, dtype: torch.dtype):
        self.t, self.base, self.dtype = t, base, dtype

    def __call__(self) -> Tensor:
        return self.t.to(self.dtype) - self.base.to(self.dtype)


class TaskArithmeticFamily(_Method):
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
        density = _as_float(self._model_value(values, _DENSITY, i), "density")
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
            gamma = _as_float(self._model_value(values, _GAMMA, i), "gamma")
            if problem := _GAMMA.problem(gamma):
                raise ValueError(f"{problem} (model #{i}, tensor '{ctx.tensor_name}')")
            target = max(0, int(density * n))
            n_top = int(gamma * n)
            n_bot = max(0, n - target - n_top)
            hi = n - n_bot
            return sp.magnitude(key, delta, n, hi - target, hi)
        noise_id = (int(ctx.seed), ctx.tensor_name, i)
        if self.sparsify == "random":
            return sp.random(noise_id, n, density)
        if self.sparsify == "della":
            eps = _as_float(self._model_value(values, _EPSILON, i), "epsilon")
            return sp.della(key, delta, tuple(t.shape), noise_id, density, eps)
        raise AssertionError(self.sparsify)

    def prepare(self, base, tensors, model_params, params, ctx) -> None:
        """Build this tensor's masks and drop them, so that a caching sparsifier computes its
        tables now (see `evomerge.merge.engine.prepare_masks`); `merge` checks the rest."""
        if base is None or not tensors or self.sparsify is None or len(model_params) != len(tensors):
            return
        _check_shapes(ctx.tensor_name, base, tensors)
        dtype = _work_dtype([base, *tensors])
        for i, t in enumerate(tensors):
            self._mask(i, base, t, model_params[i], ctx, dtype)

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102 - see class doc
        if base is None:
            raise ValueError(f"merge method '{self.name}' needs base_model (tensor '{ctx.tensor_name}')")
        _check_shapes(ctx.tensor_name, base, tensors)
        if not tensors:  # the engine never calls with none (the plan checks the count); kept for callers in code
            return base
        weights = [_as_float(w, "weight") for w in self._per_model(model_params, "weight", len(tensors))]
        for i, density in enumerate(self._per_model(model_params, "density", len(tensors))):
            # mergekit silently treats density > 1 as 1 and < 0 as 0; out of [0, 1] is a typo here.
            if problem := _DENSITY.problem(_as_float(density, "density")):
                raise ValueError(f"{problem} (model #{i}, tensor '{ctx.tensor_name}')")
        g = {spec.name: self._global_value(params, spec) for spec in self.global_params}
        dtype = _work_dtype([base, *tensors])
        masks = [self._mask(i, base, t, model_params[i], ctx, dtype) for i, t in enumerate(tensors)]
        # applied one after another: one set of chunk buffers for all (and all tensors, with a workspace)
        share_scratch(masks, ctx.workspace.mask_scratch() if ctx.workspace is not None else None)
        return task_arithmetic_kernel(
            base, tensors, weights, masks,
            rescale=bool(g["rescale"]), consensus=self.consensus, normalize=bool(g["normalize"]),
            lam=_as_float(g["lambda"], "lambda"), dtype=dtype,
            out=out if usable_out(out, base.shape, dtype, [base, *tensors]) else None, workspace=ctx.workspace,
        )


def _rescale_factors(bf: Tensor, flats: list[Tensor], masks: list[Mask | None], dtype: torch.dtype,
                     chunk: int, eps: float = 1e-7, workspace: Workspace | None = None) -> list[float | None]:
    """mergekit's L1 rescale: |delta|_1 / |kept delta|_1 per model (None: leave as is)."""
    n = bf.numel()
    factors: list[float | None] = []
    (buf,) = _buffers(workspace, 1, min(chunk, n), dtype)
    for tf, mask in zip(flats, masks, strict=True):
        if mask is None or mask.all_kept or mask.none_kept:
            factors.append(None)
            continue
        before = after = 0.0
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            d = buf[: e - s]
            torch.sub(tf[s:e], bf[s:e], out=d)
            before += float(torch.linalg.vector_norm(d, 1, dtype=torch.float64))
            after += float(torch.linalg.vector_norm(mask.apply_(s, e, d), 1, dtype=torch.float64))
        # The sums are rounded to the working dtype, as mergekit computes them there.
        b_t = torch.tensor(before, dtype=dtype)
        a_t = torch.tensor(after, dtype=dtype)
        factors.append(None if float(b_t) < eps or float(a_t) < eps else float(b_t / a_t))
    return factors


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
    dtype = dtype or _work_dtype([base, *tensors])
    shape = base.shape
    bf = _flat(base, dtype)
    n = bf.numel()
    if out is None:
        result = torch.empty(shape, dtype=dtype)
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
    flats = [_flat(t, dtype) for t in tensors]
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
        divisor = float(w_t.sum()) if normalize else 1.0
        if abs(divisor) < 1e-8:
            divisor = 1.0
        _linear_sum(bf, live, out, lam / divisor, chunk, dtype, workspace)
        return result
    tiny = torch.finfo(dtype).tiny
    if all(w > 0 and (not normalize or w >= 4 * tiny) for _, w, _, _ in live):
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


def _linear_sum(bf: Tensor, live: list, out: Tensor, alpha: float, chunk: int, dtype: torch.dtype,
                workspace: Workspace | None = None) -> None:
    """out = bf + alpha * sum_j w_j * kept delta_j; each chunk accumulates in out's own chunk."""
    n = bf.numel()
    if not live:
        out.copy_(bf)
        return
    (d,) = _buffers(workspace, 1, min(chunk, n), dtype)
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


def _ties_fast(bf: Tensor, live: list, out: Tensor, normalize: bool, lam: float, chunk: int,
               dtype: torch.dtype, workspace: Workspace | None = None) -> None:
    """The sum S of a chunk accumulates in out's own chunk (overwritten by the result last)."""
    n = bf.numel()
    if not live:
        out.copy_(bf)
        return
    c = min(chunk, n)
    # wsg and wabs only count the weights with normalize
    dabs, d, sg, *wbufs = _buffers(workspace, 5 if normalize else 3, c, dtype)
    tiny = torch.finfo(dtype).tiny
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k = e - s
        bb = bf[s:e]
        S_, da, dd, sg_ = out[s:e], dabs[:k], d[:k], sg[:k]
        ws, wa = (wbufs[0][:k], wbufs[1][:k]) if normalize else (None, None)
        for j, (tf, w, m, f) in enumerate(live):
            _masked_delta(dd, tf, bb, s, e, m, f).mul_(w)  # D_j = w_j * kept delta_j, rounded as mergekit
            if j == 0:
                S_.copy_(dd)
            else:
                S_.add_(dd)
            if normalize:  # w_j > 0, so sign(D_j) is the sign of the kept delta
                torch.sign(dd, out=sg_)
                if j == 0:
                    torch.abs(dd, out=da)
                    torch.mul(sg_, w, out=ws)
                    torch.mul(sg_, sg_, out=wa).mul_(w)
                else:
                    da.addcmul_(dd, sg_)
                    ws.add_(sg_, alpha=w)
                    wa.addcmul_(sg_, sg_, value=w)
            elif j == 0:
                torch.abs(dd, out=da)
            else:
                da.add_(dd.abs_())
        # M = +1 where S >= 0 (also -0.0), else -1; then num' = S + M*sum|D| = 2 * num.
        torch.sign(S_, out=sg_).add_(0.5).sign_()
        da.mul_(sg_).add_(S_)
        if normalize:
            ws.mul_(sg_).add_(wa).clamp_min_(tiny)  # den' = 2 * den; 0 only where num' is 0
            torch.addcdiv(bb, da, ws, value=lam, out=out[s:e])
        else:
            torch.add(bb, da, alpha=lam / 2, out=out[s:e])


def _ties_exact(bf: Tensor, live: list, out: Tensor, normalize: bool, lam: float, chunk: int,
                dtype: torch.dtype) -> None:
    """mergekit's TIES consensus step as written (any weights, boolean masks)."""
    n = bf.numel()
    c = min(chunk, n)
    nm = len(live)
    D = torch.empty((max(nm, 1), c), dtype=dtype)
    W = torch.tensor([w for _, w, _, _ in live] or [0.0], dtype=dtype).view(-1, 1)
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


# ---- model stock ---------------------------------------------------------------------------


class ModelStock(_Method):
    """Model Stock (Jang et al. 2024): base + t * (mean of models - base).

    ``t = n cos / (1 + (n - 1) cos)`` with cos the mean pairwise cosine between the task
    vectors (per output row when ``filter_wise``); where that denominator vanishes the base
    is kept. Needs the base and at least two models.
    """

    def merge(self, base, tensors, model_params, params, ctx):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        _check_shapes(ctx.tensor_name, base, tensors)
        dtype = _work_dtype([base, *tensors])
        filter_wise = bool(self._global_value(params, self._spec("filter_wise")))
        w0 = base.to(dtype)
        ws = [t.to(dtype) for t in tensors]
        if filter_wise:
            if w0.dim() == 1:
                w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        else:
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        offsets = [w - w0 for w in ws]
        cos = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norm = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
                cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
        cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        count = len(ws)
        den = 1 + (count - 1) * cos_t
        singular = den.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos_t), count * cos_t / torch.where(singular, 1.0, den))
        avg = ws[0]
        for w in ws[1:]:
            avg = avg + w
        avg = avg / count
        return (t * avg + (1 - t) * w0).reshape(base.shape)


# ---- passthrough ---------------------------------------------------------------------------


class Passthrough(_Method):
    """The one input tensor unchanged, or times ``scale`` (used for DFS layer stacks).

    Without ``scale`` the input itself is returned (no copy), whatever ``out`` is.
    """

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        inputs = list(tensors) if base is None else [base, *tensors]
        (t,) = inputs
        scale = None
        if model_params:
            scale = self._model_value(model_params[0], self._spec("scale"), 0)
        if scale is None:
            return t  # no copy: the caller copies it where it goes
        factor = _as_float(scale, "scale")
        if usable_out(out, t.shape, t.dtype, [t]):
            return torch.mul(t, factor, out=out)
        return t * factor


# ---- kernels of declared methods ---------------------------------------------------------------


class FunctionMethod(_Method):
    """A method whose kernel is a plain function (`evomerge.merge.specs.merge_method`): called
    with the parameters resolved (defaults filled in) after the declared structure is checked."""

    def __init__(self, spec: MethodSpec, kernel: Any):
        super().__init__(spec)
        self.kernel = kernel

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        _check_shapes(ctx.tensor_name, base, tensors)
        model_values = [{p.name: self._model_value(values, p, i) for p in self.model_params} for i, values in enumerate(model_params)]
        values = {p.name: self._global_value(params, p) for p in self.global_params}
        kwargs = {"out": out} if self.writes_out else {}
        return self.kernel(base, list(tensors), model_values, values, ctx, **kwargs)


_LOADED: dict[str, MergeMethod] = {}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``, its kernel imported on first use; raises
    :class:`UnknownMethodError` listing the valid ones."""
    spec = get_spec(name)
    method = _LOADED.get(name)
    if method is None or method.spec is not spec:  # type: ignore[attr-defined]
        kernel = spec.kernel
        if isinstance(kernel, str):
            module, _, attr = kernel.partition(":")
            kernel = getattr(importlib.import_module(module), attr)
        method = kernel(spec) if isinstance(kernel, type) else FunctionMethod(spec, kernel)
        _LOADED[name] = method
    return method


METHODS: dict[str, MergeMethod] = {name: get_method(name) for name in BUILTIN_METHODS}
