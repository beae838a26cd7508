"""passthrough: one model's tensor, optionally scaled (DFS layer stacks)."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import (
    BoundMethod,
    as_float,
    usable_out,
)


class Passthrough(BoundMethod):
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
        factor = as_float(scale, "scale")
        if usable_out(out, t.shape, t.dtype, [t]):
            return torch.mul(t, factor, out=out)
        return t * factor
