"""What every merge kernel shares: the call contract (`MergeMethod`, `MergeContext`, `out=`),
chunk scratch (`Workspace`), `BoundMethod` (a kernel bound to its declaration) and `FunctionMethod`
(a plain decorated function as a kernel)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from evomerge.merge.sparsify import OneShotSparsifier, Sparsifier
from evomerge.merge.specs import (
    MethodSpec,
    ParamSpec,
)

CHUNK = 1 << 16  # elements per chunk: 256 KiB per fp32 buffer (as fast as 512 KiB, half the scratch)
# 16-bit inputs accumulate in float32 with more, cheaper ops per element: per-op overhead
# matters more (256K elements: task_arithmetic ~1.4 against ~1.9 ns per element, TIES ~6.4
# against ~7.3, bfloat16, one thread)
HALF_CHUNK = 1 << 18
# On an accelerator every chunk is a few kernel launches: chunks as large as the biggest tensors
DEVICE_CHUNK = 1 << 24


def chunk_for(device: torch.device, dtype: torch.dtype | None = None) -> int:
    """Elements per chunk of a kernel running on ``device`` over ``dtype`` inputs."""
    if device.type != "cpu":
        return DEVICE_CHUNK
    return HALF_CHUNK if dtype in (torch.float16, torch.bfloat16) else CHUNK

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

    def buffers(self, count: int, size: int, dtype: torch.dtype, device: torch.device | None = None) -> list[Tensor]:
        """``count`` distinct flat buffers of ``size`` elements for this thread, on ``device``
        (default the CPU)."""
        mine = self._mine()
        slot = (dtype, torch.device("cpu") if device is None else torch.device(device))
        block = mine.get(slot)
        if block is None or block.shape[0] < count or block.shape[1] < size:
            rows = max(count, block.shape[0] if block is not None else 0)
            cols = max(size, block.shape[1] if block is not None else 0)
            mine[slot] = None  # free the old block first
            block = mine[slot] = torch.empty((rows, cols), dtype=dtype, device=slot[1])
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


def scratch_buffers(
    workspace: Workspace | None, count: int, size: int, dtype: torch.dtype, device: torch.device | None = None
) -> list[Tensor]:
    if workspace is not None:
        return workspace.buffers(count, size, dtype, device)
    return [torch.empty(size, dtype=dtype, device=device) for _ in range(count)]


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


class BoundMethod:
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
        return self._value(values, spec, lambda: f"'{spec.name}' ({spec.doc}) for model #{index}")

    def _global_value(self, params: Mapping[str, Any], spec: ParamSpec) -> Any:
        return self._value(params, spec, lambda: f"parameter '{spec.name}' ({spec.doc})")

    def _value(self, values: Mapping[str, Any] | None, spec: ParamSpec, what: Callable[[], str]) -> Any:
        value = values.get(spec.name) if values is not None else None
        if value is None:
            if spec.required:
                raise ValueError(f"merge method '{self.name}' needs {what()}")
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


def work_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_shapes(name: str, base: Tensor | None, tensors: Sequence[Tensor]) -> None:
    shapes = {tuple(t.shape) for t in ([base] if base is not None else []) + list(tensors)}
    if len(shapes) > 1:
        raise ValueError(f"tensor '{name}': inputs have different shapes {sorted(shapes)}")


def flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).reshape(-1)


def as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


# ---- kernels of declared methods ---------------------------------------------------------------


class FunctionMethod(BoundMethod):
    """A method whose kernel is a plain function (`evomerge.merge.specs.merge_method`): called
    with the parameters resolved (defaults filled in) after the declared structure is checked."""

    def __init__(self, spec: MethodSpec, kernel: Any):
        super().__init__(spec)
        self.kernel = kernel

    def merge(self, base, tensors, model_params, params, ctx, out=None):  # noqa: D102
        self._check_inputs(base, tensors, ctx)
        check_shapes(ctx.tensor_name, base, tensors)
        model_values = [{p.name: self._model_value(values, p, i) for p in self.model_params} for i, values in enumerate(model_params)]
        values = {p.name: self._global_value(params, p) for p in self.global_params}
        kwargs = {"out": out} if self.writes_out else {}
        return self.kernel(base, list(tensors), model_values, values, ctx, **kwargs)
