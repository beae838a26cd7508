"""What a report shows, read from a run directory: stages, their evaluations, baselines, sources.

Everything here is plain data (no plotting). A run may be unfinished or resumed while it is read:
the ledger is opened read-only, missing files are tolerated, and every fact the ledger cannot give
(budgets, baselines, sources) comes from `evomerge.run.status.run_status` when it can be computed.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.fidelity.figures import documents_line
from evomerge.memory import memory_lines
from evomerge.optim.fitness import dominates
from evomerge.recipe import Recipe, evaluate_setting
from evomerge.resources import read_yaml
from evomerge.run.ledger import BASELINE_PREFIX, Ledger
from evomerge.run.rundir import EXPERIMENT_FILE, LEDGER_FILE, is_run_dir
from evomerge.spaces.config import space_kind_of


class NotARunError(EvomergeError):
    """The directory given to `evomerge report` holds no run."""


# ---- rows and stages ---------------------------------------------------------------------------


def row_ok(row: Any) -> bool:
    """A row that counts: evaluated without error and with a finite fitness."""
    return row.status == "ok" and row.fitness is not None and math.isfinite(row.fitness)


@dataclass
class StageView:
    """One stage of a run: its search evaluations (in ledger order) and holdout scores."""

    name: str
    kind: str  # the space's kind (with no space: the optimizer's name), or "unknown"
    search: list[Any]  # LedgerRow, ordered by seq
    holdout: list[Any]
    directions: dict[str, bool]  # objective name -> higher_is_better, in declared order
    budget: int | None = None
    finished: bool | None = None
    multi: bool = False  # a Pareto search over every objective
    primary: str | None = None  # the objective `fitness` holds (None: the first one)

    @property
    def primary_objective(self) -> str:
        return self.primary or next(iter(self.directions), "fitness")

    @property
    def ok(self) -> list[Any]:
        return [r for r in self.search if row_ok(r)]

    @property
    def failures(self) -> int:
        return sum(not row_ok(r) for r in self.search)

    def best(self) -> Any | None:
        """The search row with the highest fitness (first one on ties)."""
        ok = self.ok
        return max(ok, key=lambda r: r.fitness) if ok else None

    def top(self, k: int) -> list[Any]:
        """The k best search rows with distinct recipes."""
        seen: set[str] = set()
        out = []
        for row in sorted(self.ok, key=lambda r: (-r.fitness, r.seq)):
            if row.recipe_hash in seen:
                continue
            seen.add(row.recipe_hash)
            out.append(row)
            if len(out) == k:
                break
        return out

    def front(self, objectives: Sequence[str] | None = None) -> list[Any]:
        """Non-dominated successful search rows (distinct recipes) over `objectives` (default: all
        of the stage's), sorted by the first objective."""
        names = list(objectives or self.directions)
        rows, seen = [], set()
        for row in self.ok:
            values = [row.objectives.get(n) for n in names]
            if row.recipe_hash in seen or not all(v is not None and math.isfinite(v) for v in values):
                continue
            seen.add(row.recipe_hash)
            rows.append(row)
        if not rows:
            return []
        points = np.array([[r.objectives[n] for n in names] for r in rows], dtype=np.float64)
        return [rows[i] for i in pareto_front(points, [self.directions.get(n, True) for n in names])]

    def holdout_of(self, recipe_hash: str) -> Any | None:
        """The latest holdout row of a recipe in this stage, if it was scored on holdout."""
        found = [r for r in self.holdout if r.recipe_hash == recipe_hash]
        return found[-1] if found else None

    def fitness_series(self) -> tuple[np.ndarray, np.ndarray]:
        """(fitness of each evaluation in order, NaN when failed; best so far)."""
        values = np.array([r.fitness if row_ok(r) else np.nan for r in self.search], dtype=np.float64)
        best = np.fmax.accumulate(values) if len(values) else values
        return values, best


@dataclass
class Baseline:
    """A hand-set merge or a source model scored by the run."""

    name: str
    search: dict[str, float] = field(default_factory=dict)
    holdout: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class RunView:
    """Everything the report shows about one run."""

    run_dir: Path
    name: str
    stages: list[StageView]
    sources: list[str]
    baselines: list[Baseline]
    best_recipe_yaml: str | None
    best_scores: dict | None
    finished: bool | None
    evaluations: int
    budget: int | None
    base: str | None = None
    notes: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)  # the memory budget and holdings (memory_lines)
    documents: list[str] = field(default_factory=list)  # per stage: documents evaluated vs a full run (evomerge.fidelity.figures)


