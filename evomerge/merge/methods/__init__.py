"""Merge kernels: pure tensor functions, with mergekit's semantics and defaults, one module per
method (`linear`, `slerp`, `task_arithmetic` for the whole family, `model_stock`,
`passthrough`; the shared contract in `base`). What a method is called, its parameters and its
capabilities are declared in `evomerge.merge.specs`, whose `kernel` field names the class here;
`get_method` imports it on first use.

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

Methods declared with ``writes_out=True`` also take ``merge(..., out=tensor)``: they may write the
result straight into ``out`` (e.g. a resident model's parameter) and return ``out``, which saves
allocating and copying a full-size result per tensor. ``out`` is a hint: when it cannot hold the
result as computed (shape, dtype, device, not contiguous, or sharing memory with an input) the
method returns a new tensor instead and the caller copies it. The values are the same either way.
"""

from __future__ import annotations

import importlib

from evomerge.merge.methods.base import (
    CHUNK,
    FunctionMethod,
    MergeContext,
    MergeMethod,
    Workspace,
    accepts_out,
    usable_out,
)
from evomerge.merge.methods.slerp import slerp
from evomerge.merge.methods.task_arithmetic import task_arithmetic_kernel
from evomerge.merge.specs import BUILTIN_METHODS, UnknownMethodError, get_spec

__all__ = [
    "CHUNK", "METHODS", "FunctionMethod", "MergeContext", "MergeMethod", "UnknownMethodError", "Workspace",
    "accepts_out", "get_method", "slerp", "task_arithmetic_kernel", "usable_out",
]

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
