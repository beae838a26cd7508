"""Data-flow space (DFS, Akiba et al. 2024, sec. 3.2): which layers, in which order, with which
input scales.

The M layers of the source models are laid out in order (model A's first, then B's, ...) and
repeated r times: T = M·r slots. Gene k of the indicator array keeps slot k when it is > 0; the
kept slots, in slot order, are the layer path. Scales: `per_slot` gives each slot the scale of
the hidden state that enters it (T genes); `matrix` gives W[i, j], the scale of the hidden state
passed from layer i to layer j (M² genes). The first layer of the path sees the embeddings
unscaled. Embeddings, final norm and head come from model A. With `pin_ends`, A's first and last
layers are put at the ends of the path (when the path does not already start / end with them).
An empty path decodes to A's first layer alone (with `pin_ends`: A's first and last layers), so
every genome builds a model.

Export: in a pre-norm block with a scale-invariant norm, L(c·x) = c·L'(x), where L' divides the
residual branch outputs (`o_proj`, `down_proj` and their biases) by c. With C_t the running
product of the path's input scales, the path is therefore a plain stack of layers whose `o_proj`
and `down_proj` are multiplied by 1/C_t, and the final norm removes C_T. The recipe is a mergekit
`passthrough` config of one-layer slices with `scale` filters, framed by two empty slices of model
A so that mergekit (and evomerge) take A's embeddings and head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import ConfigError
from evomerge.merge.hfconfig import architectures_of
from evomerge.merge.layout import layer_count
from evomerge.merge.sources import SourcePool
from evomerge.recipe import DTYPES, EvomergeBlock, InputSlice, OutputSlice, Recipe
from evomerge.spaces.base import Gene, GeneRange, SearchSpace, SpaceSpec

DFS_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


class DFSSpec(SpaceSpec):
    kind: Literal["dfs"]
    repeats: int = Field(1, ge=1)
    scales: Literal["matrix", "per_slot"] = "per_slot"
    scale_range: GeneRange = GeneRange(low=0.5, high=2.0, init=1.0)
    pin_ends: bool = False
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _positive_scales(self) -> DFSSpec:
        if self.scale_range.low <= 0:
            raise ValueError(
                f"scale_range.low: input scales must be > 0 (the exported path divides by their product), got {self.scale_range.low}"
            )
        return self


@dataclass(frozen=True)
class SourceModel:
    ref: str
    layers: int
    config: dict


@dataclass(frozen=True)
class Step:
    model: str
    layer: int
    input_scale: float
    cumulative: float


class DataFlowSpace(SearchSpace):
    kind = "dfs"
    spec_model = DFSSpec
    RECIPE_VIEW = "layer_path"

    def __init__(self, spec: DFSSpec, sources: list[SourceModel], file: str | None = None):
        _check_sources(sources, file)
        self.spec = spec
        self.sources = sources
        self.layer_table = [(s.ref, i) for s in sources for i in range(s.layers)]
        self.m = len(self.layer_table)
        self.t = self.m * spec.repeats
        genes = [
            Gene(f"I[{k}]", -1.0, 1.0, self._indicator_init(k), f"keep slot {k}: {self._slot_text(k)} (kept if > 0)")
            for k in range(self.t)
        ]
        rng = spec.scale_range
        if spec.scales == "per_slot":
            genes += [Gene(f"s[{k}]", rng.low, rng.high, rng.start, f"scale of the input to slot {k} ({self._slot_text(k)})") for k in range(self.t)]
        else:
            genes += [
                Gene(f"W[{i},{j}]", rng.low, rng.high, rng.start, f"scale from {self._layer_text(i)} to {self._layer_text(j)}")
                for i in range(self.m)
                for j in range(self.m)
            ]
        super().__init__(genes)

    @classmethod
    def build(cls, spec: DFSSpec, *, models: list[str], base: str | None, pool: SourcePool, file: str | None) -> DataFlowSpace:
        """Model A is the first of `models` (embeddings, head, and the model the search starts from)."""
        return cls(spec, [SourceModel(m, layer_count(pool.get(m).config) or 0, pool.get(m).config) for m in models], file=file)

    def _layer_text(self, index: int) -> str:
        ref, layer = self.layer_table[index]
        return f"{ref} layer {layer}"

    def _slot_text(self, k: int) -> str:
        return f"{self._layer_text(k % self.m)}, repeat {k // self.m + 1}"

    def _indicator_init(self, k: int) -> float:
        """Start from model A as it is: its layers kept in the first repetition, the rest dropped."""
        return 0.5 if k < self.sources[0].layers else -0.5

    # ---- decoding -----------------------------------------------------------------------
    def path(self, genome: np.ndarray) -> list[Step]:
        genome = self.check_genome(genome)
        indicator = genome[: self.t]
        scales = genome[self.t :]
        kept = [k for k in range(self.t) if indicator[k] > 0]
        a = self.sources[0]
        first_a, last_a = 0, a.layers - 1
        layer_ids = [k % self.m for k in kept]
        slots: list[int | None] = list(kept)
        if self.spec.pin_ends:
            if not layer_ids or layer_ids[0] != first_a:
                layer_ids.insert(0, first_a)
                slots.insert(0, None)
            if layer_ids[-1] != last_a or len(layer_ids) == 1:
                layer_ids.append(last_a)
                slots.append(None)
        elif not layer_ids:
            layer_ids, slots = [first_a], [None]

        steps: list[Step] = []
        cumulative = 1.0
        for t, (layer_id, slot) in enumerate(zip(layer_ids, slots, strict=True)):
            if t == 0:
                scale = 1.0
            elif self.spec.scales == "per_slot":
                scale = float(scales[slot]) if slot is not None else 1.0
            else:
                scale = float(scales[layer_ids[t - 1] * self.m + layer_id])
            cumulative *= scale
            ref, layer = self.layer_table[layer_id]
            steps.append(Step(ref, layer, scale, cumulative))
        return steps

    def decode(self, genome: np.ndarray) -> Recipe:
        steps = self.path(genome)
        a = self.sources[0]
        slices = [OutputSlice(sources=[InputSlice(model=a.ref, layer_range=(0, 0))])]
        for step in steps:
            params = None
            if step.cumulative != 1.0:
                inverse = 1.0 / step.cumulative
                params = {"scale": [*({"filter": name, "value": inverse} for name in RESIDUAL_OUTPUTS), {"value": 1.0}]}
            slices.append(OutputSlice(sources=[InputSlice(model=step.model, layer_range=(step.layer, step.layer + 1), parameters=params)]))
        slices.append(OutputSlice(sources=[InputSlice(model=a.ref, layer_range=(a.layers, a.layers))]))
        block = EvomergeBlock(
            dfs_path=[{"model": s.model, "layer": s.layer, "input_scale": s.input_scale, "cumulative_scale": s.cumulative} for s in steps]
        )
        return Recipe(merge_method="passthrough", slices=slices, dtype=self.spec.dtype, evomerge=block)


def _check_sources(sources: list[SourceModel], file: str | None) -> None:
    if not sources:
        raise ConfigError("a data-flow space needs at least one model", file=file, field="models")
    for source in sources:
        archs = architectures_of(source.config) or [str(source.config.get("model_type", "unknown"))]
        if not set(archs) & set(DFS_ARCHITECTURES):
            raise ConfigError(
                f"model '{source.ref}' is {archs[0]}; data-flow merging supports {', '.join(DFS_ARCHITECTURES)} "
                "(pre-norm decoder layers with scale-invariant norms whose residual branches end in o_proj and down_proj)",
                file=file,
                field="models",
            )
    sizes = {s.ref: s.config.get("hidden_size") for s in sources}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{ref}: {size}" for ref, size in sizes.items())
        raise ConfigError(f"data-flow merging needs one hidden size across the models ({listing})", file=file, field="models")
