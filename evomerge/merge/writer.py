"""Write a merge as a Hugging Face model directory.

Layout: `config.json` (layer count set for slices), `model.safetensors` or shards with
`model.safetensors.index.json` past the size limit, the tokenizer files of `tokenizer_source`
(or the base / first model), `generation_config.json` when the reference has one, the recipe as
`mergekit_config.yml`, and a README model card. What happens to an existing target directory
(refused unless evomerge wrote it or `force`; only the model's files are ever replaced) and how
the files are staged then moved into place: `evomerge.modeldir`.

The tensors come from the torch engine, or, for plans it reproduces exactly (linear and
task_arithmetic on safetensors sources; bfloat16 with the compiled kernels of
`evomerge.merge.native`), from the numpy executor in `evomerge.merge.fast`: then `evomerge
merge` never imports torch, which alone costs seconds. Either writes straight into the
memory-mapped output files where their layout can be told ahead (`_merge_into_files`).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.memory import available_memory
from evomerge.merge.hfconfig import complete_checkpoint
from evomerge.merge.plan import MergePlan, plan_merge
from evomerge.merge.sources import SourcePool, prefault
from evomerge.merge.stfile import (
    CODE_DTYPES,
    CODE_ITEM_BYTES,
    DTYPE_CODES,
    MappedSafetensorsFile,
    SafetensorsWriter,
    Unallocatable,
    header_room,
    shard_groups,
)
from evomerge.modeldir import check_target, model_dir_writer
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.merge.sparsify import Sparsifier

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
    engine: str = "auto",
    force: bool = False,
    card: Callable[[Recipe, dict[str, str]], str] | None = None,
    card_extra: str = "",
) -> Path:
    """Merge and write; returns the model directory. Raises before writing anything if the
    recipe does not fit its sources or `out_dir` is refused (a non-empty directory evomerge did
    not write, unless `force`; a file; a source's directory: `evomerge.modeldir`).

    ``engine``: "torch", "numpy" (`evomerge.merge.fast`; ValueError when it does not cover the
    plan) or "auto" (numpy where it covers the plan, else torch; both give the same tensors).
    ``card``: the model card from the recipe and its sources' content hashes (default
    `model_card`); ``card_extra`` is appended to it.
    """
    out_dir = Path(out_dir).resolve()
    check_target(out_dir, force)
    plan = plan_merge(recipe, pool)
    numpy_covers = _numpy_covers(plan, pool, engine)
    hashes = {ref: pool.get(ref).content_hash() for ref in recipe.model_refs()}
    for ref in recipe.model_refs():
        if pool.get(ref).path.resolve() == out_dir:
            raise ConfigError(f"is the directory of the source model '{ref}'; writing there would replace it: choose another directory", file=str(out_dir))
    recipe = recipe.with_evomerge(source_hashes=hashes)
    with model_dir_writer(out_dir, force=force) as tmp:
        if not _merge_into_files(plan, pool, tmp, max_shard_bytes, progress, numpy=numpy_covers, sparsifier=sparsifier):
            _write_weights(plan, _executor(plan, pool, sparsifier, numpy=numpy_covers), tmp, max_shard_bytes, progress)
        _write_config(plan, pool, tmp)
        _copy_tokenizer(recipe, plan, pool, tmp)
        (tmp / "mergekit_config.yml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text((card(recipe, hashes) if card else model_card(recipe, hashes, scores)) + card_extra)
    return out_dir


def _executor(plan: MergePlan, pool: SourcePool, sparsifier: Sparsifier | None, *, numpy: bool) -> Iterator[tuple[str, Any]]:
    """The merged tensors of ``plan``, in plan order, from the numpy executor (``numpy``: it
    covers the plan, `_numpy_covers`) or the torch engine (lazily: nothing is merged before
    the caller iterates)."""
    if numpy:
        from evomerge.merge import fast

        return fast.iter_merged(plan, pool, recycle=True)  # the writer is done with each tensor at once
    from evomerge.merge.engine import iter_merged

    return iter_merged(plan, pool, sparsifier)


def _numpy_covers(plan: MergePlan, pool: SourcePool, engine: str) -> bool:
    """Whether the numpy executor is to merge: ``engine`` allows it and it covers the plan."""
    if engine not in ("auto", "torch", "numpy"):
        raise ValueError(f"engine must be 'auto', 'torch' or 'numpy', got {engine!r}")
    if engine == "torch":
        return False
    # imported when used: the numpy executor spares `import torch` (seconds)
    from evomerge.merge import fast

    reason = fast.unsupported_reason(plan, pool)
    if reason is not None and engine == "numpy":
        raise ValueError(f"the numpy executor does not cover this merge: {reason}")
    return reason is None


def _merge_into_files(
    plan: MergePlan,
    pool: SourcePool,
    out: Path,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
    *,
    numpy: bool,
    sparsifier: Sparsifier | None = None,
) -> bool:
    """Merge straight into the output files: laid out first (the same shards and bytes as
    `_write_weights` gives), allocated and memory-mapped, each task writing its result into its
    file's pages (the numpy executor when ``numpy``, else the torch engine). No merged tensor
    is held in memory of its own and nothing is copied into the files afterwards, which is most
    of what writing costs. The torch engine imports torch first (seconds): meanwhile a thread
    maps the sources' pages and the output's (`sources.prefault`), work the merge would
    otherwise do in page faults. Beside the numpy executor, already merging, that thread would
    only compete with it for the same pages.

    False, with nothing left in ``out``, when the output dtypes cannot be told before merging
    (sources not all safetensors files, mixed dtypes without `dtype`/`out_dtype`), the file
    system cannot allocate ahead, or a method returns another dtype or shape than laid out:
    the caller then streams."""
    layout = _output_layout(plan, pool)
    if layout is None:
        return False
    room = header_room([task.name for task in plan.tasks])
    files: list[MappedSafetensorsFile] = []
    try:
        for i, group in enumerate(_shard_groups(layout, max_shard_bytes)):
            files.append(MappedSafetensorsFile(out / f"shard-{i:05d}.tmp", room, group))
    except Unallocatable:
        _drop(files)
        return False
    except BaseException:
        _drop(files)
        raise
    warming = None if numpy else _prefault(plan, pool, files)
    try:
        filled = _fill_numpy(plan, pool, files, progress) if numpy else _fill_torch(plan, pool, files, progress, sparsifier)
    except BaseException:
        _drop(files)
        raise
    finally:
        if warming is not None:
            warming.join()
    if not filled:
        _drop(files)
        return False
    for file in files:
        file.finish()
    _name_shards(out, [(file.path.name, list(file.entries)) for file in files], sum(file.nbytes for file in files))
    return True


def _fill_numpy(
    plan: MergePlan, pool: SourcePool, files: list[MappedSafetensorsFile], progress: Callable[[int, int], None] | None
) -> bool:
    """`_fill_torch` with the numpy executor (`fast.merge_into`), whose dtypes are the torch
    engine's by construction."""
    from evomerge.merge import fast

    targets: dict[str, Any] = {}
    for file in files:
        for name in file.entries:
            mapped, begin, size = file.region(name)
            targets[name] = memoryview(mapped)[begin : begin + size] if size else bytearray()
    for done, _ in enumerate(fast.merge_into(plan, pool, targets), start=1):
        if progress:
            progress(done, len(plan.tasks))
    return True  # the maps close once ``targets`` is gone