# ---- loading -----------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> RunView:
    """Read a run directory; raises NotARunError (one line) when `run_dir` is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "it is a file" if run_dir.exists() else "it does not exist"
        raise NotARunError(f"not a run directory ({what})", file=str(run_dir))
    if not is_run_dir(run_dir):
        raise NotARunError(
            f"not a run directory (it needs {EXPERIMENT_FILE} and {LEDGER_FILE}; "
            "give the directory `evomerge run` wrote, e.g. runs/NAME)",
            file=str(run_dir),
        )
    notes: list[str] = []
    rows, stage_order = _read_ledger(run_dir / LEDGER_FILE)
    if not rows:
        notes.append("no evaluations yet (the ledger is empty)")
    status = _run_status(run_dir, notes)
    experiment = _read_yaml(run_dir / EXPERIMENT_FILE, notes)
    return build_view(run_dir, rows, stage_order=stage_order, status=status, experiment=experiment, notes=notes)


def build_view(
    run_dir: Path,
    rows: Sequence[Any],
    *,
    stage_order: Sequence[str] = (),
    status: Mapping[str, Any] | None = None,
    experiment: Mapping[str, Any] | None = None,
    notes: list[str] | None = None,
) -> RunView:
    """Assemble a RunView from ledger rows and the (optional) status and experiment dicts."""
    status = dict(status or {})
    experiment = dict(experiment or {})
    notes = list(notes or [])
    stage_facts = experiment_stage_facts(experiment)
    for facts in status.get("stages") or []:
        if isinstance(facts, Mapping) and facts.get("name") is not None:
            known = stage_facts.setdefault(str(facts["name"]), {})
            known.update({k: v for k, v in facts.items() if v is not None and v != "?"})
    baselines, baseline_seqs = ledger_baselines(rows)
    rows = [r for r in rows if r.seq not in baseline_seqs]
    names = list(dict.fromkeys([*stage_facts, *stage_order, *(r.stage for r in sorted(rows, key=lambda r: r.seq))]))
    stages = []
    for name in names:
        facts = stage_facts.get(name, {})
        stage_rows = sorted((r for r in rows if r.stage == name), key=lambda r: r.seq)
        if not stage_rows and name not in stage_facts:
            continue  # a stage that held only baseline rows
        search = [r for r in stage_rows if r.split == "search"]
        holdout = [r for r in stage_rows if r.split == "holdout"]
        stage = StageView(
            name=name,
            kind="unknown",
            search=search,
            holdout=holdout,
            directions=_directions(facts.get("objectives"), stage_rows),
            budget=_budget(facts.get("budget")),
            finished=facts.get("finished") if isinstance(facts.get("finished"), bool) else None,
            primary=str(facts["objective"]) if facts.get("objective") else None,
        )
        multi = facts.get("multi_objective")
        stage.multi = bool(multi) if isinstance(multi, bool) else len(stage.directions) >= 2
        stage.kind = str(facts.get("space_kind") or infer_kind(stage))
        stages.append(stage)

    best_yaml = _read_text(run_dir / "best" / "recipe.yaml")
    best_scores = _read_json(run_dir / "best" / "scores.json", notes)
    evaluations = _int_or_none(status.get("evaluations"))
    if evaluations is None:
        evaluations = sum(len(s.search) for s in stages)
    return RunView(
        run_dir=run_dir,
        name=str(experiment.get("name") or run_dir.resolve().name),
        stages=stages,
        sources=_sources(status, experiment, stages),
        baselines=_merge_baselines(parse_baselines(status.get("baselines")), baselines),
        best_recipe_yaml=best_yaml,
        best_scores=best_scores,
        finished=status.get("finished") if isinstance(status.get("finished"), bool) else None,
        evaluations=evaluations,
        budget=_budget(status.get("budget")),
        base=_base_of(status, experiment),
        notes=notes,
        memory=memory_lines(status.get("memory")),
        documents=[line.strip() for facts in status.get("stages") or [] if isinstance(facts, Mapping) and (line := documents_line(f"{facts.get('name')} ({facts.get('fidelity', 'full')}):", facts.get("documents")))],
    )


def experiment_stage_facts(experiment: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage of the frozen experiment: space_kind and the evaluation budget (what the status
    would say, known before any evaluation)."""
    out: dict[str, dict[str, Any]] = {}
    for stage in experiment.get("stages") or []:
        if not isinstance(stage, Mapping) or stage.get("name") is None:
            continue
        facts: dict[str, Any] = {}
        optimizer = stage.get("optimizer")
        space = stage.get("space")
        if "space" in stage and space is None and isinstance(optimizer, Mapping):  # the optimizer's candidates carry recipes
            facts["space_kind"] = str(optimizer.get("name"))
        elif isinstance(space, str | Mapping):
            overrides = stage.get("space_overrides")
            if kind := space_kind_of(space, overrides if isinstance(overrides, Mapping) else None):
                facts["space_kind"] = kind
        facts["budget"] = stage.get("budget")
        if isinstance(optimizer, Mapping):
            facts["multi_objective"] = bool(optimizer.get("multi_objective", False))
            if optimizer.get("objective"):
                facts["objective"] = optimizer["objective"]
        out[str(stage["name"])] = facts
    return out


