"""Where tensors live in a checkpoint: embeddings before the layer stack, numbered layers, and
the final norm / head after it. Works from tensor names, so any decoder that numbers its blocks
under a known prefix (Llama, Mistral, Qwen2, Gemma, Phi, GPT-2, GPT-NeoX, ...) is covered."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(
    r"^(?P<prefix>(?:model\.)?(?:language_model\.)?(?:model\.layers|layers|transformer\.h|"
    r"gpt_neox\.layers|model\.decoder\.layers|transformer\.blocks))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class TensorPlace:
    """A tensor name split into its part of the model."""

    kind: str  # "pre" | "layer" | "post"
    prefix: str = ""
    index: int = -1
    rest: str = ""

    def name_at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def place_of(name: str) -> TensorPlace:
    match = _LAYER.match(name)
    if match:
        return TensorPlace("layer", match["prefix"], int(match["index"]), match["rest"])
    if any(hint in name for hint in _PRE_HINTS):
        return TensorPlace("pre")
    return TensorPlace("post")


def layer_count(config: dict) -> int | None:
    for key in LAYER_COUNT_KEYS:
        if key in config:
            return int(config[key])
    text = config.get("text_config")
    return layer_count(text) if isinstance(text, dict) else None


def with_layer_count(config: dict, count: int) -> dict:
    """A copy of an HF config with its layer count set (and per-layer lists cut to match)."""
    out = dict(config)
    for key in LAYER_COUNT_KEYS:
        if key in out:
            out[key] = count
    for key in ("layer_types",):
        if isinstance(out.get(key), list) and out[key]:
            pattern = out[key]
            out[key] = [pattern[i % len(pattern)] for i in range(count)]
    return out
