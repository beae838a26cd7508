"""linear: the weighted average of the models (model soups)."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import (
    BoundMethod,
    as_float,
    check_shapes,
    usable_out,
    work_dtype,
)
from evomerge.merge.weights import sum_float32


class Linear(BoundMethod):
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
        check_shapes(ctx.tensor_name, None, inputs)
        weights = [as_float(w, "weight") for w in self._per_model(model_params, "weight", len(inputs))]
        normalize = bool(self._global_value(params, self._spec("normalize")))
        first = inputs[0]
        if not first.is_floating_point():
            raise ValueError(f"linear merge of '{ctx.tensor_name}' needs floating-point tensors, got {first.dtype}")
        work = work_dtype(inputs)
        acc_dtype = torch.float64 if work == torch.float64 else torch.float32
        w = torch.tensor(weights, dtype=acc_dtype)
        total = float(w.sum()) if acc_dtype == torch.float64 else sum_float32(w.tolist())
        if normalize and total == 0:
            raise ValueError(
                f"linear merge of '{ctx.tensor_name}': weights {weights} sum to 0 with normalize: true; "
                "change the weights or set normalize: false"
            )
        # accumulate in `out` itself when the result is kept in the accumulation dtype
        if acc_dtype == work and usable_out(out, first.shape, acc_dtype, inputs):
            acc = out.zero_()
        else:
            acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
        for t, wi in zip(inputs, w.tolist(), strict=True):
            acc.add_(t.to(acc_dtype), alpha=wi)
        if normalize:
            acc.div_(total)
        return acc.to(work)
