"""`config.json` completed as transformers' `save_pretrained` writes it, for every checkpoint
evomerge writes (zoo models, `merge`, `export`, stage best models, weights-space exports).

A config saved by `config.save_pretrained` alone (the zoo's, up to zoo code version 5) names no
`architectures`. transformers still loads it through `model_type`, but mergekit
(`arch_info_for_config`), vLLM and other tools dispatch on `architectures` and refuse it; nor does
it say which dtype its weights have. :func:`complete_checkpoint` fills in, in a model directory
whose weights are written:

- `architectures`: the config's own (the source's: a merge takes its reference model's config),
  else the causal-LM class transformers maps its `model_type` to
  (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: imported only then, it imports torch);
- `dtype` and `torch_dtype`: the dtype of the weights actually written, from the safetensors
  headers (transformers >= 4.56 writes and reads `dtype`; earlier versions, and tools reading
  their configs, read `torch_dtype`; transformers reads `dtype` first, the two agree);
- `transformers_version`: the installed transformers' version, as `save_pretrained` stamps it;
- `generation_config.json`: the source's, when it has one and the directory has none.

Configs that are not transformers' (no `model_type`, e.g. the digits MLPs'
`{"architecture": "DigitsMLP", ...}`) are left as they are.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from evomerge.fsutil import atomic_write_text
from evomerge.merge.stfile import read_header

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHT_INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def causal_lm_architecture(model_type: str) -> str | None:
    """transformers' causal-LM class for `model_type` (e.g. "llama" -> "LlamaForCausalLM");
    None when transformers maps it to none."""
    # imported when asked: transformers takes seconds to import
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def architectures_of(config: dict[str, Any]) -> list[str]:
    """The config's `architectures`, else the one its `model_type` maps to ([] when neither)."""
    named = config.get("architectures")
    if named:
        return list(named)
    model_type = config.get("model_type")
    found = causal_lm_architecture(str(model_type)) if model_type else None
    return [found] if found else []


def written_dtype(model_dir: Path) -> str | None:
    """The floating-point dtype of most of the weights in `model_dir`'s safetensors files
    (by element count; None when it has none)."""
    index = model_dir / WEIGHT_INDEX
    if index.is_file():
        files = sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    counts: Counter[str] = Counter()
    for file in files:
        for entry in read_header(file).values():
            if entry.dtype in FLOAT_DTYPES:
                size = 1
                for dim in entry.shape:
                    size *= dim
                counts[entry.dtype] += size
    return counts.most_common(1)[0][0] if counts else None


def _transformers_version() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def complete_checkpoint(model_dir: str | Path, source_dir: str | Path | None = None, *, missing_only: bool = False) -> bool:
    """Complete `model_dir`'s config.json (see the module docstring) once its weights are written;
    copy `source_dir`'s generation_config.json when `model_dir` has none. With `missing_only`
    (completing a directory written earlier) only fields that are absent are filled. Returns
    whether config.json changed; one that is not a transformers config is left alone."""
    model_dir = Path(model_dir)
    if source_dir is not None and (Path(source_dir) / GENERATION_CONFIG).is_file() and not (model_dir / GENERATION_CONFIG).exists():
        shutil.copy2(Path(source_dir) / GENERATION_CONFIG, model_dir / GENERATION_CONFIG)
    path = model_dir / CONFIG
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "model_type" not in config:
        return False
    found: dict[str, Any] = {"architectures": architectures_of(config) or None}
    dtype = written_dtype(model_dir)
    found.update({"dtype": dtype, "torch_dtype": dtype} if dtype else {})
    found["transformers_version"] = _transformers_version()
    done = dict(config)
    for key, value in found.items():
        if value is not None and not (missing_only and config.get(key) is not None):
            done[key] = value
    if done == config:
        return False
    atomic_write_text(path, json.dumps(done, indent=2, sort_keys=True) + "\n")
    return True