def ledger_baselines(rows: Sequence[Any]) -> tuple[list[Baseline], set[int]]:
    """Hand-set baselines the run scored for reference: rows whose stage is `baseline:NAME` (or
    marked `meta.baseline: NAME`), by name, and the seqs of those rows (they are no stage's)."""
    found: dict[str, Baseline] = {}
    seqs: set[int] = set()
    for row in sorted(rows, key=lambda r: r.seq):
        meta = getattr(row, "meta", None) or {}
        if row.stage.startswith(BASELINE_PREFIX):
            name = row.stage[len(BASELINE_PREFIX):]
        elif isinstance(meta.get("baseline"), str):
            name = meta["baseline"]
        else:
            continue
        seqs.add(row.seq)
        baseline = found.setdefault(name, Baseline(name=name, note=f"recipe {row.recipe_hash}"))
        if row_ok(row):
            scores = {k: float(v) for k, v in row.objectives.items()}
            (baseline.holdout if row.split == "holdout" else baseline.search).update(scores)
    return list(found.values()), seqs


def _merge_baselines(first: list[Baseline], second: list[Baseline]) -> list[Baseline]:
    names = {b.name for b in first}
    return [*first, *(b for b in second if b.name not in names)]


def _read_ledger(path: Path) -> tuple[list[Any], list[str]]:
    try:
        with Ledger.open(path, readonly=True) as ledger:
            return ledger.rows(), ledger.stages()
    except sqlite3.Error as exc:
        raise NotARunError(f"the ledger cannot be read ({exc}); is it an evomerge ledger?", file=str(path)) from None


def _run_status(run_dir: Path, notes: list[str]) -> dict:
    """The run's status facts; a run that is being written may not give all of them."""
    if not (run_dir / LEDGER_FILE).is_file():
        return {}
    try:  # imported here: a run whose status cannot be computed still gets a report
        from evomerge.run.status import run_status

        return dict(run_status(run_dir))
    except Exception as exc:  # an unfinished or damaged run must still get a report
        notes.append(f"run status unavailable ({type(exc).__name__}: {exc}); figures come from the ledger alone")
        return {}


def _read_yaml(path: Path, notes: list[str]) -> dict:
    try:
        data = read_yaml(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return {}
    except EvomergeError as exc:  # not text or not YAML: the report goes on without it
        notes.append(f"{path.name}: {exc.message}")
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path, notes: list[str]) -> dict | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        notes.append(f"{path.parent.name}/{path.name} is not valid JSON (being written?)")
        return None
    return data if isinstance(data, dict) else {"value": data}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _budget(value: Any) -> int | None:
    """An evaluation budget given as a number or as {evaluations, seconds}."""
    if isinstance(value, Mapping):
        value = value.get("evaluations")
    return _int_or_none(value)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _directions(declared: Any, rows: Sequence[Any]) -> dict[str, bool]:
    """Objective directions: as the status declares them (a dict or a list of {name, higher_is_better}),
    completed from the rows."""
    out: dict[str, bool] = {}
    if isinstance(declared, Mapping):
        out.update({str(k): bool(v) for k, v in declared.items() if isinstance(v, bool)})
    elif isinstance(declared, list):
        for item in declared:
            if isinstance(item, Mapping) and "name" in item:
                up = item.get("higher_is_better", item.get("direction", "maximize"))
                out[str(item["name"])] = up if isinstance(up, bool) else str(up).startswith("max")
    for row in rows:
        for name, up in (row.higher_is_better or {}).items():
            out.setdefault(name, bool(up))
    return out


