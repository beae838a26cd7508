"""What one worker does for one job: materialize the recipe, evaluate it, never raise.

`WorkerCore` is shared by the in-process pool (`evomerge.run.local`) and the Ray actors
(`evomerge.run.workers`). It keeps, for the life of the worker:

- the sources (a `SourcePool` whose tensors stay resident, or are adopted zero-copy from the
  Ray object store), and a `CachedSparsifier` (within ``cache_budget``), so a new density is
  a lookup, not a sort; on a GPU also the sources kept there (within ``gpu_budget``), where
  the merge runs;
- one resident model skeleton: a candidate whose merged architecture (the merged config) is
  the same as the previous one's is copied into it in place; another architecture (a DFS path
  of a new length) builds a new skeleton from the merged config (`evomerge.models`: a Hugging
  Face config, or a registered model kind such as the zoo's digits MLP);
- weights-space candidates (`evomerge.run.weights`: raw tensors, a `TensorsPayload`, over a
  template model) skip the merge: the tensors are copied into the template's architecture;
- the evaluator, built once, and the tokenizers, loaded once per source directory.

Memory per job is the skeleton and little else: each tensor is merged straight into its
parameter (`evomerge.merge.engine.merge_into`: chunk-sized scratch, no full-size temporary), and
the rank tables of a first job are built before the skeleton is written (`prepare_masks`). The
Ray workers also give MKL's GEMM buffers back after each job (`evomerge.run.worker_memory`).

Any exception, or a non-finite objective, becomes `EvalResult.failure(...)`.

transformers is imported where a model or tokenizer is built (importing it takes seconds).
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.evaluate import build_evaluator
from evomerge.evaluate.base import evaluator_directions
from evomerge.evaluate.result import EvalResult
from evomerge.merge.device import DeviceSources
from evomerge.merge.engine import TORCH_DTYPES, MergePlan, merge_into, plan_merge, prepare_masks
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import CachedSparsifier
from evomerge.merge.writer import TOKENIZER_FILES
from evomerge.models import build_model
from evomerge.run.jobs import Job, Payload, TensorsPayload

EvaluatorSpec = dict | str | Callable[[], Any]


def evaluator_or_factory(spec: EvaluatorSpec) -> Any:
    """The evaluator of a resolved spec dict, name or path (`evomerge.evaluate.build_evaluator`),
    or what a zero-argument factory returns (tests, benchmarks and embedding applications)."""
    return spec() if callable(spec) else build_evaluator(spec)


def default_device() -> str:
    """`cuda` when this process sees a GPU (a Ray actor sees one only if it asked for it)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class WorkerCore:
    """Materialize + evaluate, one job at a time, with sources and model kept resident.

    sources: ref -> local model directory. evaluator_spec: the resolved evaluator spec (or a
    factory, see `evaluator_or_factory`). dtype: the dtype the model is evaluated in (default: the
    recipe's `out_dtype`/`dtype`, else float32). device: default `cuda` when available.
    tensors: optional ref -> {tensor name -> tensor} to use instead of reading the files.
    sparsifier: a `CachedSparsifier` (or subclass) to use; default a private one.
    cache_budget: bytes the default sparsifier's tables may hold (None: no limit; beyond it a
    tensor's mask is computed per candidate, with the same result).
    gpu_budget: on an accelerator, bytes of source tensors it may hold (None: no limit): kept
    there, and 1/8 of it for the copies of streamed tensors made ahead of their use; the rest
    are streamed per tensor from host memory for each merge (`DeviceSources`).

    The merge runs on ``device``, straight into the skeleton (`merge_into` merges where its
    targets are): on a GPU the sources go there (`DeviceSources`) and the kernels run there.
    """

    def __init__(
        self,
        sources: Mapping[str, str],
        evaluator_spec: EvaluatorSpec,
        allow_pickle: bool = False,
        dtype: str | None = None,
        device: str | None = None,
        *,
        tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        sparsifier: CachedSparsifier | None = None,
        cache_budget: int | None = None,
        gpu_budget: int | None = None,
    ):
        if dtype is not None and dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {sorted(TORCH_DTYPES)}")
        self.dtype = dtype
        self.device = device or default_device()
        self.pool = SourcePool(allow_pickle=allow_pickle, resident=True)
        self.sparsifier = sparsifier if sparsifier is not None else CachedSparsifier(budget_bytes=cache_budget)
        self.staging = DeviceSources(self.device, gpu_budget) if torch.device(self.device).type != "cpu" else None
        self.evaluator = evaluator_or_factory(evaluator_spec)
        self._directions = evaluator_directions(self.evaluator)
        self._model: torch.nn.Module | None = None
        self._model_key: str | None = None
        self._tokenizers: dict[Path, Any] = {}
        self.models_built = 0  # skeletons built (a new architecture each time)
        self._prepared: set[tuple] = set()  # (method, inputs) whose rank tables were built up front
        # Where in the plan this worker starts merging (a fraction of its tensors): workers that
        # start together at different points compute different rank tables first and share
        # them (the pool sets it per worker; results do not depend on the order).
        self.merge_offset = 0.0
        for ref, path in sources.items():
            self.add_source(ref, path, (tensors or {}).get(ref))
        self._warm_up()

    # ---- sources ----------------------------------------------------------------------------
    def add_source(self, ref: str, path: str, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Make `ref` (e.g. "stage:ps", "archive:7") name the model in `path`; with `tensors`,
        serve those in-memory tensors instead of reading the files."""
        self.pool.register(ref, path)
        if tensors is not None:
            self.pool.get(ref).adopt(tensors)

    # ---- one job ------------------------------------------------------------------------------
    def run(self, job: Job) -> EvalResult:
        """Score `job.recipe` on `job.split` (its subset, its shard); failures come back as
        failed results, never as exceptions."""
        start = time.perf_counter()
        try:
            model, tokenizer = self.prepare(job.payload)
            with torch.no_grad():
                result = self.evaluator.evaluate(model, tokenizer, job.split, job.subset, shard=job.shard)
        except Exception as exc:  # a bad candidate must never take the worker down
            message = f"{type(exc).__name__}: {exc}".strip()
            where = traceback.extract_tb(exc.__traceback__)[-1:]
            if where:
                message += f" (at {Path(where[0].filename).name}:{where[0].lineno})"
            return EvalResult.failure(message, self._directions, seconds=time.perf_counter() - start)
        self._directions = dict(result.higher_is_better) or self._directions
        bad = [name for name, value in result.objectives.items() if not math.isfinite(value)]
        if result.error is None and bad:
            return EvalResult.failure(
                f"objective '{bad[0]}' is {result.objectives[bad[0]]}", result.higher_is_better, result.seconds
            )
        return result

    def prepare(self, payload: Payload) -> tuple[torch.nn.Module, Any]:
        """The resident model holding the merge of a recipe (or the raw tensors of a weights-space
        candidate), and its tokenizer."""
        if isinstance(payload, TensorsPayload):
            return self._prepare_weights(payload.template, payload.tensors)
        recipe = payload
        plan = plan_merge(recipe, self.pool)
        if self.merge_offset and plan.tasks:
            k = int(len(plan.tasks) * self.merge_offset) % len(plan.tasks)
            plan.tasks = plan.tasks[k:] + plan.tasks[:k]
        self._prepare_tables(plan)
        built = self.models_built
        model = self._skeleton(plan.config, self._model_dtype(plan))
        params = dict(model.state_dict(keep_vars=True))
        written: set[int] = set()
        # each tensor is merged straight into the skeleton's parameter: no full-size temporary
        # (merge_into refuses a plan with a tensor the skeleton lacks before writing any)
        for name in merge_into(plan, self.pool, params, self.sparsifier, staging=self.staging):
            written.add(params[name].data_ptr())
        if self.models_built != built:  # a fresh skeleton: nothing may stay uninitialized
            params = dict(model.named_parameters())
            missing = [name for name, p in params.items() if p.data_ptr() not in written]
            if missing:
                self._model = self._model_key = None
                raise RuntimeError(f"the merge does not produce '{missing[0]}' of the model")
        return model, self._tokenizer(recipe, plan)

    def _prepare_weights(self, template: str, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.nn.Module, Any]:
        """The template's architecture holding `tensors` (a weights-space candidate)."""
        source = self.pool.get(template)
        dtype = TORCH_DTYPES[self.dtype] if self.dtype is not None else torch.float32
        model = self._skeleton(dict(source.config), dtype)
        params = dict(model.state_dict(keep_vars=True))
        missing = sorted(set(params) - set(tensors))
        extra = sorted(set(tensors) - set(params))
        if missing or extra:
            what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which the model does not"
            raise RuntimeError(f"the genome's weights do not fit '{template}': it {what}")
        with torch.no_grad():
            for name, target in params.items():
                target.copy_(tensors[name])
        return model, self._folder_tokenizer(source.path)

    @property
    def directions(self) -> dict[str, bool]:
        """objective -> higher is better, as far as known (from the evaluator or a result)."""
        return dict(self._directions)

    @property
    def model(self) -> torch.nn.Module | None:
        """The resident model (None before the first job)."""
        return self._model

    def model_bytes(self) -> int:
        """Bytes held by the resident model's parameters and buffers."""
        if self._model is None:
            return 0
        tensors = {t.data_ptr(): t for t in [*self._model.parameters(), *self._model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def memory_parts(self) -> dict[str, int]:
        """Bytes each part of this worker holds: ``sources`` (resident source tensors in host
        memory, shared ones included), ``sources_on_device`` (kept on its accelerator),
        ``caches`` (the sparsifier's tables and noise), ``skeleton`` (the resident model); on a
        CUDA device also ``device_allocated`` (all the memory torch has allocated there)."""
        parts = {
            "sources": self.pool.resident_bytes(),
            "sources_on_device": self.staging.nbytes() if self.staging is not None else 0,
            "caches": self.sparsifier.nbytes(),
            "skeleton": self.model_bytes(),
        }
        device = torch.device(self.device)
        if device.type == "cuda":
            parts["device_allocated"] = torch.cuda.memory_allocated(device)
        return parts

    # ---- internals ----------------------------------------------------------------------------
    def _prepare_tables(self, plan: MergePlan) -> None:
        """The first time a method meets a set of sources, build its rank tables before the merge
        writes the skeleton (`prepare_masks`), so that a first job's peak is the skeleton or the
        tables' temporaries, not both. Later jobs find every table cached."""
        key = (
            plan.method.name,
            frozenset((ref.model, task.base.model if task.base else None) for task in plan.tasks for ref in task.inputs),
        )
        if key not in self._prepared:
            prepare_masks(plan, self.pool, self.sparsifier, self.staging)
            self._prepared.add(key)

    def _warm_up(self) -> None:
        """Import the model classes of the sources now, so the first job does not pay for it
        (transformers imports model code lazily; that is seconds on a busy machine)."""
        import transformers

        for ref in list(self.pool.aliases):
            for name in self.pool.get(ref).config.get("architectures") or []:
                getattr(transformers, name, None)

    def _model_dtype(self, plan: MergePlan) -> torch.dtype:
        if self.dtype is not None:
            return TORCH_DTYPES[self.dtype]
        return plan.out_dtype or torch.float32

    def _skeleton(self, config: dict, dtype: torch.dtype) -> torch.nn.Module:
        key = json.dumps(config, sort_keys=True, default=str) + f"|{dtype}"
        if self._model is None or key != self._model_key:
            self._model = None  # free the old skeleton before building the new one
            self._model = self._build_model(config, dtype)
            self._model_key = key
            self.models_built += 1
        return self._model

    def _build_model(self, config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """A model of the merged architecture, weights uninitialized (all are overwritten)."""
        factory = getattr(self.evaluator, "model_from_config", None)
        model = factory(dict(config)) if factory is not None else build_model(config)
        return model.to(device=self.device, dtype=dtype).eval()

    def _tokenizer(self, recipe, plan: MergePlan) -> Any:
        """From the recipe's tokenizer_source (a model ref), else the base / first model; None
        when that directory has no tokenizer files (the evaluator brings its own)."""
        source = recipe.tokenizer_source
        ref = plan.reference if source in (None, "base", "union") else source
        return self._folder_tokenizer(self.pool.get(ref).path)

    def _folder_tokenizer(self, folder: Path) -> Any:
        if folder not in self._tokenizers:
            tokenizer = None
            if any((folder / name).is_file() for name in TOKENIZER_FILES):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder)
            self._tokenizers[folder] = tokenizer
        return self._tokenizers[folder]
