"""Optuna samplers (tpe, cmaes, nsgaii, random) behind ask/tell, on Optuna's ask-and-tell API.

The study lives in `storage`; a run passes `run_dir` instead, and the study is then kept in the
run directory's SQLite file `RUN/optuna.db` (`STORAGE_FILE`), so `optuna-dashboard
sqlite:///RUN/optuna.db` opens a run, live or finished; each trial's user attribute `evomerge_id` is the candidate id, and genes are the params
`param_names` (default x0, x1, ...). Multi-objective studies (`multi_objective: true`, samplers
tpe, nsgaii, random) return the Pareto front.

Failed candidates are told the worst value of their tell batch for each objective (the worst
value seen so far when the whole batch failed; Optuna's FAIL state when nothing has succeeded
yet), with the error in the user attribute `evomerge_error`.

State: the sampler as a versioned pickle (its RandomState included) plus the study name, the
number of trials and the study's system attributes at save time. The trials themselves stay in
the storage. On load, when the storage holds trials asked after the checkpoint (a run that
crashed with candidates in flight), the trials known to the checkpoint are copied to a new
study `NAME.rK` as they were then, so the next asks are exactly those of the uninterrupted run
(Optuna seeds some samplers with trial numbers; stale trials would shift them).

optuna (and SQLAlchemy) are imported inside the functions that use them: importing optuna
takes about a second, and runs with other optimizers never need it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.options import Option
from evomerge.optim.state import pickle_blob, unpickle_blob

SAMPLERS = ("tpe", "cmaes", "nsgaii", "random")
STORAGE_FILE = "optuna.db"
_SINGLE_ONLY = {"cmaes"}


def open_storage(url: str) -> Any:
    """Optuna's RDB storage; SQLite files run in WAL mode with synchronous=NORMAL (about 3x fewer
    milliseconds per trial than the default, and still safe against a crash of the process)."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    if url.startswith("sqlite"):
        from sqlalchemy import event

        @event.listens_for(storage.engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        storage.engine.dispose()  # connections opened from now on get the pragmas
    return storage


def storage_url(storage: str | None, run_dir: str | Path | None) -> str | None:
    """The study's storage URL: `storage` as given, else the SQLite file of the run directory."""
    if storage is not None and run_dir is not None:
        raise ConfigError("give storage or run_dir, not both (run_dir means sqlite:///RUN_DIR/optuna.db)", field="storage")
    if run_dir is None:
        return None if storage is None else str(storage)
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError("run_dir is a file, not a directory", file=str(path), field="run_dir")
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / STORAGE_FILE).resolve()}"