def _sources(status: Mapping[str, Any], experiment: Mapping[str, Any], stages: list[StageView]) -> list[str]:
    def as_names(value: Any) -> list[str]:
        if isinstance(value, Mapping):
            return [str(k) for k in value]
        if isinstance(value, list):
            out = []
            for item in value:
                if isinstance(item, Mapping):
                    name = item.get("ref") or item.get("name") or item.get("model")
                    if name:
                        out.append(str(name))
                elif item is not None:
                    out.append(str(item))
            return out
        return []

    models = experiment.get("models")
    declared: list[str] = []
    if isinstance(models, Mapping):  # {base, sources} as the experiment schema has it
        declared = [*([str(models["base"])] if models.get("base") else []), *as_names(models.get("sources"))]
    found = as_names(status.get("sources")) or declared or as_names(models)
    if found:
        return list(dict.fromkeys(found))
    refs: list[str] = []
    for stage in stages:
        best = stage.best()
        recipe = parse_recipe(best.recipe_yaml) if best is not None else None
        if recipe is not None:
            refs.extend(r for r in recipe.model_refs() if not r.startswith(("stage:", "archive:")))
    return list(dict.fromkeys(refs))


def _base_of(status: Mapping[str, Any], experiment: Mapping[str, Any]) -> str | None:
    models = experiment.get("models")
    base = status.get("base") or (models.get("base") if isinstance(models, Mapping) else None)
    return str(base) if base else None


def parse_baselines(value: Any) -> list[Baseline]:
    """Baselines as run_status gives them: a list of {name, search, holdout} (or `objectives` for the
    search scores), or a mapping name -> that; a bare number is the score of a single objective."""
    if not value:
        return []
    items = [{"name": k, **(v if isinstance(v, Mapping) else {"search": v})} for k, v in value.items()] if isinstance(value, Mapping) else value
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        out.append(
            Baseline(
                name=str(item.get("name") or item.get("recipe") or "baseline"),
                search=_scores(item.get("search", item.get("objectives"))),
                holdout=_scores(item.get("holdout")),
                note=str(item.get("note") or item.get("description") or (f"recipe {item['recipe_hash']}" if item.get("recipe_hash") else "")),
            )
        )
    return out


