"""The `classification` evaluator: per-sample correctness of a plain torch classifier.

Spec (YAML, ``kind: classification``)::

    data: evomerge.zoo.digits:load_split   # required: callable(split name) -> (inputs, labels)
    splits: {search: train, holdout: test}  # the data's split names for search and holdout
    task: digits                            # name of the per-sample vector in results
    objective: acc
    batch_size: 1024
    limit: null                             # search: first N samples
    subsample: null                         # search: {size: N, per_generation: true}

The data is loaded once, as float32/int64 tensors. The model is called as ``model(x)`` and
may return logits or an object with ``.logits``; the prediction is the argmax of the last
dimension. Search and holdout are different data splits. ``evaluators/digits.yaml`` is the
zoo's digits classifiers' spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.evaluate.base import Evaluator, SpecModel, Split, SubsampleSpec, import_callable
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset, select, shard_slice


class ClassificationSplits(SpecModel):
    search: str = "train"
    holdout: str = "test"


class ClassificationSpec(SpecModel):
    kind: Literal["classification"]
    description: str | None = None
    data: str | None = None  # required: the evaluator refuses None, after its splits check
    splits: ClassificationSplits = ClassificationSplits()
    task: str = "classification"
    objective: str = "acc"
    batch_size: int = Field(1024, gt=0)
    limit: int | None = Field(None, gt=0)
    subsample: SubsampleSpec | None = None
    seed: int = 0


class ClassificationEvaluator(Evaluator[ClassificationSpec]):
    kind = "classification"
    spec_model = ClassificationSpec
    SHARDABLE = PER_SAMPLE = SELECTS_DOCUMENTS = True

    def _setup(self, spec: ClassificationSpec, file: str | None, base_dir: Path | None) -> None:
        if spec.splits.search == spec.splits.holdout:
            raise ConfigError(f"search and holdout are the same split '{spec.splits.search}'", file=file, field="splits")
        if spec.data is None:
            raise ConfigError("no data: name the loader 'package.module:function' (split name -> (inputs, labels))", file=file, field="data")
        load = import_callable(spec.data, file=file, field="data", base_dir=base_dir)
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split, name in (("search", spec.splits.search), ("holdout", spec.splits.holdout)):
            try:
                x, y = load(name)
            except Exception as err:
                raise ConfigError(f"{spec.data}('{name}') failed: {' '.join(f'{type(err).__name__}: {err}'.split())}", file=file, field=f"splits.{split}") from err
            x_t = torch.tensor(np.asarray(x), dtype=torch.float32)  # a copy: the arrays may be read-only
            y_t = torch.tensor(np.asarray(y), dtype=torch.long)
            if len(x_t) != len(y_t) or len(x_t) == 0:
                raise ConfigError(f"split '{name}' has {len(x_t)} inputs and {len(y_t)} labels", file=file, field=f"splits.{split}")
            self.data[split] = (x_t, y_t)

    def objective_directions(self) -> dict[str, bool]:
        return {self.spec.objective: True}

    @property
    def objective_weights(self) -> dict[str, dict[str, float]]:
        return {self.spec.objective: {self.spec.task: 1.0}}

    def _indices(self, split: Split, subset: Subset | None, shard: tuple[int, int] | None) -> np.ndarray:
        n = len(self.data[split][1])
        if split == "search":
            sub = self.spec.subsample
            idx = select(
                n,
                key=self.spec.task,
                limit=self.spec.limit,
                size=sub.size if sub else None,
                per_generation=sub.per_generation if sub else True,
                subset=subset or Subset(seed=self.spec.seed),
            )
        else:
            idx = np.arange(n)
        return idx[shard_slice(len(idx), shard)]

    def doc_ids(self, split: Split, subset: Subset | None = None, *, shard: tuple[int, int] | None = None) -> dict[str, list]:
        name = getattr(self.spec.splits, split)
        return {self.spec.task: [f"{name}:{i}" for i in self._indices(split, subset, shard)]}

    @torch.inference_mode()
    def _evaluate(self, model: Any, tokenizer: Any, split: Split, subset: Subset | None, shard: tuple[int, int] | None) -> EvalResult:
        idx = self._indices(split, subset, shard)
        x_all, y_all = self.data[split]
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            correct = []
            index = torch.as_tensor(idx, dtype=torch.long)
            for start in range(0, len(index), self.spec.batch_size):
                rows = index[start : start + self.spec.batch_size]
                out = model(x_all[rows].to(device=device, dtype=dtype))
                logits = getattr(out, "logits", out)
                if not torch.isfinite(logits).all():
                    raise FloatingPointError("the model produced non-finite logits")
                correct.append((logits.argmax(-1).cpu() == y_all[rows]).to(torch.float64))
        finally:
            model.train(was_training)
        scores = torch.cat(correct).numpy() if correct else np.zeros(0)
        task, objective = self.spec.task, self.spec.objective
        # an empty shard is not a failure: combine() recomputes the objective from every part
        acc = float(scores.mean()) if len(scores) else (0.0 if shard is not None else float("nan"))
        return EvalResult(
            objectives={objective: acc},
            higher_is_better={objective: True},
            per_sample={task: scores},
            doc_ids=self.doc_ids(split, subset, shard=shard),
            counts={task: len(scores)},
            task_scores={task: acc},
            objective_weights={objective: {task: 1.0}},
        )
