"""The to-disk writer merges straight into memory-mapped output files, and writes what streaming writes.

`write_model` lays the output files out first and lets the torch engine write each merged tensor
into its file's pages (`writer._merge_into_files`). For every method of the mergekit parity
fixtures, in the recipes' dtype, in bfloat16, in the sources' own dtype and with an `out_dtype`,
the files must be byte for byte those of the streaming path (merged tensors written one after
another, `writer._write_weights`), shards and index included. Where the layout cannot be told
before merging, or the file system cannot allocate ahead, the writer streams instead and leaves
nothing of the attempt behind.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.merge import fast, writer
from evomerge.merge.plan import plan_merge
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.recipe import Recipe

from .test_mergekit_parity import fixtures

SHARD_BYTES = 12_000  # the fixtures' models (~48 KB in float32) take a few shards at this size


def _recipe(name: str, dtype: str | None, out_dtype: str | None = None) -> Recipe:
    text = (fixtures.RECIPES / f"{name}.yaml").read_text().replace("{models}", str(fixtures.MODELS))
    data = yaml.safe_load(text)
    data.pop("dtype", None)
    if dtype is not None:
        data["dtype"] = dtype
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    return Recipe.parse(data)


def _both_paths(recipe: Recipe, tmp_path: Path) -> tuple[Path, Path]:
    pool = SourcePool()
    plan = plan_merge(recipe, pool)
    mapped, streamed = tmp_path / "mapped", tmp_path / "streamed"
    mapped.mkdir()
    streamed.mkdir()
    assert writer._merge_into_files(plan, pool, mapped, SHARD_BYTES, None, numpy=False), "the layout is known: it must map"
    writer._write_weights(plan, writer._executor(plan, pool, None, numpy=False), streamed, SHARD_BYTES, None)
    if fast.unsupported_reason(plan, pool) is None:  # the numpy executor maps the same files
        numpy_mapped = tmp_path / "numpy_mapped"
        numpy_mapped.mkdir()
        assert writer._merge_into_files(plan, pool, numpy_mapped, SHARD_BYTES, None, numpy=True)
        _assert_same_files(numpy_mapped, streamed)
    return mapped, streamed


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", None])
@pytest.mark.parametrize("name", sorted(fixtures.parity_recipes()))
def test_mapped_files_are_the_streamed_files(name: str, dtype: str | None, tmp_path: Path) -> None:
    mapped, streamed = _both_paths(_recipe(name, dtype), tmp_path)
    assert (mapped / "model.safetensors.index.json").exists() or (mapped / "model.safetensors").exists()
    _assert_same_files(mapped, streamed)


@pytest.mark.parametrize("name", ["ties", "slerp", "passthrough_scale", "dare_linear"])
def test_mapped_files_with_out_dtype_and_sharding(name: str, tmp_path: Path) -> None:
    mapped, streamed = _both_paths(_recipe(name, "float32", out_dtype="float16"), tmp_path)
    assert len(list(mapped.glob("model-*-of-*.safetensors"))) > 1
    _assert_same_files(mapped, streamed)
    assert {t.dtype for t in load_file(str(next(mapped.glob("model-00001-*")))).values()} == {torch.float16}


def _half_source(src: Path, out: Path) -> Path:
    """A copy of a fixture model stored in float16 (the others stay float32)."""
    out.mkdir()
    for item in src.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            (out / item.name).write_bytes(item.read_bytes())
    for file in src.glob("*.safetensors"):
        save_file({k: v.to(torch.float16) for k, v in load_file(str(file)).items()}, str(out / file.name), metadata={"format": "pt"})
    return out


def test_mixed_dtypes_without_a_dtype_are_streamed(tmp_path: Path) -> None:
    """Sources of different dtypes and no `dtype`: the output dtype is the methods' to say, so
    nothing is laid out ahead; `write_model` streams and writes what `materialize` gives."""
    half = _half_source(fixtures.MODELS / "ft2", tmp_path / "ft2_half")
    data = yaml.safe_load(_recipe("ties", None).to_yaml())
    data["models"][1]["model"] = str(half)
    recipe = Recipe.parse(data)
    pool = SourcePool()
    plan = plan_merge(recipe, pool)
    probe = tmp_path / "probe"
    probe.mkdir()
    assert writer._output_layout(plan, pool) is None
    assert not writer._merge_into_files(plan, pool, probe, SHARD_BYTES, None, numpy=False)
    assert list(probe.iterdir()) == []
    out = write_model(recipe, SourcePool(), tmp_path / "out", engine="torch")
    from evomerge.merge.engine import materialize

    want = materialize(recipe, SourcePool())
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_a_file_system_that_cannot_allocate_ahead_gets_the_streamed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without posix_fallocate (some network file systems) a mapped write past the disk's end
    would be a SIGBUS, so the writer streams; the files are the same."""
    recipe = _recipe("ties", "bfloat16")
    expected = write_model(recipe, SourcePool(), tmp_path / "mapped", max_shard_bytes=SHARD_BYTES)

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    pool = SourcePool()
    probe = tmp_path / "probe"
    probe.mkdir()
    assert not writer._merge_into_files(plan_merge(recipe, pool), pool, probe, SHARD_BYTES, None, numpy=False)
    assert list(probe.iterdir()) == []
    streamed = write_model(recipe, SourcePool(), tmp_path / "streamed", max_shard_bytes=SHARD_BYTES)
    _assert_same_files(expected, streamed)


