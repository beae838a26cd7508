"""Three bfloat16 fine-tunes of a Llama of TinyLlama-1.1B's shape, built tensor by tensor.

A base (seeded normal weights, norms at one) and three fine-tunes (base + a small seeded delta,
a different scale each), written as Hugging Face checkpoints: config.json of a
LlamaForCausalLM, 1 GB safetensors shards with model.safetensors.index.json, and a small
word-level tokenizer (tokenizer.json + tokenizer_config.json that AutoTokenizer loads offline).

Nothing holds a whole model: each tensor of the base is drawn once (from a generator seeded by
the spec's seed and the tensor's index), written to the base's shard, and each fine-tune's
version of it (base + delta) is written to that fine-tune's shard before the next tensor is
drawn. Peak memory is a few copies of the largest tensor (the embedding).

The four checkpoints are cached in a folder named by a hash of the spec (shape, seed, deltas,
builder version) and reused when complete; a build goes to a temporary folder renamed into
place at the end. Needs torch, safetensors, transformers/tokenizers and evomerge's safetensors
writer (numpy): no Ray, no lm-eval, no network, so gpu_check.py can build on a bare GPU node.

    python experiments/benchmarks/llama_shapes.py [--layers N] [--root DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evomerge.fsutil import cache_dir  # noqa: E402
from evomerge.merge.layout import llama_tensor_shapes  # noqa: E402
from evomerge.merge.stfile import SafetensorsWriter, header_room, shard_groups  # noqa: E402

BUILDER_VERSION = 1
NAMES = ("base", "ft1", "ft2", "ft3")
SHARD_BYTES = 1 << 30
_MARKER = ".built"
# written first into a folder this builder makes: only a folder holding it is ever removed
_OWNER = ".llama_shapes"

# The tokenizer's words: enough for the benchmark's task documents (anything else is <unk>).
WORDS = (
    "the a an of to and in is was it that on for with as at by from this be are or not have had "
    "one two three four five six seven eight nine ten red blue green black white big small cat dog "
    "bird fish sun moon sky sea tree house car road book water fire stone light dark day night cold "
    "hot up down left right yes no true false what which who where when how color number animal "
    "answer question"
).split()
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


# TinyLlama-1.1B's dimensions, and a small model of the same structure for smoke tests.
TINYLLAMA = {"hidden": 2048, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000}
SMALL = {"hidden": 256, "heads": 8, "kv_heads": 2, "intermediate": 704, "vocab": 4000}


@dataclass(frozen=True)
class LlamaSpec:
    """The checkpoints' shape (TinyLlama-1.1B's by default, `small` for smoke tests) and seeds."""

    layers: int = 22
    small: bool = False
    seed: int = 0
    init_std: float = 0.02
    delta_stds: tuple[float, ...] = (0.002, 0.0025, 0.0015)

    @property
    def dims(self) -> dict[str, int]:
        return SMALL if self.small else TINYLLAMA

    @property
    def kv_dim(self) -> int:
        return self.dims["hidden"] // self.dims["heads"] * self.dims["kv_heads"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.dims
        return llama_tensor_shapes(hidden=d["hidden"], intermediate=d["intermediate"], layers=self.layers,
                                   vocab=d["vocab"], kv_dim=self.kv_dim)

    def parameters(self) -> int:
        return sum(_numel(s) for s in self.shapes().values())

    def model_bytes(self) -> int:
        return 2 * self.parameters()

    def description(self) -> dict:
        """What the cache key covers: every dimension, the seeds and the builder's version."""
        return {**self.dims, "layers": self.layers, "seed": self.seed, "init_std": self.init_std,
                "delta_stds": list(self.delta_stds), "version": BUILDER_VERSION}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.description(), sort_keys=True).encode()).hexdigest()[:12]

    def hf_config(self) -> dict:
        d = self.dims
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d["hidden"],
            "intermediate_size": d["intermediate"], "num_hidden_layers": self.layers,
            "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"],
            "vocab_size": d["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": self.init_std,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
            "use_cache": True,
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def default_root() -> Path:
    return cache_dir() / "bench" / "llama"


def model_dirs(spec: LlamaSpec, root: Path | None = None) -> dict[str, Path]:
    folder = (root or default_root()) / f"llama-{spec.key()}"
    return {name: folder / name for name in NAMES}


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``shard_bytes`` of bf16 (or one tensor)."""
    names = list(shapes)
    return [[names[i] for i in group] for group in shard_groups([2 * _numel(shapes[n]) for n in names], shard_bytes)]


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over WORDS (ids 0-3 are <pad> <s> </s> <unk>), loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS, *"0123456789.,?!:"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=2048)
    tokenizer.save_pretrained(folder)


def _draw(spec: LlamaSpec, index: int, shape: tuple[int, ...], std: float, stream: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + stream * 100_003 + index)
    return torch.randn(shape, generator=gen).mul_(std)


def _remove_own(folder: Path) -> None:
    """Remove `folder` if this builder made it; refuse (exit 2) to touch anything else there."""
    if not folder.exists():
        return
    if not (folder / _OWNER).is_file():
        sys.exit(f"error: {folder}: exists and was not made by llama_shapes.py; move it or pass another --root")
    shutil.rmtree(folder)


def build(spec: LlamaSpec, root: Path | None = None, log: bool = True) -> dict[str, Path]:
    """The four checkpoints of ``spec`` (base, ft1..ft3), built unless already cached."""
    dirs = model_dirs(spec, root)
    folder = dirs["base"].parent
    if (folder / _MARKER).is_file():
        return dirs
    tmp = folder.with_name(folder.name + ".partial")
    _remove_own(tmp)
    tmp.mkdir(parents=True)
    (tmp / _OWNER).write_text("built by experiments/benchmarks/llama_shapes.py\n")
    outs = {name: tmp / name for name in NAMES}
    for out in outs.values():
        out.mkdir(parents=True)
    shapes = spec.shapes()
    shards = shard_plan(shapes)
    start = time.perf_counter()
    if log:
        print(f"building 4 x {spec.parameters() / 1e9:.2f}B-parameter bf16 Llama checkpoints in {folder} ...", flush=True)
    index = {name: i for i, name in enumerate(shapes)}
    weight_map: dict[str, str] = {}
    for s, names in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        writers = {m: SafetensorsWriter(outs[m] / file, header_room(names)) for m in NAMES}
        for name in names:
            shape = shapes[name]
            i = index[name]
            base = torch.ones(shape) if len(shape) == 1 else _draw(spec, i, shape, spec.init_std, 0)
            writers["base"].add(name, base.to(torch.bfloat16))
            for k, model in enumerate(NAMES[1:]):
                delta = _draw(spec, i, shape, spec.delta_stds[k], k + 1)
                writers[model].add(name, delta.add_(base).to(torch.bfloat16))
                del delta
            weight_map[name] = file
        for writer in writers.values():
            writer.finish()
        if log:
            print(f"  shard {s + 1}/{len(shards)} written ({time.perf_counter() - start:.0f} s)", flush=True)
    total = spec.model_bytes()
    for out in outs.values():
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (out / "config.json").write_text(json.dumps(spec.hf_config(), indent=2))
        save_tokenizer(out)
    (tmp / "spec.json").write_text(json.dumps(spec.description(), indent=2))
    (tmp / _MARKER).write_text("ok\n")
    _remove_own(folder)  # a half-built leftover of this builder (no `_MARKER`)
    tmp.rename(folder)
    if log:
        print(f"  built in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
    return dirs


def spec_from_args(args: argparse.Namespace) -> LlamaSpec:
    spec = LlamaSpec(small=bool(getattr(args, "small", False)))
    return spec if args.layers is None else replace(spec, layers=args.layers)


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=None, help="layer count (default 22, TinyLlama's)")
    parser.add_argument("--small", action="store_true", help="hidden 256, vocab 4000: a smoke-test model of the same structure")
    parser.add_argument("--root", type=Path, default=None, help=f"cache folder (default {default_root()})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(parser)
    args = parser.parse_args()
    for name, path in build(spec_from_args(args), args.root).items():
        print(f"{name}: {path}")
