"""slerp: spherical interpolation from the base (t = 0) to one other model (t = 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evomerge.merge.methods.base import (
    BoundMethod,
    as_float,
    check_shapes,
    usable_out,
    work_dtype,
)


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
    out_dtype = work_dtype([v0, v1])
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


class Slerp(BoundMethod):
    """SLERP between the base (t = 0) and exactly one other model (t = 1)."""

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        check_shapes(ctx.tensor_name, base, tensors)
        if not base.is_floating_point():
            raise ValueError(f"slerp of '{ctx.tensor_name}' needs floating-point tensors, got {base.dtype}")
        t = as_float(self._global_value(params, self._spec("t")), "t")
        return slerp(t, base, tensors[0], out=out)
