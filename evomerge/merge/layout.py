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


def llama_tensor_shapes(*, hidden: int, intermediate: int, layers: int, vocab: int, kv_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama checkpoint (untied head); `kv_dim` is the key/value
    projection width (grouped-query attention), `hidden` when None."""
    kv = hidden if kv_dim is None else kv_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes
