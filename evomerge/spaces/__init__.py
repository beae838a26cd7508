"""Search spaces: genome <-> recipe. `build_space` turns a space file and the experiment's models
into a SearchSpace of the file's kind (`evomerge.spaces.config.SPACES`); see ps.py (parameter
space), dfs.py (data-flow space), weights.py (raw weights)."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.merge.sources import SourcePool
from evomerge.spaces.base import Gene, SearchSpace
from evomerge.spaces.config import SPACES, load_space_spec, register_space, space_class
from evomerge.spaces.dfs import DataFlowSpace
from evomerge.spaces.ps import ParameterSpace
from evomerge.spaces.weights import WeightsSpace

__all__ = [
    "SPACES",
    "DataFlowSpace",
    "Gene",
    "ParameterSpace",
    "SearchSpace",
    "WeightsSpace",
    "build_space",
    "register_space",
    "space_class",
]


def build_space(
    ref: str | Path | dict,
    *,
    models: list[str],
    base: str | None = None,
    pool: SourcePool | None = None,
    overrides: dict | None = None,
) -> SearchSpace:
    """A space over `models` (and `base` for methods that need one), built by its kind's class.

    For DFS the first model is model A (embeddings, head, and the model the search starts from).
    For the weights space the first model is the template whose parameters the genome holds.
    """
    spec, file = load_space_spec(ref, overrides)
    try:
        return space_class(spec.kind, file=file).build(spec, models=models, base=base, pool=pool or SourcePool(), file=file)
    except EvomergeError as exc:
        raise exc.located(file=file) from None
