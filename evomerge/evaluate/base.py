"""The evaluator types every kind builds on: `SpecModel`, `Evaluator` and the helpers of its
kinds. This module imports no kind; the kinds (`lmeval`, `classification`, `pyfunc`) import it,
and `evomerge.evaluate.registry` maps a spec's `kind:` to its class and builds it.

Worker-side use::

    ev = build_evaluator("zoo_all")              # or a path, or a spec dict from the experiment
    result = ev.evaluate(model, tokenizer, "search", Subset(seed, generation))
    part = ev.evaluate(model, tokenizer, "search", subset, shard=(i, n))   # one of n shards
    whole = EvalResult.combine([part_0, ..., part_n-1])                   # in shard order

A spec is a mapping with a ``kind:`` key (``lm_eval``, ``classification``, ``python`` or a kind
registered with `register_evaluator`); the rest is validated by that kind's pydantic model
(`Evaluator.spec_model`; unknown keys are errors). Everything costly
(task objects, datasets, prompts, tokenization, batches) is prepared once; `evaluate` runs the
model and the metric code only. `evaluate` never raises for a bad candidate: an exception or a
non-finite objective comes back as `EvalResult.failure` with the message, so the worker goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset

SPLITS: tuple[str, ...] = ("search", "holdout")
Split = Literal["search", "holdout"]


class SpecModel(BaseModel):
    """Base of every evaluator spec model: unknown keys are errors, numbers are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SubsampleSpec(SpecModel):
    """Score a seeded subset of `size` search documents (a new one per generation by default)."""

    size: int = Field(gt=0)
    per_generation: bool = True


SpecT = TypeVar("SpecT", bound="SpecModel")


class Evaluator(ABC, Generic[SpecT]):
    """Scores in-memory models; subclasses implement `_evaluate` and `objective_directions`."""

    kind: ClassVar[str]
    #: the pydantic model of this kind's spec
    spec_model: ClassVar[type[SpecModel]]
    # ---- capabilities: what the run reads instead of the kind's name ----
    #: can score one of n document shards (`evaluate(..., shard=(i, n))`), so the run may split
    #: one candidate over idle workers
    SHARDABLE: ClassVar[bool] = False
    #: reports per-sample scores with their document ids: True always, False never, None when
    #: it depends on the spec (a python function may or may not)
    PER_SAMPLE: ClassVar[bool | None] = None
    #: scores exactly the documents a `Subset(positions=...)` names and has `objective_weights`
    #: (objective -> task -> weight), so a fidelity strategy (`evomerge.fidelity`) can score a
    #: candidate on a few documents and combine the parts
    SELECTS_DOCUMENTS: ClassVar[bool] = False

    def __init__(self, spec: SpecT, *, file: str | None = None, base_dir: Path | None = None) -> None:
        self.spec: SpecT = spec
        self.file = file
        self.base_dir = base_dir  # where relative paths of the spec resolve (the YAML's folder)
        self._setup(spec, file, base_dir)

    def _setup(self, spec: SpecT, file: str | None, base_dir: Path | None) -> None:
        """Prepare what every evaluation reuses (tasks, data, tokenization); raise ConfigError
        naming `file` and the field for a spec that cannot work."""

    @abstractmethod
    def objective_directions(self) -> dict[str, bool]:
        """objective name -> higher is better, in order (the first is the primary objective)."""

    @property
    def primary(self) -> str:
        return next(iter(self.objective_directions()))

    def evaluate(
        self,
        model: Any,
        tokenizer: Any = None,
        split: Split = "search",
        subset: Subset | None = None,
        *,
        shard: tuple[int, int] | None = None,
    ) -> EvalResult:
        """Score `model` on `split` (the documents `subset` selects; one block with `shard`).

        Never raises because of the candidate: failures return `EvalResult.failure`.
        A wrong `split` or `shard` is the caller's bug and raises ValueError.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if shard is not None and not (len(shard) == 2 and shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
        start = time.perf_counter()
        directions = self.objective_directions()
        try:
            result = self._evaluate(model, tokenizer, split, subset, shard)
        except Exception as err:  # the candidate failed (incl. out of memory); the worker goes on
            where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
            at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
            message = " ".join(f"{type(err).__name__}: {err}".split()) + at
            return EvalResult.failure(message, directions, time.perf_counter() - start)
        result.seconds = time.perf_counter() - start
        bad = [name for name, value in result.objectives.items() if not math.isfinite(float(value))]
        if bad and result.error is None:
            return EvalResult.failure(f"objective {', '.join(bad)} is not finite (NaN or inf)", directions, result.seconds)
        missing = [name for name in directions if name not in result.objectives]
        if missing and result.error is None:
            return EvalResult.failure(f"evaluator returned no value for objective {', '.join(missing)}", directions, result.seconds)
        return result

    @abstractmethod
    def _evaluate(
        self, model: Any, tokenizer: Any, split: Split, subset: Subset | None, shard: tuple[int, int] | None
    ) -> EvalResult: ...

    def doc_ids(self, split: Split, subset: Subset | None = None, *, shard: tuple[int, int] | None = None) -> dict[str, list]:
        """Per task, the ids of the documents `evaluate` would score (without running a model)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its documents")

    @staticmethod
    def combine(parts: list[EvalResult]) -> EvalResult:
        """The result of one candidate from its shards (in shard order)."""
        return EvalResult.combine(parts)


