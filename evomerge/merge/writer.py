"""Write a merge as a Hugging Face model directory.

Layout: `config.json` (layer count set for slices), `model.safetensors` or shards with
`model.safetensors.index.json` past the size limit, the tokenizer files of `tokenizer_source`
(or the base / first model), `generation_config.json` when the reference has one, the recipe as
`mergekit_config.yml`, and a README model card. The directory appears whole or not at all: it is
written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from evomerge.merge.engine import MergePlan, iter_merged, plan_merge
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import Sparsifier
from evomerge.recipe import Recipe

DEFAULT_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def write_model(
    recipe: Recipe,
    pool: SourcePool,
    out_dir: str | Path,
    *,
    sparsifier: Sparsifier | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    scores: dict[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge and write; returns the model directory. Raises before writing anything if the
    recipe does not fit its sources."""
    out_dir = Path(out_dir).resolve()
    plan = plan_merge(recipe, pool)
    hashes = {ref: pool.get(ref).content_hash() for ref in recipe.model_refs()}
    recipe = recipe.with_evomerge(source_hashes=hashes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_weights(plan, pool, tmp, sparsifier, max_shard_bytes, progress)
        _write_config(plan, pool, tmp)
        _copy_tokenizer(recipe, plan, pool, tmp)
        (tmp / "mergekit_config.yml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe, hashes, scores))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class _ShardWriter:
    """Streams tensors into one safetensors file as they are merged (no second copy in memory).

    The header goes in front of the data but is only known at the end, so ``header_room``
    bytes are reserved for it (an upper bound from the plan) and the header is padded with
    spaces to fill them, as the format allows.
    """

    def __init__(self, path: Path, header_room: int):
        self.path = path
        self.room = header_room
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.file.seek(8 + header_room)
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> int:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        start, self.offset = self.offset, self.offset + data.nbytes
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [start, self.offset]}
        return data.nbytes

    def finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.room:  # cannot happen with the plan's bound; fail loudly rather than corrupt
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {self.room} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + header + b" " * (self.room - len(header)))
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def _header_room(plan: MergePlan) -> int:
    """Upper bound on the JSON header of any shard: every tensor with 20-digit offsets."""
    per_entry = len('"":{"dtype":"BOOL","shape":[],"data_offsets":[,]},') + 2 * 20
    total = len('{"__metadata__":{"format":"pt"},}') + 64
    for task in plan.tasks:
        total += per_entry + len(json.dumps(task.name)) + 21 * 8  # up to 8 dims of 20 digits
    return (total + 7) // 8 * 8  # data stays 8-byte aligned


def _write_weights(
    plan: MergePlan,
    pool: SourcePool,
    out: Path,
    sparsifier: Sparsifier | None,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Stream merged tensors into shards of at most `max_shard_bytes` (one file when it fits).

    Each tensor is written as soon as it is merged, while the engine's threads merge the next
    ones, so writing overlaps merging and memory holds only a few merged tensors at a time.
    """
    room = _header_room(plan)
    shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
    writer: _ShardWriter | None = None
    total_bytes = 0
    try:
        for done, (name, tensor) in enumerate(iter_merged(plan, pool, sparsifier), start=1):
            size = tensor.numel() * tensor.element_size()
            if writer is not None and writer.entries and writer.offset + size > max_shard_bytes:
                writer.finish()
                writer = None
            if writer is None:
                tmp_name = f"shard-{len(shards):05d}.tmp"
                writer = _ShardWriter(out / tmp_name, room)
                shards.append((tmp_name, []))
            total_bytes += writer.add(name, tensor)
            shards[-1][1].append(name)
            del tensor
            if progress:
                progress(done, len(plan.tasks))
        if writer is None:  # nothing to merge: an empty, valid file
            writer = _ShardWriter(out / "shard-00000.tmp", room)
            shards.append(("shard-00000.tmp", []))
        writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    if len(shards) == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (tmp_name, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / tmp_name).rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(plan: MergePlan, pool: SourcePool, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True))
    generation = pool.get(plan.reference).path / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, out / "generation_config.json")


def _copy_tokenizer(recipe: Recipe, plan: MergePlan, pool: SourcePool, out: Path) -> None:
    source = recipe.tokenizer_source
    ref = plan.reference if source in (None, "base", "union") else source
    folder = pool.get(ref).path
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)


def model_card(recipe: Recipe, hashes: dict[str, str], scores: dict[str, float] | None = None) -> str:
    """A README for the merged model: how it was made, from what, and how it scored."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge, mergekit]",
        "---",
        "# Merged model",
        "",
        f"Made by evomerge with the `{recipe.merge_method}` merge method.",
        "",
        "## Sources",
        "",
        "| model | content hash |",
        "|---|---|",
    ]
    lines += [f"| `{ref}` | `{digest}` |" for ref, digest in hashes.items()]
    if recipe.evomerge is not None:
        lines += ["", f"Seed: {recipe.seed}"]
    if scores:
        lines += ["", "## Scores", "", "| split / objective | score |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
    lines += ["", "## Recipe (mergekit configuration)", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