def _fill_torch(
    plan: MergePlan,
    pool: SourcePool,
    files: list[MappedSafetensorsFile],
    progress: Callable[[int, int], None] | None,
    sparsifier: Sparsifier | None,
) -> bool:
    """Merge every task into its region of ``files`` with the torch engine; False when a
    result's dtype or shape is not its region's."""
    import torch  # the torch engine merges; imported here, as `_executor` does

    from evomerge.merge.engine import TargetMismatch, merge_into

    targets = {}
    for file in files:
        for name, info in file.entries.items():
            mapped, begin, size = file.region(name)
            dtype = getattr(torch, CODE_DTYPES[info["dtype"]])
            targets[name] = (
                torch.frombuffer(mapped, dtype=dtype, count=size // dtype.itemsize, offset=begin).view(info["shape"])
                if size else torch.empty(info["shape"], dtype=dtype)
            )
    try:
        for done, _ in enumerate(merge_into(plan, pool, targets, sparsifier, exact_dtype=True), start=1):
            if progress:
                progress(done, len(plan.tasks))
    except TargetMismatch:
        return False
    return True  # the maps close once ``targets`` is gone


def _drop(files: list[MappedSafetensorsFile]) -> None:
    for file in files:
        file.abort()
        file.path.unlink(missing_ok=True)


def _prefault(plan: MergePlan, pool: SourcePool, files: list[MappedSafetensorsFile]) -> threading.Thread | None:
    """Map the sources' pages (to read) and the output's (to write) on a thread, when together
    they are at most half of the memory available: beyond that, pages mapped ahead could be
    evicted before their use."""
    refs = dict.fromkeys(ref.model for task in plan.tasks for ref in task.refs)
    reads = [m for ref in refs for m in pool.get(ref).mapped_files()]
    writes = [file.map for file in files if file.map is not None]
    if sum(len(m) for m in reads + writes) > available_memory() // 2:
        return None
    return prefault(reads, writes)


def _output_layout(plan: MergePlan, pool: SourcePool) -> list[tuple[str, str, tuple[int, ...]]] | None:
    """(name, dtype, shape) of every output tensor in plan order, as the torch engine yields
    them: the plan's output dtype, else the one dtype its inputs are merged in; None when that
    cannot be told without merging."""
    layout = []
    for task in plan.tasks:
        refs = task.refs
        sources = [pool.get(ref.model) for ref in refs]
        if not refs or not all(source.in_files for source in sources):
            return None
        entries = [source.entry(ref.name) for source, ref in zip(sources, refs, strict=True)]
        dtypes = {plan.compute_dtype_name or entry.dtype for entry in entries}
        dtype = plan.out_dtype_name or (next(iter(dtypes)) if len(dtypes) == 1 else None)
        if dtype not in DTYPE_CODES:
            return None
        layout.append((task.name, dtype, entries[0].shape))
    return layout


def _shard_groups(layout: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """``layout`` cut into shards as `_write_weights` cuts the stream."""
    sizes = [math.prod(shape) * CODE_ITEM_BYTES[DTYPE_CODES[dtype]] for _, dtype, shape in layout]
    return [[layout[i] for i in group] for group in shard_groups(sizes, max_shard_bytes)]


def _write_weights(
    plan: MergePlan,
    tensors: Iterator[tuple[str, Any]],
    out: Path,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Stream merged tensors into shards of at most `max_shard_bytes` (one file when it fits).

    Each tensor is written as soon as it is merged, while the engine's threads merge the next
    ones, so writing overlaps merging and memory holds only a few merged tensors at a time.
    """
    room = header_room([task.name for task in plan.tasks])
    shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
    writer: SafetensorsWriter | None = None
    total_bytes = 0
    try:
        for done, (name, tensor) in enumerate(tensors, start=1):
            size = tensor.nbytes
            if writer is not None and writer.entries and writer.offset + size > max_shard_bytes:
                writer.finish()
                writer = None
            if writer is None:
                tmp_name = f"shard-{len(shards):05d}.tmp"
                writer = SafetensorsWriter(out / tmp_name, room)
                shards.append((tmp_name, []))
            total_bytes += writer.add(name, tensor)
            shards[-1][1].append(name)
            del tensor
            if progress:
                progress(done, len(plan.tasks))
        if writer is None:  # nothing to merge: an empty, valid file
            writer = SafetensorsWriter(out / "shard-00000.tmp", room)
            shards.append(("shard-00000.tmp", []))
        writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    _name_shards(out, shards, total_bytes)


def _name_shards(out: Path, shards: list[tuple[str, list[str]]], total_bytes: int) -> None:
    """Give the written shards (temporary name, tensor names) their final names: one
    `model.safetensors`, or numbered shards and their index."""
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
    complete_checkpoint(out, pool.get(plan.reference).path)  # architectures, dtype, generation config


def _copy_tokenizer(recipe: Recipe, plan: MergePlan, pool: SourcePool, out: Path) -> None:
    source = recipe.tokenizer_source
    ref = plan.reference if source in (None, "base", "union") else source
    folder = pool.get(ref).path
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)


def model_card(recipe: Recipe, hashes: dict[str, str], scores: dict[str, float] | None = None) -> str:
    """A README for the merged model: how it was made, from what, and how it scored; its front
    matter is Hugging Face Hub metadata (`base_model`: the recipe's models as it names them)."""
    lines = [
        "---",
        f"base_model: {json.dumps(list(hashes))}",
        "base_model_relation: merge",
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