def resolve_objectives(
    objectives: Mapping[str, list[str] | Mapping[str, float]] | None,
    tasks: Mapping[str, tuple[float, bool]],
    *,
    primary: str | None = None,
    default_name: str = "score",
    file: str | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """Objective -> {task: weight} and objective -> higher is better, primary first.

    `tasks` maps each task to (its default weight, its metric's direction). An objective lists
    tasks (default weights) or maps them to weights; without `objectives` there is one,
    `default_name`, over every task. The tasks of one objective must agree on the direction.
    """
    groups: dict[str, dict[str, float]] = {}
    spec = dict(objectives) if objectives else {default_name: list(tasks)}
    for name, members in spec.items():
        field = f"objectives.{name}"
        weights = dict(members) if isinstance(members, Mapping) else {t: tasks[t][0] if t in tasks else 0.0 for t in members}
        if not weights:
            raise ConfigError("an objective needs at least one task", file=file, field=field)
        for task, weight in weights.items():
            if task not in tasks:
                raise ConfigError(f"'{task}' is not one of the evaluator's tasks; valid: {', '.join(tasks)}", file=file, field=field)
            if not (isinstance(weight, (int, float)) and weight > 0):
                raise ConfigError(f"weight of '{task}' must be a number > 0, got {weight!r}", file=file, field=field)
        ups = {tasks[t][1] for t in weights}
        if len(ups) > 1:
            raise ConfigError("mixes metrics where higher is better with metrics where lower is better", file=file, field=field)
        groups[name] = {t: float(w) for t, w in weights.items()}
    if primary is not None:
        if primary not in groups:
            raise ConfigError(f"'{primary}' is not an objective; valid: {', '.join(groups)}", file=file, field="primary")
        groups = {primary: groups[primary], **{k: v for k, v in groups.items() if k != primary}}
    directions = {name: tasks[next(iter(w))][1] for name, w in groups.items()}
    return groups, directions


def import_callable(ref: str, *, file: str | None, field: str, base_dir: Path | None = None) -> Any:
    """`package.module:function`, or `path/to/file.py:function` (relative to `base_dir`)."""
    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"'{ref}' is not 'package.module:function' or 'file.py:function'", file=file, field=field)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise ConfigError(f"file '{path}' does not exist", file=file, field=field)
            mod_spec = importlib.util.spec_from_file_location(f"evomerge_user_{path.stem}", path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"cannot import '{module_name}': {' '.join(f'{type(err).__name__}: {err}'.split())}", file=file, field=field) from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"'{module_name}' has no function '{attr}'", file=file, field=field)
    return fn


def evaluator_directions(evaluator: Any) -> dict[str, bool]:
    """objective -> higher is better, the primary objective first, as far as the evaluator says
    before its first result (an `Evaluator`, or any object with `higher_is_better`)."""
    directions = getattr(evaluator, "objective_directions", None)
    if callable(directions):
        return dict(directions())
    return dict(getattr(evaluator, "higher_is_better", None) or {})
