"""Source models: lazy, memory-mapped safetensors checkpoints behind one small pool.

A model reference is a local directory, a Hugging Face repo id (resolved through the local HF
cache, or downloaded when the hub is reachable), `zoo:PRESET/NAME`, or a name the caller
registers (`stage:NAME`, `archive:ID` during a run). Tensors are read on demand; a pool made with
`resident=True` keeps every tensor it has read, for search where the same sources are merged
again and again. Names, shapes and dtypes come from the safetensors headers, so opening sources
and planning a merge import no torch (`entry` tells a torch-free executor where the bytes are).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from evomerge.errors import SourceError
from evomerge.fsutil import atomic_write_text, cache_dir
from evomerge.merge.layout import LAYER_COUNT_KEYS
from evomerge.merge.stfile import TensorEntry, read_header

if TYPE_CHECKING:
    import torch

WEIGHT_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# How a user of the experiment files allows pickles; `evomerge merge` says `--allow-pickle`.
EXPERIMENT_PICKLE_SWITCH = "set allow_pickle: true in the experiment"


class Source:
    """One checkpoint: its config, where each tensor is stored, and the tensors on demand.

    Opening a source checks its files as far as that is cheap (config.json, every safetensors
    header against its file's size, the index against its shards, a pickle's loadability when
    pickles are allowed), so a damaged model directory is refused with a `SourceError` naming the
    file before any work starts. `pickle_switch` says how the caller's user allows pickles (named
    when a pickle-only model is refused; None: the entry point cannot).
    """

    def __init__(
        self,
        ref: str,
        path: Path,
        *,
        allow_pickle: bool = False,
        resident: bool = False,
        pickle_switch: str | None = EXPERIMENT_PICKLE_SWITCH,
    ):
        self.ref = ref
        self.path = path
        self.resident = resident
        self.config: dict = _read_config(ref, path)
        self._entries: dict[str, TensorEntry] = {}
        self._files = _weight_files(ref, path, allow_pickle, self._entries, pickle_switch)
        self._all_safetensors = all(f.suffix == ".safetensors" for f in set(self._files.values()))
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._hash: str | None = None

    # ---- tensor access ------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files or self._tied_alias(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._stored_name(name)
        if name in self._cache or self._files[name].suffix != ".safetensors":
            return tuple(self.get(name).shape)
        return self.entry(name).shape

    def entry(self, name: str) -> TensorEntry:
        """Where a (safetensors-stored) tensor's bytes are, with its dtype and shape; tied
        names resolve to the tensor they share."""
        name = self._stored_name(name)
        entry = self._entries.get(name)
        if entry is None:
            file = self._files[name]
            if file.suffix != ".safetensors":
                raise SourceError(f"model '{self.ref}': tensor '{name}' is not stored in a safetensors file")
            self._entries.update(read_header(file))
            entry = self._entries[name]
        return entry

    @property
    def in_files(self) -> bool:
        """True when every tensor is read from safetensors files (none adopted, none pickled)."""
        return not self._cache and self._pickled is None and self._all_safetensors

    def get(self, name: str) -> torch.Tensor:
        name = self._stored_name(name)
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if self._files[name].suffix != ".safetensors":
            tensor = self._load_pickled()[name]
        elif self.resident:  # its own memory, kept for the life of the source
            tensor = self._handle(self._files[name]).get_tensor(name)
        else:
            tensor = self._mapped(name)
        if self.resident:
            self._cache[name] = tensor
        return tensor

    def load_all(self) -> None:
        """Read every tensor now and keep it (resident sources for search)."""
        self.resident = True
        for name in self._files:
            self.get(name)

    def adopt(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serve these in-memory tensors instead of reading the files (e.g. zero-copy, read-only
        views of the Ray object store shared by a node's workers); names must be stored names."""
        unknown = [name for name in tensors if name not in self._files]
        if unknown:
            raise SourceError(f"model '{self.ref}' has no tensor '{unknown[0]}' to adopt")
        self.resident = True
        self._cache.update(tensors)

    @property
    def tied_embeddings(self) -> bool:
        tied = self.config.get("tie_word_embeddings")
        if tied is None:
            tied = "lm_head.weight" not in self._files
        return bool(tied)

    def _tied_alias(self, name: str) -> str | None:
        if name.endswith("lm_head.weight") and self.tied_embeddings:
            for candidate in ("model.embed_tokens.weight", "transformer.wte.weight", "model.embeddings.weight"):
                if candidate in self._files:
                    return candidate
        return None

    def _stored_name(self, name: str) -> str:
        if name in self._files:
            return name
        alias = self._tied_alias(name)
        if alias is None:
            raise SourceError(f"model '{self.ref}' has no tensor '{name}'")
        return alias

    def _mapped(self, name: str) -> torch.Tensor:
        """The tensor viewing its bytes in the file's private memory map: no copy, the pages are
        the page cache's until written (copy-on-write: a write never reaches the file)."""
        import torch  # only once a tensor is read

        entry = self.entry(name)
        dtype = getattr(torch, entry.dtype, None)
        if not isinstance(dtype, torch.dtype) or entry.end == entry.begin:  # an unknown code, or empty
            return self._handle(self._files[name]).get_tensor(name)
        mapped = self._map(entry.file)
        count = (entry.end - entry.begin) // dtype.itemsize
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=entry.begin)
        return flat.view(entry.shape)

    def _map(self, file: Path) -> mmap.mmap:
        mapped = self._maps.get(file)
        if mapped is None:
            with open(file, "rb") as handle:
                mapped = self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return mapped

    def mapped_files(self) -> list[mmap.mmap]:
        """The private maps of this source's safetensors files, made now where not yet (as
        reading a tensor would); none for a resident source, which reads into memory of its own."""
        if self.resident or not self.in_files:
            return []
        return [self._map(file) for file in sorted(set(self._files.values())) if os.path.getsize(file)]

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            # here: safe_open(framework='pt') loads torch; only once a tensor is read
            from safetensors import safe_open

            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle

    def _load_pickled(self) -> dict[str, torch.Tensor]:
        if self._pickled is None:
            state: dict[str, torch.Tensor] = {}
            for file in dict.fromkeys(self._files.values()):
                state.update(_load_pickle(self.ref, file))
            self._pickled = state
        return self._pickled

    # ---- identity -----------------------------------------------------------------------
    def content_hash(self) -> str:
        """Fingerprint of the weight files, cached by path, size and mtime."""
        if self._hash is None:
            self._hash = _files_hash(sorted(set(self._files.values())))
        return self._hash