def _scores(value: Any) -> dict[str, float]:
    if isinstance(value, bool) or value is None:
        return {}
    if isinstance(value, int | float):
        return {"score": float(value)}
    if isinstance(value, Mapping):
        inner = value.get("objectives") if isinstance(value.get("objectives"), Mapping) else value
        return {str(k): float(v) for k, v in inner.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {}


# ---- recipes -----------------------------------------------------------------------------------


def parse_recipe(text: str | None) -> Recipe | None:
    """A ledger row's recipe, or None when it is empty or not a recipe (e.g. raw-weights genomes)."""
    if not text:
        return None
    try:
        return Recipe.from_string(text)
    except (EvomergeError, yaml.YAMLError, TypeError, ValueError):
        return None


def infer_kind(stage: StageView) -> str:
    """The space kind when the status does not say: a DFS recipe carries its path, an M2N2 child
    merges archive members, a PS candidate has a genome and a parametric recipe."""
    rows = stage.search or stage.holdout
    if not rows:
        return "unknown"
    recipe = parse_recipe(rows[-1].recipe_yaml)
    if recipe is None:
        return "weights" if rows[-1].genome else "unknown"
    if dfs_steps(recipe):
        return "dfs"
    if any(ref.startswith("archive:") for ref in recipe.model_refs()):
        return "m2n2"
    return "ps"


def dfs_steps(recipe: Recipe) -> list[dict[str, Any]]:
    """The readable DFS layer path of a recipe (`evomerge.dfs_path`): model, layer, input_scale,
    cumulative_scale per step; [] when the recipe has none."""
    block = recipe.evomerge.model_dump() if recipe.evomerge else {}
    steps = block.get("dfs_path") or []
    out = []
    for step in steps:
        if isinstance(step, Mapping) and "model" in step and "layer" in step:
            out.append(
                {
                    "model": str(step["model"]),
                    "layer": int(step["layer"]),
                    "input_scale": float(step.get("input_scale", 1.0)),
                    "cumulative_scale": float(step.get("cumulative_scale", 1.0)),
                }
            )
    return out


@dataclass
class ParamGrid:
    """One merge parameter of a recipe over models (rows) and layer groups (columns)."""

    name: str
    rows: list[str]
    columns: list[str]
    values: np.ndarray  # len(rows) x len(columns), NaN where the parameter is not set


ALL_MODELS = "(all models)"


def short_ref(ref: str) -> str:
    """A readable model label: the last component of a path, repo id or zoo reference."""
    tail = ref.rstrip("/").rsplit("/", 1)[-1]
    return tail.split(":")[-1] or ref


def ps_parameter_grids(recipe: Recipe) -> list[ParamGrid]:
    """Numeric merge parameters of a recipe as grids, one per parameter name.

    Columns are layer groups: one per output slice for a `slices:` recipe (a gradient inside a
    slice shows its mid-slice value), else the anchors of the longest gradient list (one column
    "all layers" when every value is a scalar). Rows are models, split by module filter when a
    value is a `{filter, value}` list ("other" = the condition without a filter). Parameters set
    at slice or top level (method-wide ones such as slerp's `t`) show as "(all models)".
    """
    cells: dict[str, dict[str, dict[int, float]]] = {}

    def put(param: str, row: str, col: int, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            cells.setdefault(param, {}).setdefault(row, {})[col] = float(value)

    def put_setting(param: str, label: str, setting: Any, positions: list[tuple[int, float]]) -> None:
        for flt, probe in _filter_probes(setting):
            row = f"{label} [{flt}]" if flt is not None else label
            for col, t in positions:
                put(param, row, col, evaluate_setting(setting, probe, t))

    if recipe.slices:
        columns = [_slice_label(s.sources[0].layer_range) for s in recipe.slices]
        for col, out_slice in enumerate(recipe.slices):
            if out_slice.sources[0].layer_range[0] == out_slice.sources[0].layer_range[1]:
                continue  # an empty framing slice carries no layers
            where = [(col, 0.5)]
            for source in out_slice.sources:
                for param, setting in (source.parameters or {}).items():
                    put_setting(param, short_ref(source.model), setting, where)
            for param, setting in (out_slice.parameters or {}).items():
                put_setting(param, ALL_MODELS, setting, where)
        for param, setting in (recipe.parameters or {}).items():
            put_setting(param, ALL_MODELS, setting, [(c, 0.5) for c in range(len(columns))])
    else:
        settings = [*(m.parameters or {} for m in recipe.models or []), recipe.parameters or {}]
        n = max([_gradient_length(v) for params in settings for v in params.values()] or [1])
        columns = ["all layers"] if n == 1 else [f"depth {i / (n - 1):.2f}" for i in range(n)]
        where = [(i, i / (n - 1) if n > 1 else 0.0) for i in range(n)]
        for model in recipe.models or []:
            for param, setting in (model.parameters or {}).items():
                put_setting(param, short_ref(model.model), setting, where)
        for param, setting in (recipe.parameters or {}).items():
            put_setting(param, ALL_MODELS, setting, where)

    grids = []
    for param, by_row in cells.items():
        rows = list(by_row)
        values = np.full((len(rows), len(columns)), np.nan)
        for i, row in enumerate(rows):
            for col, value in by_row[row].items():
                values[i, col] = value
        keep = ~np.all(np.isnan(values), axis=0)  # drop columns no parameter reaches (framing slices)
        grids.append(ParamGrid(param, rows, [c for c, k in zip(columns, keep, strict=True) if k], values[:, keep]))
    return grids


def _slice_label(layer_range: tuple[int, int]) -> str:
    start, end = layer_range
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def _gradient_length(setting: Any) -> int:
    if isinstance(setting, list):
        if setting and all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
            return len(setting)
        return max([_gradient_length(c.get("value")) for c in setting if isinstance(c, Mapping)] or [1])
    if isinstance(setting, Mapping):
        return _gradient_length(setting.get("value"))
    return 1


_NO_FILTER_PROBE = "\x00"  # a tensor name no filter matches: picks the condition without a filter


def _filter_probes(setting: Any) -> list[tuple[str | None, str]]:
    """(row suffix, tensor name that selects it) for each condition of a `{filter, value}` list."""
    conds = [setting] if isinstance(setting, Mapping) else setting if isinstance(setting, list) else []
    conds = [c for c in conds if isinstance(c, Mapping)]
    if not conds:
        return [(None, _NO_FILTER_PROBE)]
    return [(str(c["filter"]), str(c["filter"])) if c.get("filter") else ("other", _NO_FILTER_PROBE) for c in conds]


# ---- multi-objective ---------------------------------------------------------------------------


def pareto_front(points: np.ndarray, higher_is_better: Sequence[bool]) -> np.ndarray:
    """Indices of the non-dominated rows of `points` (n x d), sorted by the first objective.

    Dominance is the optimizers' (`optim.fitness.dominates`), on columns turned higher-is-better.
    """
    points = np.asarray(points, dtype=np.float64)
    gain = [tuple(v if up else -v for v, up in zip(row, higher_is_better, strict=True)) for row in points.tolist()]
    keep = [i for i, g in enumerate(gain) if not any(dominates(o, g) for j, o in enumerate(gain) if j != i)]
    idx = np.array(keep, dtype=int)
    return idx[np.argsort(points[idx, 0], kind="stable")] if keep else idx
