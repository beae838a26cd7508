"""Weights-space candidates in the run path: a genome that *is* a model's raw parameters.

A weights space (evolution from scratch, or from pre-trained members in genome mode: the M2N2
digits set-ups) decodes a genome into a state dict, not into a merge of sources. Such a candidate
travels to the workers as raw tensors (`TensorsPayload`, `evomerge.run.jobs`) with a recipe that
names it in the ledger:

- a `passthrough` of one model named `genome:<sha256 of the tensors>`, so the recipe hash (dedup,
  ledger, replay on resume) identifies exactly the weights it carries;
- its `evomerge.weights` block names the template model (the source whose architecture and
  tensor names the genome follows: `template`) and the number of genes.

A recipe read back from the ledger's YAML has no tensors: rebuild them from the row's genome
(`weights_payload`), which gives the same hash.

`WorkerCore` builds the template's architecture once and copies the tensors into it; an export
writes the tensors with the template's `config.json` (`write_weights_model`).

safetensors' torch writer is imported where a model is written (it imports torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import ConfigError
from evomerge.merge.hfconfig import complete_checkpoint
from evomerge.modeldir import model_dir_writer
from evomerge.recipe import Recipe
from evomerge.run.jobs import TensorsPayload

GENOME_PREFIX = "genome:"
WEIGHTS_FILE = "model.safetensors"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) over the names, shapes, dtypes and bytes of the tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_payload(space: Any, genome: Any, template: str) -> TensorsPayload:
    """The tensors of one genome of a weights `space` whose template model is `template`, with
    the recipe that names them."""
    tensors = space.decode(np.asarray(genome, dtype=np.float64))
    recipe = Recipe.model_validate(
        {
            "merge_method": "passthrough",
            "models": [{"model": f"{GENOME_PREFIX}{tensors_digest(tensors)}"}],
            "evomerge": {"weights": {"template": template, "genes": int(space.dim)}},
        }
    )
    return TensorsPayload(template=template, tensors=tensors, recipe=recipe)


def is_weights_recipe(recipe: Recipe) -> bool:
    refs = recipe.model_refs()
    return len(refs) == 1 and refs[0].startswith(GENOME_PREFIX)


def template_of(recipe: Recipe) -> str:
    """The template model reference of a weights recipe."""
    block = (recipe.evomerge.model_dump() if recipe.evomerge else {}).get("weights") or {}
    if not block.get("template"):
        raise ConfigError("a genome: recipe needs evomerge.weights.template (the model whose architecture it fills)", field="evomerge.weights")
    return str(block["template"])


def encode_model(space: Any, source: Any) -> np.ndarray:
    """A source model's parameters as a genome of the weights `space` (its template's names and
    shapes, in the space's order): how pre-trained models become initial members."""
    parts = []
    for name, shape in zip(space.names, space.shapes, strict=True):
        if name not in source.names:
            raise ConfigError(f"'{source.path}' has no tensor '{name}' (the weights space's template has it)")
        tensor = source.get(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(f"'{source.path}': tensor '{name}' is {list(tensor.shape)}, the template's is {list(shape)}")
        parts.append(tensor.detach().reshape(-1).double().cpu().numpy())
    return np.concatenate(parts)


def write_weights_model(tensors: dict[str, torch.Tensor], template_dir: Path, out_dir: str | Path, card: str, *, force: bool = False) -> Path:
    """Write the tensors as `model.safetensors` beside the template's `config.json` and a README
    model card; an existing `out_dir` is treated as `evomerge.modeldir` says (`force`)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir).resolve()
    if out_dir == Path(template_dir).resolve():
        raise ConfigError("is the directory of the template model; writing there would replace it: choose another directory", file=str(out_dir))
    with model_dir_writer(out_dir, force=force) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        config = json.loads((Path(template_dir) / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        complete_checkpoint(tmp, template_dir)  # architectures, dtype, generation config
        (tmp / "README.md").write_text(card)
    return out_dir


def tensors_from_genome(genome: Any, source: Any) -> dict[str, torch.Tensor]:
    """A genome of a weights space over template `source` as tensors: the template's tensors in
    its order, with its shapes and dtypes (what `WeightsSpace.decode` gives)."""
    genome = np.asarray(genome, dtype=np.float64).reshape(-1)
    out, offset = {}, 0
    for name in source.names:
        template = source.get(name)
        size = int(template.numel())
        if offset + size > genome.size:
            raise ConfigError(f"the genome has {genome.size} genes, fewer than the template '{source.path}' has parameters")
        out[name] = torch.from_numpy(genome[offset : offset + size].copy()).reshape(template.shape).to(template.dtype)
        offset += size
    if offset != genome.size:
        raise ConfigError(f"the genome has {genome.size} genes, the template '{source.path}' has {offset} parameters")
    return out
