"""The `lm_eval` evaluator: lm-eval-harness tasks, prepared once, scored per candidate in memory.

Spec (YAML, ``kind: lm_eval``)::

    tasks:                       # registered lm-eval tasks or tasks of local folders
      - task: zoo_add
        metric: acc              # default: the task's first metric
        weight: 1.0              # default weight in the objectives that list this task
        num_fewshot: 0           # as lm-eval's --num_fewshot (a task pinned to 0 stays 0)
        # splits (dataset split names); default: search = validation_split, holdout = test_split
        search_split: search
        holdout_split: holdout
        # or, for a task with a single evaluation split, a seeded partition of it:
        # partition: {split: test, holdout_fraction: 0.5, seed: 0}
    objectives:                  # default: one objective over every task
      mean_acc: [zoo_add, zoo_sort]        # weighted mean of task scores (task weights)
      add: {zoo_add: 1.0}                  # or explicit weights
    primary: mean_acc            # default: the first objective
    include_path: tasks          # local task folders, relative to this file; default: evaluators/tasks
    limit: null                  # search: the first N documents of each task
    subsample: {size: 200, per_generation: true}   # search: a seeded sample (see subset.py)
    holdout_limit: null          # holdout: the first N documents (default: all)
    batch_size: 64               # sequences per forward pass

Preparation (once, at build time): the TaskManager (cached per process), the task objects and
their datasets, every document's prompt and requests (lm-eval's own `fewshot_context` and
`construct_requests`, few-shot sampler seeded like `simple_evaluate`). On the first `evaluate`
with a tokenizer: the requests are tokenized exactly as lm-eval's HFLM does (its own
`tok_encode`/`_encode_pair`). Per subset of documents: the padded batches (`forward.BatchPlan`).
Per candidate: forward passes, then lm-eval's filters, `process_results` and aggregation.

Fast path: `loglikelihood` and `multiple_choice` tasks (all their requests are loglikelihood
requests). `generate_until` and `loglikelihood_rolling` tasks are run through lm-eval's HFLM
wrapped around the in-memory model each call (correct, not faster than lm-eval).

Splits: a task's search and holdout documents come from different dataset splits, or from a
seeded partition of one split, so no document can be in both. Document ids are
``"<dataset split>:<index in that split>"``. Only mean-aggregated metrics are accepted, because
an objective must be the mean of the per-sample scores the optimizers (M2N2) receive.

lm-eval's modules are imported where they are used: importing lm-eval takes seconds and
evaluators of other kinds never need it.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.evaluate.base import Evaluator, SpecModel, Split, SubsampleSpec, resolve_objectives
from evomerge.evaluate.forward import BatchPlan, make_plan, run_plan
from evomerge.evaluate.lmeval_tasks import find_manager, load_task
from evomerge.evaluate.result import EvalResult, weighted_objectives
from evomerge.evaluate.subset import Subset, select, shard_slice
from evomerge.resources import builtin_dir

FAST_OUTPUT_TYPES = ("loglikelihood", "multiple_choice")
SLOW_OUTPUT_TYPES = ("generate_until", "loglikelihood_rolling")
DEFAULT_FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's fewshot_random_seed


class PartitionSpec(SpecModel):
    """A seeded split of one dataset split into disjoint holdout and search documents."""

    split: str | None = None  # default: the task's test_split, else its validation_split
    holdout_fraction: float = Field(0.5, gt=0, lt=1)
    seed: int = 0


class TaskSpec(SpecModel):
    task: str
    metric: str | None = None
    filter: str | None = None
    weight: float = Field(1.0, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    search_split: str | None = None
    holdout_split: str | None = None
    partition: PartitionSpec | None = None


class LmEvalSpec(SpecModel):
    kind: Literal["lm_eval"]
    description: str | None = None
    tasks: list[str | TaskSpec] = Field(min_length=1)
    objectives: dict[str, list[str] | dict[str, float]] | None = None
    primary: str | None = None
    include_path: str | list[str] | None = None
    include_defaults: bool | None = None  # None: lm-eval's registry only if a task is not local
    limit: int | None = Field(None, gt=0)
    subsample: SubsampleSpec | None = None
    holdout_limit: int | None = Field(None, gt=0)
    seed: int = 0
    batch_size: int = Field(64, gt=0)
    max_batch_tokens: int | None = Field(None, gt=0)
    max_length: int | None = Field(None, gt=0)  # as HFLM's max_length (default: the model's)
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED


@dataclass
class _Doc:
    id: str
    doc: dict
    instances: list  # lm_eval Instances, in idx order


@dataclass
class _Task:
    name: str
    task: Any  # lm_eval ConfigurableTask
    metric: str
    filter_key: str
    higher_is_better: bool
    fast: bool
    docs: dict[str, list[_Doc]] = field(default_factory=dict)  # split -> documents in order


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning per HFLM built around an in-memory model; they are expected here."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class LmEvalEvaluator(Evaluator[LmEvalSpec]):
    kind = "lm_eval"
    spec_model = LmEvalSpec
    SHARDABLE = PER_SAMPLE = SELECTS_DOCUMENTS = True

    def _setup(self, spec: LmEvalSpec, file: str | None, base_dir: Path | None) -> None:
        task_specs = [TaskSpec(task=t) if isinstance(t, str) else t for t in spec.tasks]
        names = [t.task for t in task_specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"task listed twice: {', '.join(dupes)}", file=file, field="tasks")
        include = self._include_paths()
        manager = find_manager(names, include, spec.include_defaults, file=file)
        self.task_manager = manager
        self.tasks: dict[str, _Task] = {}
        for i, ts in enumerate(task_specs):
            self.tasks[ts.task] = self._prepare(manager, ts, f"tasks[{i}]")
        self.objective_weights, self._directions = resolve_objectives(
            spec.objectives,
            {t.task: (t.weight, self.tasks[t.task].higher_is_better) for t in task_specs},
            primary=spec.primary,
            default_name=self._default_objective_name(),
            file=file,
        )
        self._tokenized: dict[int, tuple[Any, dict[int, tuple[list[int], list[int]]]]] = {}
        self._plans: OrderedDict[tuple, BatchPlan] = OrderedDict()

    # ------------------------------------------------------------------ preparation
    def _include_paths(self) -> tuple[str, ...]:
        raw = self.spec.include_path
        if raw is None:
            default = builtin_dir("evaluators") / "tasks"
            return (str(default),) if default.is_dir() else ()
        paths = [raw] if isinstance(raw, str) else list(raw)
        out = []
        for i, p in enumerate(paths):
            path = Path(p).expanduser()
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            if not path.is_dir():
                field = "include_path" if isinstance(raw, str) else f"include_path[{i}]"
                raise ConfigError(f"folder '{p}' does not exist", file=self.file, field=field)
            out.append(str(path.resolve()))
        return tuple(out)

    def _default_objective_name(self) -> str:
        metrics = {t.metric for t in self.tasks.values()}
        if len(metrics) == 1:
            metric = metrics.pop()
            return metric if len(self.tasks) == 1 else f"mean_{metric}"
        return "score"

    def _prepare(self, manager: Any, ts: TaskSpec, field: str) -> _Task:
        file = self.file
        task = load_task(manager, ts.task, file=file, field=f"{field}.task")
        output_type = task.get_config("output_type")
        if output_type not in FAST_OUTPUT_TYPES + SLOW_OUTPUT_TYPES:
            raise ConfigError(f"task '{ts.task}' has output_type '{output_type}', which evomerge cannot score", file=file, field=field)
        # num_fewshot as simple_evaluate sets it.
        if ts.num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=ts.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)

        produced = dict(task.higher_is_better() or {})
        metric = ts.metric or next(iter(produced), None)
        if metric is None or metric not in produced:
            valid = ", ".join(produced) or "none"
            raise ConfigError(f"task '{ts.task}' does not produce metric '{metric}'; it produces: {valid}", file=file, field=f"{field}.metric")
        agg = (task.aggregation() or {}).get(metric)
        if agg is None or getattr(agg, "__name__", "") != "mean":
            name = getattr(agg, "__name__", agg)
            raise ConfigError(
                f"metric '{metric}' of task '{ts.task}' aggregates with '{name}'; evomerge needs a mean of per-sample scores",
                file=file,
                field=f"{field}.metric",
            )
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        filter_key = ts.filter or filters[0]
        if filter_key not in filters:
            raise ConfigError(f"task '{ts.task}' has no filter '{filter_key}'; valid: {', '.join(filters)}", file=file, field=f"{field}.filter")
        prepared = _Task(
            name=ts.task,
            task=task,
            metric=metric,
            filter_key=filter_key,
            higher_is_better=bool(produced[metric]),
            fast=output_type in FAST_OUTPUT_TYPES,
        )
        for split, (dataset_split, indices) in self._resolve_splits(task, ts, field).items():
            docs = self._build_docs(task, dataset_split)
            prepared.docs[split] = [docs[i] for i in indices]
        return prepared

    def _resolve_splits(self, task: Any, ts: TaskSpec, field: str) -> dict[str, tuple[str, list[int]]]:
        """split -> (dataset split, indices of its documents), disjoint by construction."""
        file = self.file
        available = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []

        def check(name: str, key: str) -> str:
            if name not in available:
                raise ConfigError(f"task '{ts.task}' has no split '{name}'; valid: {', '.join(available)}", file=file, field=f"{field}.{key}")
            return name

        def count(name: str) -> int:
            return len(self._split_docs(task, name))

        if ts.partition is not None:
            if ts.search_split or ts.holdout_split:
                raise ConfigError("give either partition or search_split/holdout_split, not both", file=file, field=f"{field}.partition")
            name = ts.partition.split or task.config.test_split or task.config.validation_split
            name = check(name, "partition.split")
            n = count(name)
            rng = np.random.default_rng(ts.partition.seed)
            order = rng.permutation(n)
            n_hold = max(1, min(n - 1, round(ts.partition.holdout_fraction * n)))
            return {
                "search": (name, sorted(int(i) for i in order[n_hold:])),
                "holdout": (name, sorted(int(i) for i in order[:n_hold])),
            }
        search = ts.search_split or task.config.validation_split
        holdout = ts.holdout_split or task.config.test_split
        if search is None or holdout is None or search == holdout:
            single = holdout or search
            raise ConfigError(
                f"task '{ts.task}' has one evaluation split ('{single}'); declare partition: "
                "{holdout_fraction: 0.5, seed: 0} or two different search_split/holdout_split "
                f"(dataset splits: {', '.join(available)})",
                file=file,
                field=field,
            )
        search, holdout = check(search, "search_split"), check(holdout, "holdout_split")
        return {"search": (search, list(range(count(search)))), "holdout": (holdout, list(range(count(holdout))))}

    @staticmethod
    def _split_docs(task: Any, split: str) -> Any:
        """The documents of a dataset split, as lm-eval's test_docs/validation_docs give them."""
        process = task.config.process_docs
        return process(task.dataset[split]) if process is not None else task.dataset[split]

    def _build_docs(self, task: Any, split: str) -> list[_Doc]:
        """Every document of `split` with its requests, built as `Task.build_all_requests` does."""
        cache = getattr(task, "_evomerge_docs", None)
        if cache is None:
            cache = task._evomerge_docs = {}
        if split in cache:
            return cache[split]
        task.set_fewshot_seed(seed=self.spec.fewshot_seed)
        num_fewshot = task.get_config("num_fewshot") or 0
        out = []
        for i, doc in enumerate(self._split_docs(task, split)):
            ctx = task.fewshot_context(
                doc,
                num_fewshot=num_fewshot,
                system_instruction=None,
                apply_chat_template=False,
                fewshot_as_multiturn=False,
                chat_template=None,
                gen_prefix=task.doc_to_prefix(doc),
            )
            insts = task.construct_requests(
                doc=doc,
                ctx=ctx,
                metadata=(task.config["task"], i, task.config.repeats),
                apply_chat_template=False,
                chat_template=None,
            )
            insts = insts if isinstance(insts, list) else [insts]
            out.append(_Doc(f"{split}:{i}", doc, sorted(insts, key=lambda x: x.idx)))
        cache[split] = out
        return out

    # ------------------------------------------------------------------ selection
    def objective_directions(self) -> dict[str, bool]:
        return dict(self._directions)

    def _selection(self, split: Split, subset: Subset | None, shard: tuple[int, int] | None) -> dict[str, list[_Doc]]:
        spec = self.spec
        out = {}
        for name, t in self.tasks.items():
            docs = t.docs[split]
            if split == "search":
                sub = spec.subsample
                idx = select(
                    len(docs),
                    key=name,
                    limit=spec.limit,
                    size=sub.size if sub else None,
                    per_generation=sub.per_generation if sub else True,
                    subset=subset or Subset(seed=spec.seed),
                )
            else:
                idx = select(len(docs), key=name, limit=spec.holdout_limit)
            chosen = [docs[int(i)] for i in idx]
            out[name] = chosen[shard_slice(len(chosen), shard)]
        return out

    def doc_ids(self, split: Split, subset: Subset | None = None, *, shard: tuple[int, int] | None = None) -> dict[str, list]:
        return {name: [d.id for d in docs] for name, docs in self._selection(split, subset, shard).items()}

    # ------------------------------------------------------------------ scoring
    def _hflm(self, model: Any, tokenizer: Any) -> Any:
        from lm_eval.models.huggingface import HFLM

        device = next(model.parameters()).device
        with _quiet_lm_eval():
            return HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                device=str(device),
                batch_size=self.spec.batch_size,
                max_length=self.spec.max_length,
            )

    def _tokens(self, model: Any, tokenizer: Any) -> dict[int, tuple[list[int], list[int]]]:
        """Token ids of every fast-path request (keyed by id(Instance)), as HFLM.loglikelihood encodes them."""
        cached = self._tokenized.get(id(tokenizer))
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        lm = self._hflm(model, tokenizer)
        table: dict[int, tuple[list[int], list[int]]] = {}
        for t in self.tasks.values():
            if not t.fast:
                continue
            for docs in t.docs.values():
                for d in docs:
                    for inst in d.instances:
                        context, continuation = inst.args[0], inst.args[1]
                        if context == "":
                            cont = lm.tok_encode(continuation, add_special_tokens=False)
                            pair = ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
                        else:
                            pair = lm._encode_pair(context, continuation)
                        table[id(inst)] = (list(pair[0]), list(pair[1]))
        self._tokenized = {id(tokenizer): (tokenizer, table)}  # one tokenizer per worker: keep the latest
        return table

    def _plan(self, key: tuple, requests: list[tuple[list[int], list[int]]], max_length: int) -> BatchPlan:
        plan = self._plans.get(key)
        if plan is None:
            plan = make_plan(requests, max_length=max_length, batch_size=self.spec.batch_size, max_batch_tokens=self.spec.max_batch_tokens)
            self._plans[key] = plan
            while len(self._plans) > 8:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _evaluate(self, model: Any, tokenizer: Any, split: Split, subset: Subset | None, shard: tuple[int, int] | None) -> EvalResult:
        if tokenizer is None:
            raise ValueError("the lm_eval evaluator needs the model's tokenizer")
        selection = self._selection(split, subset, shard)
        was_training = model.training
        if was_training:  # toggling walks every module: only when needed
            model.eval()
        try:
            self._run_fast(model, tokenizer, split, selection)
            self._run_slow(model, tokenizer, selection)
        finally:
            if was_training:
                model.train()
        per_sample: dict[str, np.ndarray] = {}
        task_scores: dict[str, float] = {}
        for name, docs in selection.items():
            values = self._score(self.tasks[name], docs)
            per_sample[name] = np.asarray(values, dtype=np.float64)
            agg = self.tasks[name].task.aggregation()[self.tasks[name].metric]
            task_scores[name] = float(agg(values)) if values else math.nan
        return EvalResult(
            objectives=weighted_objectives(self.objective_weights, task_scores, partial=shard is not None or (subset is not None and subset.positions is not None)),
            higher_is_better=self.objective_directions(),
            per_sample=per_sample,
            doc_ids={name: [d.id for d in docs] for name, docs in selection.items()},
            counts={name: len(docs) for name, docs in selection.items()},
            task_scores=task_scores,
            objective_weights={k: dict(v) for k, v in self.objective_weights.items()},
        )

    def _max_length(self, model: Any, tokenizer: Any) -> int:
        """HFLM.max_length without building an HFLM."""
        if self.spec.max_length:
            return self.spec.max_length
        from lm_eval.models.huggingface import HFLM
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(model.config, tokenizer, default=HFLM._DEFAULT_MAX_LENGTH)

    def _run_fast(self, model: Any, tokenizer: Any, split: Split, selection: dict[str, list[_Doc]]) -> None:
        instances = [inst for name, docs in selection.items() if self.tasks[name].fast for d in docs for inst in d.instances]
        if not instances:
            return
        table = self._tokens(model, tokenizer)
        max_length = self._max_length(model, tokenizer)
        key = (id(tokenizer), max_length, split, tuple(id(i) for i in instances))
        plan = self._plan(key, [table[id(i)] for i in instances], max_length)
        lls, greedy = run_plan(model, plan)
        for inst, ll, g in zip(instances, lls, greedy, strict=True):
            inst.resps = [(ll, g)] * (inst.repeats or 1)

    def _run_slow(self, model: Any, tokenizer: Any, selection: dict[str, list[_Doc]]) -> None:
        by_type: dict[str, list] = {}
        for name, docs in selection.items():
            if self.tasks[name].fast:
                continue
            for d in docs:
                for inst in d.instances:
                    inst.resps = []
                    by_type.setdefault(inst.request_type, []).append(inst)
        lm = self._hflm(model, tokenizer) if by_type else None
        for reqtype, insts in by_type.items():
            cloned = [inst for inst in insts for _ in range(inst.repeats or 1)]
            with _quiet_lm_eval():
                resps = getattr(lm, reqtype)(cloned, disable_tqdm=True)
            for inst, resp in zip(cloned, resps, strict=True):
                inst.resps.append(resp)

    @staticmethod
    def _score(t: _Task, docs: list[_Doc]) -> list[float]:
        """lm-eval's filters and process_results on the responses; the chosen metric per document."""
        if not docs:
            return []
        instances = [inst for d in docs for inst in d.instances]
        for ensemble in getattr(t.task, "_filters", []):
            ensemble.apply(instances)
        values = []
        for d in docs:
            metrics = t.task.process_results(d.doc, [inst.filtered_resps[t.filter_key] for inst in d.instances])
            if t.metric not in metrics:
                raise KeyError(f"task '{t.name}' returned no '{t.metric}' for document {d.id} (got {', '.join(metrics)})")
            values.append(float(metrics[t.metric]))
        return values
