"""Model kinds: how a worker builds an empty model of a merged architecture from its config.json.

A Hugging Face config (one with `model_type`) builds the transformers class its `architectures`
names, else `AutoModelForCausalLM`. Any other config names its kind in `architecture`, looked
up in a table: `register_model_kind(name, loader)` adds one (a plugin does it, as the zoo does
for its digits MLP in `evomerge/zoo/kinds.py`), `loader` being a function
`config -> torch.nn.Module` or a lazy ``"package.module:attr"`` string imported on first use
(so the core imports no model code it does not build), and `load_hint` tells a model card's
reader how to load a saved directory of the kind.

transformers is imported where a model is built (importing it takes seconds).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import reduce
from typing import TYPE_CHECKING, Any

from evomerge.plugins import load_plugins

if TYPE_CHECKING:
    import torch

ModelLoader = Callable[[Mapping[str, Any]], "torch.nn.Module"]

HF_LOAD_HINT = "`transformers.AutoModel.from_pretrained(DIR)`"
_KINDS: dict[str, ModelLoader | str] = {}
_LOAD_HINTS: dict[str, str] = {}
_IMPORTED: dict[str, ModelLoader] = {}  # lazy "module:attr" -> what it names


def register_model_kind(name: str, loader: ModelLoader | str, *, load_hint: str | None = None, replace: bool = False) -> None:
    """Configs with ``"architecture": name`` are built by `loader` (a function of the config, or a
    lazy ``"package.module:attr"``); `load_hint` says how a user loads a saved directory of the
    kind (model cards). A name taken by another loader needs `replace=True`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model kind's name is a non-empty string, got {name!r}")
    if isinstance(loader, str) and not all(loader.partition(":")[::2]):
        raise ValueError(f"model kind '{name}': '{loader}' is not 'package.module:attr'")
    if not isinstance(loader, str) and not callable(loader):
        raise TypeError(f"model kind '{name}': {loader!r} is neither callable nor 'package.module:attr'")
    old = _KINDS.get(name)
    if old is not None and old != loader and not replace:
        raise ValueError(f"model kind '{name}' is already registered ({old}); pass replace=True to replace it")
    _KINDS[name] = loader
    if load_hint is not None:
        _LOAD_HINTS[name] = load_hint


def model_kinds() -> list[str]:
    """The registered `architecture` names (Hugging Face configs are always accepted besides)."""
    return list(_KINDS)


def _known(name: str) -> bool:
    """Whether `name` is a registered kind, after the plugins (the zoo's kinds among them,
    `evomerge.plugins`) are loaded when it is not."""
    if name not in _KINDS:
        load_plugins()
    return name in _KINDS


def _loader(name: str) -> ModelLoader:
    loader = _KINDS[name]
    if isinstance(loader, str):  # imported once; the table keeps the string (registering it again is no change)
        if loader not in _IMPORTED:
            module, _, attr = loader.partition(":")
            _IMPORTED[loader] = reduce(getattr, attr.split("."), importlib.import_module(module))
        return _IMPORTED[loader]
    return loader


def registered_model(config: Mapping[str, Any]) -> torch.nn.Module | None:
    """The model of a registered kind for a config that is not a Hugging Face config (no
    `model_type`); None for a Hugging Face config or one naming no `architecture`."""
    if config.get("model_type") is not None or config.get("architecture") is None:
        return None
    name = config["architecture"]
    if not _known(name):
        raise ValueError(f"unknown architecture '{name}' in config.json; valid: {', '.join(_KINDS)} or a Hugging Face config")
    return _loader(name)(config)


def load_hint(config: Mapping[str, Any]) -> str:
    """How a user loads a saved model directory with this config (for its model card)."""
    name = config.get("architecture")
    if config.get("model_type") is None and isinstance(name, str) and _known(name):
        return _LOAD_HINTS.get(name, f"the loader registered for model kind '{name}' (evomerge.models)")
    return HF_LOAD_HINT


def build_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """An empty model (weights uninitialized) of the architecture `config` describes."""
    model = registered_model(config)
    if model is not None:
        return model
    import transformers  # here: a registered kind's model needs none of transformers' import time
    from transformers.initialization import no_init_weights

    hf_config = transformers.AutoConfig.for_model(**config)
    names = config.get("architectures") or []
    model_cls = getattr(transformers, names[0], None) if names else None
    with no_init_weights():
        if model_cls is not None:
            return model_cls._from_config(hf_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)