class SourcePool:
    """Opens each referenced model once and hands out `Source` objects."""

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        resident: bool = False,
        aliases: Mapping[str, str | Path] | None = None,
        search_dirs: tuple[Path, ...] = (),
        pickle_switch: str | None = EXPERIMENT_PICKLE_SWITCH,
    ):
        self.allow_pickle = allow_pickle
        self.pickle_switch = pickle_switch
        self.resident = resident
        self.aliases: dict[str, Path] = {k: Path(v) for k, v in (aliases or {}).items()}
        self.search_dirs = search_dirs
        self._sources: dict[str, Source] = {}

    def register(self, ref: str, path: str | Path) -> None:
        """Make a name such as `stage:ps` or `archive:3` point at a model directory."""
        self.aliases[ref] = Path(path)
        self._sources.pop(ref, None)

    def get(self, ref: str) -> Source:
        source = self._sources.get(ref)
        if source is None:
            source = Source(
                ref, self.resolve(ref), allow_pickle=self.allow_pickle, resident=self.resident, pickle_switch=self.pickle_switch
            )
            self._sources[ref] = source
        return source

    def resident_bytes(self) -> int:
        """Bytes of the tensors the opened sources keep in memory (each stored tensor once)."""
        seen: dict[int, int] = {}
        for source in self._sources.values():
            for tensor in [*source._cache.values(), *(source._pickled or {}).values()]:
                seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def open_all(self, named: Iterable[tuple[str | None, str]]) -> list[Source]:
        """Open every `(field, reference)` now, so a missing or damaged model is refused before
        any work; the refusal names the field (the setting or option the reference came from)."""
        opened = []
        for field, ref in named:
            try:
                opened.append(self.get(ref))
            except SourceError as exc:
                raise exc.located(field=field) from None
        return opened

    def resolve(self, ref: str) -> Path:
        return resolve_model_ref(ref, aliases=self.aliases, search_dirs=self.search_dirs)


