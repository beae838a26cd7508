"""model_stock: interpolation towards the models' mean by their task vectors' mean cosine."""

from __future__ import annotations

import torch

from evomerge.merge.methods.base import (
    BoundMethod,
    check_shapes,
    work_dtype,
)


class ModelStock(BoundMethod):
    """Model Stock (Jang et al. 2024): base + t * (mean of models - base).

    ``t = n cos / (1 + (n - 1) cos)`` with cos the mean pairwise cosine between the task
    vectors (per output row when ``filter_wise``); where that denominator vanishes the base
    is kept. Needs the base and at least two models.
    """

    def merge(self, base, tensors, model_params, params, ctx):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        check_shapes(ctx.tensor_name, base, tensors)
        dtype = work_dtype([base, *tensors])
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