class OptunaSearch(Optimizer):
    name = "optuna"
    OPTIONS = {
        "sampler": Option("tpe", "str", choices=SAMPLERS, label="optuna sampler"),
        "storage": Option(None, "str"),  # an Optuna storage URL; None (and no run_dir) keeps the study in memory
        "run_dir": Option(None, "path"),  # the run directory: the study goes to sqlite:///RUN_DIR/optuna.db
        "study_name": Option("evomerge", "str"),
        "popsize": Option(None, "int", low=2),  # nsgaii population / cmaes popsize; also the natural ask batch
        "param_names": Option(None, "list"),
        "sampler_options": Option(None, "mapping"),  # passed to the Optuna sampler's constructor
    }
    MULTI_OBJECTIVE = True

    @classmethod
    def keeps_run_files(cls, options: dict[str, Any]) -> bool:
        return options.get("storage") is None  # the study goes to RUN_DIR/optuna.db

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        import optuna

        opts = self.options  # types and ranges checked against OPTIONS
        self.sampler_name = str(opts["sampler"])
        if self.objectives.multi and self.sampler_name in _SINGLE_ONLY:
            raise ConfigError(
                f"optuna sampler '{self.sampler_name}' optimizes one objective; for a Pareto search use nsgaii, tpe or random",
                field="multi_objective",
            )
        if not (np.isfinite(self.lower).all() and np.isfinite(self.upper).all()):
            raise ConfigError("optuna needs finite bounds on every gene", field="bounds")
        self.popsize = opts["popsize"]
        names = opts["param_names"] or [f"x{i}" for i in range(self.dim)]
        if len(names) != self.dim or len(set(names)) != self.dim:
            raise ConfigError(f"param_names needs {self.dim} distinct names", field="param_names")
        self.param_names = [str(n) for n in names]
        self.distributions = {
            name: optuna.distributions.FloatDistribution(float(lo), float(hi))
            for name, lo, hi in zip(self.param_names, self.lower, self.upper, strict=True)
        }
        self.directions = ["maximize" if self.objectives.directions[n] else "minimize" for n in self.objectives.optimized]
        self.storage_url = storage_url(opts["storage"], opts["run_dir"])
        self.storage = open_storage(self.storage_url) if self.storage_url else None
        self.study_name = str(opts["study_name"])
        self._sampler = self._make_sampler(int(self.rng.integers(2**31 - 1)))
        self._study: Any = None
        self._n_trials = 0  # trials in the study (as this optimizer knows it)
        self._trial_of: dict[int, int] = {}  # candidate id -> trial number, for candidates in flight
        self._worst_raw: list[float | None] = [None] * len(self.objectives.optimized)

    def _make_sampler(self, seed: int) -> Any:
        import optuna

        extra = dict(self.options["sampler_options"] or {})
        try:
            if self.sampler_name == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **extra)
            if self.sampler_name == "random":
                return optuna.samplers.RandomSampler(seed=seed, **extra)
            if self.sampler_name == "nsgaii":
                return optuna.samplers.NSGAIISampler(population_size=self.popsize or 50, seed=seed, **extra)
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise ConfigError("optuna sampler 'cmaes' needs the package `cmaes` (pip install cmaes)", field="sampler") from None
            if self.popsize is not None:
                extra.setdefault("popsize", self.popsize)
            return optuna.samplers.CmaEsSampler(seed=seed, **extra)
        except TypeError as exc:
            raise ConfigError(f"optuna sampler '{self.sampler_name}' refused sampler_options: {exc}", field="sampler_options") from None

    def natural_batch(self) -> int:
        return self.popsize or 1

    # ---- study --------------------------------------------------------------------------
    def _create_study(self, name: str) -> Any:
        import optuna

        try:
            return optuna.create_study(storage=self.storage, study_name=name, sampler=self._sampler, directions=self.directions)
        except optuna.exceptions.DuplicatedStudyError:
            raise ConfigError(
                f"optuna study '{name}' already exists in {self.storage_url}; resume that run or pick another study_name",
                field="study_name",
            ) from None

    @property
    def study(self) -> Any:
        """The Optuna study (created on the first ask). In the run's own storage (`run_dir`) a
        stage that starts again from its seed (a resume before its first checkpoint, `evomerge
        resume --rebuild`) finds its earlier study there and takes the next free `NAME.rK`."""
        if self._study is None:
            name = self.study_name
            if self.options.get("run_dir") is not None:
                name = self._free_name(name)
            self._study = self._create_study(name)
        return self._study

    def _free_name(self, name: str) -> str:
        """`name`, or `NAME.rK` with the smallest K free, when the storage holds `name` already."""
        import optuna

        taken = set(optuna.get_all_study_names(storage=self.storage))
        if name not in taken:
            return name
        base = re.sub(r"\.r\d+$", "", name)
        k = 1
        while f"{base}.r{k}" in taken:
            k += 1
        return f"{base}.r{k}"

    def _propose(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(n):
            trial = self.study.ask(self.distributions)
            cid = self._new_id()
            trial.set_user_attr("evomerge_id", cid)
            self._n_trials += 1
            self._trial_of[cid] = trial.number
            genome = np.array([trial.params[name] for name in self.param_names], dtype=np.float64)
            batch = self.natural_batch()
            out.append(Candidate(id=cid, generation=cid // batch, genome=self._clip(genome), meta={"trial": trial.number}))
        return out

    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        from optuna.trial import TrialState

        raws = [self.objectives.raw(r) for r in results]
        for k, name in enumerate(self.objectives.optimized):
            finite = [raw[k] for raw in raws if raw is not None]
            if finite:
                up = self.objectives.directions[name]
                batch_worst = min(finite) if up else max(finite)
                seen = self._worst_raw[k]
                self._worst_raw[k] = batch_worst if seen is None else (min(seen, batch_worst) if up else max(seen, batch_worst))
        for cand, result, raw in zip(candidates, results, raws, strict=True):
            number = self._trial_of.pop(cand.id)
            if raw is None:
                self.study._storage.set_trial_user_attr(
                    self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number),
                    "evomerge_error",
                    result.error or "non-finite objective",
                )
                worst = self._batch_worst(raws)
                if worst is None:
                    self.study.tell(number, state=TrialState.FAIL)
                    continue
                raw = worst
            self.study.tell(number, raw[0] if len(raw) == 1 else raw)

    def _batch_worst(self, raws: list[list[float] | None]) -> list[float] | None:
        out = []
        for k, name in enumerate(self.objectives.optimized):
            finite = [raw[k] for raw in raws if raw is not None]
            if finite:
                out.append(min(finite) if self.objectives.directions[name] else max(finite))
            elif self._worst_raw[k] is not None:
                out.append(self._worst_raw[k])
            else:
                return None
        return out

    # ---- state --------------------------------------------------------------------------
    def _state(self) -> dict:
        if self.storage is None:
            raise ConfigError("an optuna study kept in memory cannot be checkpointed; set storage (sqlite:///RUN/optuna.db)", field="storage")
        study = self.study
        return {
            "sampler": pickle_blob(self._sampler, "optuna"),
            "study_name": study.study_name,
            "n_trials": self._n_trials,
            "trial_of": {str(k): v for k, v in self._trial_of.items()},
            "study_system_attrs": study._storage.get_study_system_attrs(study._study_id),
            "worst_raw": self._worst_raw,
        }

    def _load_state(self, state: dict) -> None:
        import optuna

        if self.storage is None:
            raise ConfigError("resuming an optuna run needs its storage (sqlite:///RUN/optuna.db)", field="storage")
        self._sampler = unpickle_blob(state["sampler"])
        self._n_trials = int(state["n_trials"])
        self._trial_of = {int(k): int(v) for k, v in state["trial_of"].items()}
        self._worst_raw = list(state["worst_raw"])
        name = state["study_name"]
        try:
            study = optuna.load_study(study_name=name, storage=self.storage, sampler=self._sampler)
        except KeyError:
            raise ConfigError(f"optuna study '{name}' is not in {self.storage_url}; the run directory is incomplete", field="storage") from None
        trials = study.get_trials(deepcopy=False)
        running = set(self._trial_of.values())
        consistent = (
            len(trials) == self._n_trials
            and all((t.state == optuna.trial.TrialState.RUNNING) == (t.number in running) for t in trials)
            and study._storage.get_study_system_attrs(study._study_id) == state["study_system_attrs"]
        )
        if len(trials) < self._n_trials:
            raise ConfigError(f"optuna study '{name}' has {len(trials)} trials but the checkpoint knows {self._n_trials}", field="storage")
        self._study = study if consistent else self._rebuild(name, trials[: self._n_trials], running, state["study_system_attrs"])

    def _rebuild(self, name: str, trials: list, running: set[int], system_attrs: dict) -> Any:
        """A new study holding the trials exactly as the checkpoint knew them."""
        from optuna.trial import FrozenTrial, TrialState

        _forget_study(self._sampler)
        study = self._create_study(self._free_name(name))
        for t in sorted(trials, key=lambda t: t.number):
            if t.number in running:
                t = FrozenTrial(
                    number=t.number,
                    state=TrialState.RUNNING,
                    value=None,
                    values=None,
                    datetime_start=t.datetime_start,
                    datetime_complete=None,
                    params=t.params,
                    distributions=t.distributions,
                    user_attrs={k2: v for k2, v in t.user_attrs.items() if k2 != "evomerge_error"},
                    system_attrs=t.system_attrs,
                    intermediate_values=t.intermediate_values,
                    trial_id=t._trial_id,
                )
            study.add_trial(t)
        new_ids = {t.number: t._trial_id for t in study.get_trials(deepcopy=False)}
        id_map = {t._trial_id: new_ids[t.number] for t in trials}
        prefix = getattr(type(self._sampler), "_get_parent_cache_key_prefix", None)
        prefix = prefix() if prefix else None
        for key, value in system_attrs.items():
            if prefix and key.startswith(prefix) and isinstance(value, list):
                value = [id_map[v] for v in value if v in id_map]
            study._storage.set_study_system_attr(study._study_id, key, value)
        return study


def _forget_study(obj: Any, seen: set[int] | None = None) -> None:
    """Reset the per-study search-space caches inside a sampler (IntersectionSearchSpace and the
    like remember the study id they first saw and refuse another one). They are caches of a
    function of the trials, so a reset only costs a recomputation."""
    seen = set() if seen is None else seen
    if id(obj) in seen or not hasattr(obj, "__dict__"):
        return
    seen.add(id(obj))
    if "_study_id" in vars(obj) and "_search_space" in vars(obj):
        obj._study_id = None
        obj._search_space = None
        if "_cached_trial_number" in vars(obj):
            obj._cached_trial_number = -1
    for value in list(vars(obj).values()):
        if type(value).__module__.startswith("optuna"):
            _forget_study(value, seen)
