"""Optimizer state as plain JSON-able data.

`Optimizer.state_dict()` returns a dict of JSON types only (it goes into the run's checkpoint):
numpy arrays are stored exactly as base64 of their little-endian bytes, numpy Generators as
their bit-generator state, and a library's own state object (pycma's CMAEvolutionStrategy, an
Optuna sampler) as a *versioned pickle*: base64 bytes plus the library name and version, refused
with a clear message when the installed version differs.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.fsutil import atomic_write_text

FORMAT = "evomerge.optim/1"


def encode_array(array: np.ndarray | None) -> dict | None:
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": array.dtype.str.lstrip("<>|="), "shape": list(array.shape), "b64": base64.b64encode(data).decode()}


def decode_array(data: dict | None) -> np.ndarray | None:
    if data is None:
        return None
    dtype = np.dtype(data["dtype"]).newbyteorder("<")
    raw = base64.b64decode(data["b64"])
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(data["shape"])


def library_version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def pickle_blob(obj: Any, library: str) -> dict:
    """A library object as a versioned pickle."""
    return {
        "library": library,
        "version": library_version(library),
        "pickle": base64.b64encode(pickle.dumps(obj, protocol=4)).decode(),
    }


def unpickle_blob(blob: dict) -> Any:
    installed = library_version(blob["library"])
    if installed != blob["version"]:
        raise ConfigError(
            f"the checkpoint holds {blob['library']} {blob['version']} state but {installed} is installed; "
            f"resume with {blob['library']}=={blob['version']}",
            field="checkpoint",
        )
    return pickle.loads(base64.b64decode(blob["pickle"]))


def save_state(path: str | Path, state: dict) -> Path:
    """Write a state dict as JSON, atomically (what the run checkpoint does with it)."""
    return atomic_write_text(path, json.dumps(state, allow_nan=False))


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("optimizer checkpoint does not exist", file=str(path))
    return json.loads(path.read_text())
