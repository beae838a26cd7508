"""Search spaces: genome <-> recipe. `build_space` turns a space file and the experiment's models
into a SearchSpace; see ps.py (parameter space), dfs.py (data-flow space), weights.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.layout import layer_count
from evomerge.merge.sources import SourcePool
from evomerge.spaces.base import Gene, SearchSpace
from evomerge.spaces.config import DFSSpec, PSSpec, WeightsSpec, load_space_spec
from evomerge.spaces.dfs import DataFlowSpace, SourceModel
from evomerge.spaces.ps import ParameterSpace

__all__ = ["Gene", "SearchSpace", "ParameterSpace", "DataFlowSpace", "WeightsSpace", "build_space"]


def __getattr__(name: str) -> Any:
    """WeightsSpace on first use: it imports torch (seconds), which reading or checking a space
    file (`evomerge.spaces.config`, imported through this package) never needs."""
    if name == "WeightsSpace":
        from evomerge.spaces.weights import WeightsSpace

        return WeightsSpace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_space(
    ref: str | Path | dict,
    *,
    models: list[str],
    base: str | None = None,
    pool: SourcePool | None = None,
    overrides: dict | None = None,
) -> SearchSpace:
    """A space over `models` (and `base` for methods that need one).

    For DFS the first model is model A (embeddings, head, and the model the search starts from).
    For the weights space the first model is the template whose parameters the genome holds.
    """
    spec, file = load_space_spec(ref, overrides)
    pool = pool or SourcePool()
    try:
        if isinstance(spec, PSSpec):
            counts = {layer_count(pool.get(m).config) for m in [*models, *([base] if base else [])]}
            return ParameterSpace(spec, base=base, models=models, layer_count=counts.pop() if len(counts) == 1 else None, file=file)
        if isinstance(spec, DFSSpec):
            sources = [SourceModel(m, layer_count(pool.get(m).config) or 0, pool.get(m).config) for m in models]
            return DataFlowSpace(spec, sources, file=file)
        assert isinstance(spec, WeightsSpec)
        from evomerge.spaces.weights import WeightsSpace

        source = pool.get(models[0])
        return WeightsSpace(spec, {name: source.get(name) for name in source.names})
    except EvomergeError as exc:
        raise exc.located(file=file) from None