def resolve_model_ref(
    ref: str, *, aliases: Mapping[str, Path] | None = None, search_dirs: tuple[Path, ...] = ()
) -> Path:
    """Turn a model reference into a local directory, or raise a SourceError saying why not."""
    if not ref.strip():
        raise SourceError("the model reference is empty (expected a model directory, a Hugging Face repo id or zoo:PRESET/NAME)")
    if aliases and ref in aliases:
        return aliases[ref]
    if ref.startswith("zoo:"):
        # here: the zoo's builders import torch; only for zoo: references
        from evomerge.zoo import resolve_zoo_ref

        return resolve_zoo_ref(ref[len("zoo:"):])
    if ref.startswith(("stage:", "archive:")):
        raise SourceError(f"'{ref}' only exists inside a run (the stage or archive member it names is not known here)")
    expanded = Path(ref).expanduser()
    for candidate in (expanded, *(d / ref for d in search_dirs if not expanded.is_absolute())):
        if candidate.is_dir():
            return candidate.resolve()
        if candidate.exists():
            raise SourceError(f"model path '{ref}' is a file, not a model directory (config.json and weights)")
    looks_like_path = ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or not _REPO_ID.match(ref)
    if looks_like_path:
        raise SourceError(f"model path '{ref}' does not exist (expected a model directory, a Hugging Face repo id or zoo:PRESET/NAME)")
    return _from_hub(ref)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # slow to import: only for Hub ids

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        if offline:
            raise SourceError(
                f"model '{repo_id}' is not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise SourceError(
            f"model '{repo_id}' is not a local directory and could not be fetched from the Hugging Face hub ({exc.__class__.__name__})"
        ) from None


