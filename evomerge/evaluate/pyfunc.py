"""The `python` evaluator: any scoring function, with the same result type and failure handling.

Spec (YAML, ``kind: python``)::

    callable: mypackage.scoring:score      # or path/to/file.py:score (relative to the YAML),
                                           # or a name given to evomerge.register_function
    objectives: {acc: true, loss: false}   # name -> higher is better (first = primary)
    args: {n: 100}                         # extra keyword arguments for the function

The function is called as ``fn(model, tokenizer, split, **args)``, plus ``subset=`` and
``shard=`` when its signature takes them (or ``**kwargs``). It returns an `EvalResult`, a
mapping of objective values (``{"acc": 0.5}``), or a mapping with ``objectives`` and,
optionally, ``per_sample`` ({task: scores}) and ``doc_ids`` ({task: ids}). An exception or a
NaN becomes a failed result like any other evaluator's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.evaluate.base import Evaluator, SpecModel, Split, import_callable
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset
from evomerge.usercode import FUNCTIONS


class PythonSpec(SpecModel):
    kind: Literal["python"]
    description: str | None = None
    callable: str
    objectives: dict[str, bool] = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


class PythonEvaluator(Evaluator[PythonSpec]):
    kind = "python"
    spec_model = PythonSpec

    def _setup(self, spec: PythonSpec, file: str | None, base_dir: Path | None) -> None:
        self.fn = FUNCTIONS.get(spec.callable) or self._import(spec.callable, file, base_dir)
        params = inspect.signature(self.fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._extra = {name for name in ("subset", "shard") if takes_any or name in params}

    @staticmethod
    def _import(ref: str, file: str | None, base_dir: Path | None) -> Any:
        if ":" not in ref:  # not a path: a name given to `register_function`, in another process
            raise ConfigError(
                f"'{ref}' is not 'package.module:function', 'file.py:function' or a function registered in this "
                "process (evomerge.register_function; register it again before resuming a run that uses it)",
                file=file, field="callable",
            )  # fmt: skip
        return import_callable(ref, file=file, field="callable", base_dir=base_dir)

    def objective_directions(self) -> dict[str, bool]:
        return dict(self.spec.objectives)

    def _evaluate(self, model: Any, tokenizer: Any, split: Split, subset: Subset | None, shard: tuple[int, int] | None) -> EvalResult:
        kwargs = dict(self.spec.args)
        if "subset" in self._extra:
            kwargs["subset"] = subset
        if "shard" in self._extra:
            kwargs["shard"] = shard
        elif shard is not None and shard != (0, 1):
            raise ValueError(f"{self.spec.callable} does not take shard=, so it cannot score one shard")
        out = self.fn(model, tokenizer, split, **kwargs)
        directions = self.objective_directions()
        if isinstance(out, EvalResult):
            out.higher_is_better = {**directions, **out.higher_is_better}
            return out
        if not isinstance(out, Mapping):
            raise TypeError(f"{self.spec.callable} returned {type(out).__name__}, expected an EvalResult or a mapping")
        structured = "objectives" in out and isinstance(out["objectives"], Mapping)
        objectives = {k: float(v) for k, v in (out["objectives"] if structured else out).items()}
        per_sample = {k: np.asarray(v, dtype=np.float64) for k, v in (out.get("per_sample") or {}).items()} if structured else {}
        doc_ids = {k: list(v) for k, v in (out.get("doc_ids") or {}).items()} if structured else {}
        for task, scores in per_sample.items():
            doc_ids.setdefault(task, list(range(len(scores))))
        return EvalResult(
            objectives=objectives,
            higher_is_better=directions,
            per_sample=per_sample,
            doc_ids=doc_ids,
            counts={k: len(v) for k, v in per_sample.items()},
        )