def test_merge_into_exact_dtype_refuses_a_cast() -> None:
    """`merge_into(exact_dtype=True)` raises where a result would be cast into its target (the
    writer's fallback rests on it); without it the result is cast, as for a skeleton."""
    from evomerge.merge.engine import TargetMismatch, materialize, merge_into

    recipe = _recipe("ties", "float32")
    want = materialize(recipe, SourcePool())
    targets = {name: torch.empty_like(tensor, dtype=torch.float16) for name, tensor in want.items()}
    pool = SourcePool()
    with pytest.raises(TargetMismatch, match="merged as torch.float32"):
        list(merge_into(plan_merge(recipe, pool), pool, targets, exact_dtype=True))
    pool = SourcePool()
    assert list(merge_into(plan_merge(recipe, pool), pool, targets)) == list(want)
    assert all(torch.equal(targets[name], tensor.to(torch.float16)) for name, tensor in want.items())


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_READ is Linux's")
def test_prefault_maps_a_sources_pages_ahead_and_lets_them_close(tmp_path: Path) -> None:
    """`sources.prefault` maps the files' pages into the process on a thread (the RSS grows by
    their size before any tensor is read or written); after it the maps close as usual."""
    import psutil

    from evomerge.merge.sources import Source, prefault

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    save_file({"w": torch.ones(4 * 1024 * 1024)}, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "model.safetensors").read_bytes()  # in the page cache, as a merge's sources are
    source = Source("m", model)
    maps = source.mapped_files()
    assert len(maps) == 1 and len(maps[0]) > 16 * 1024 * 1024
    if tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2]) < (5, 14):
        pytest.skip("madvise(MADV_POPULATE_READ) came with Linux 5.14")
    before = psutil.Process().memory_info().rss
    thread = prefault(maps)
    assert thread is not None
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert psutil.Process().memory_info().rss - before > 12 * 1024 * 1024
    assert torch.equal(source.get("w"), torch.ones(4 * 1024 * 1024))
    maps[0].close()

    # an output file's map, to be written: its pages are allocated ahead and read as zeros
    from evomerge.merge.stfile import MappedSafetensorsFile, header_room, read_header

    out = MappedSafetensorsFile(tmp_path / "out.safetensors", header_room(["o"]), [("o", "float32", (4 * 1024 * 1024,))])
    before = psutil.Process().memory_info().rss
    thread = prefault([], [out.map])
    assert thread is not None
    thread.join(timeout=60)
    assert psutil.Process().memory_info().rss - before > 12 * 1024 * 1024
    out.finish()
    entry = read_header(tmp_path / "out.safetensors")["o"]
    assert load_file(str(tmp_path / "out.safetensors"))["o"].count_nonzero() == 0 and entry.shape == (4 * 1024 * 1024,)