def _read_config(ref: str, path: Path) -> dict:
    """The model's config.json, checked: a JSON object whose layer count is a whole number."""
    file = path / "config.json"
    if not file.exists():
        raise SourceError(f"model '{ref}': {file} is missing; a model directory needs the config.json its weights were saved with")
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise SourceError(f"model '{ref}': cannot read {file} ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SourceError(f"model '{ref}': {file} is not valid JSON ({_first_line(exc)}); restore it from the model's source") from None
    if not isinstance(config, dict):
        raise SourceError(f"model '{ref}': {file} is not a JSON object (a config.json maps settings to values)")
    for scope in (config, config.get("text_config")):
        for key in LAYER_COUNT_KEYS:
            value = scope.get(key) if isinstance(scope, dict) else None
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SourceError(f"model '{ref}': {file}: {key} is {value!r}; it must be a whole number of layers")
    return config


def _weight_files(
    ref: str, path: Path, allow_pickle: bool, entries: dict[str, TensorEntry], pickle_switch: str | None
) -> dict[str, Path]:
    """Map every tensor name to the file that stores it (the safetensors headers read on the way,
    all of them, go to `entries`)."""
    index = path / WEIGHT_INDEX
    if index.is_file():
        files = _index_map(ref, index)
        for shard in dict.fromkeys(files.values()):
            header = _safetensors_header(ref, shard)
            absent = next((name for name, file in files.items() if file == shard and name not in header), None)
            if absent is not None:
                raise SourceError(f"model '{ref}': {index} places tensor '{absent}' in {shard}, which does not hold it; the index and its shards do not match")
            entries.update(header)
        return files
    singles = sorted(path.glob("*.safetensors"))
    if singles:
        files = {}
        for file in singles:
            header = _safetensors_header(ref, file)
            entries.update(header)
            files.update(dict.fromkeys(header, file))
        return files
    pickles = [path / name for name in PICKLE_NAMES if (path / name).is_file()]
    if pickles:
        if not allow_pickle:
            allow = f", or {pickle_switch} if you trust it" if pickle_switch else ""
            raise SourceError(
                f"model '{ref}' has only pickle weights ({pickles[0]}); pickles can run code when loaded: "
                f"convert it to safetensors{allow}"
            )
        return _pickle_files(ref, pickles[0])
    raise SourceError(f"model '{ref}' ({path}) has no weights (*.safetensors or {WEIGHT_INDEX})")


def _safetensors_header(ref: str, file: Path) -> dict[str, TensorEntry]:
    try:
        return read_header(file)
    except OSError as exc:
        raise SourceError(f"model '{ref}': cannot read {file} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise SourceError(f"model '{ref}': {file}: {exc}; restore the file from the model's source") from None


def _index_map(ref: str, index: Path) -> dict[str, Path]:
    """An index file's weight map (tensor name -> shard path), every shard present."""
    try:
        data = json.loads(index.read_text())
    except OSError as exc:
        raise SourceError(f"model '{ref}': cannot read {index} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise SourceError(f"model '{ref}': {index} is not valid JSON ({_first_line(exc)}); restore it from the model's source") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"model '{ref}': {index} has no weight_map (a mapping of tensor names to shard files)")
    files = {name: index.parent / file for name, file in weight_map.items()}
    missing = next((file for file in dict.fromkeys(files.values()) if not file.is_file()), None)
    if missing is not None:
        raise SourceError(f"model '{ref}': {missing} is missing ({index.name} names it); restore the shard from the model's source")
    return files


def _pickle_files(ref: str, first: Path) -> dict[str, Path]:
    if first.name.endswith(".index.json"):
        return _index_map(ref, first)
    return dict.fromkeys(_load_pickle(ref, first), first)


def _load_pickle(ref: str, file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded weights-only (even when pickles are allowed, never run
    arbitrary code); memory-mapped when the file is in torch's zip format, read whole when it is
    the pre-1.6 format (which cannot be mapped)."""
    import torch  # pickles only: safetensors sources are read without torch where possible

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:  # torch raises many types for a damaged or unsafe file; all mean "unusable"
        raise SourceError(
            f"model '{ref}': {file} cannot be loaded as a weights-only PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "it is damaged, or it holds more than tensors (convert it to safetensors where it was made)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SourceError(f"model '{ref}': {file} is not a state dict (a mapping of tensor names to tensors)")
    return dict(state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _files_hash(files: list[Path]) -> str:
    """xxh3-128 of the files' bytes: a content fingerprint at memory speed (a 7B checkpoint in a
    couple of seconds), cached so a source is read for it once."""
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    memo = cache_dir() / "hashes" / (hashlib.sha1(stamp.encode()).hexdigest() + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = xxhash.xxh3_128()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    value = "xxh3:" + digest.hexdigest()
    try:
        atomic_write_text(memo, value)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return value


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux >= 5.14; Python's mmap names them from 3.12


def prefault(reads: Sequence[mmap.mmap], writes: Sequence[mmap.mmap] = ()) -> threading.Thread | None:
    """Map the pages of ``reads`` (to be read) and ``writes`` (to be written: a shared map of a
    file, its pages allocated in the page cache) into this process on a thread of its own,
    ahead of their use.

    A merge that reads gigabytes through memory maps spends about a second per 8 GB in page
    faults alone (sys time), and writing through a map faults once per page too;
    `madvise(MADV_POPULATE_READ / _WRITE)` does that work in one call per map with the GIL
    released, so the thread can run while the main thread imports torch. The caller joins the
    thread before the maps may be closed. None where the call is unavailable (not Linux, an
    older kernel: the merge then faults the pages in as it goes).
    """
    if not (reads or writes) or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def populate() -> None:
        for maps, advice in ((writes, _MADV_POPULATE_WRITE), (reads, _MADV_POPULATE_READ)):
            for mapped in maps:
                start = ctypes.c_char.from_buffer(mapped)  # the map's address (a private map is writable too)
                try:
                    if madvise(ctypes.addressof(start), len(mapped), advice) != 0:
                        return  # EINVAL on an older kernel: nothing more to gain
                finally:
                    del start  # the map can be closed again

    thread = threading.Thread(target=populate, name="evomerge-prefault", daemon=True)
    thread.start()
    return thread
