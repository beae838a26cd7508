"""`evomerge resume DIR --set key=value`: what may change when a run goes on, and what may not.

A run's history (ledger, optimizer state, archive) was made with its seed, models, search spaces,
evaluators and optimizers; changing any of them would make the rest of the run a different
experiment, so they are refused with a one-line error naming the field. What may change:

- a stage's budget (`stages.NAME.budget.evaluations`, `.seconds`): for a stage not yet finished,
  up or down (a budget already spent stops the stage at its next ask); for the last stage of a
  finished run, raising it reopens that stage and its search goes on from where it stopped (the
  final checkpoint keeps its optimizer), then its holdout top-k and the run's best are redone;
- a stage's `holdout_top_k`, for a stage not yet finished (or the reopened last stage);
- `ray.*` (workers, CPUs/GPUs per worker, address) and `memory.*` (the budgets): how the rest
  is evaluated, not what;
- `tracking.*` (`evomerge.tracking`): where the rest is logged.

The changed experiment replaces `experiment.yaml` (written atomically) and each accepted change
is appended to `resume.log` in the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evomerge.config import Experiment, apply_sets, parse_experiment, parse_sets
from evomerge.errors import ConfigError
from evomerge.run.rundir import RunDir, experiment_data

SETTABLE = "stages.NAME.budget.evaluations/seconds, stages.NAME.holdout_top_k, ray.*, memory.*, tracking.*"


def _diff(old: Any, new: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple] = []
        for key in dict.fromkeys([*old, *new]):
            out += _diff(old.get(key), new.get(key), (*path, key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and path == ("stages",):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _diff(a, b, (*path, i))]
    return [] if old == new else [path]


def field_name(path: tuple) -> str:
    """("stages", 0, "budget", "evaluations") -> "stages[0].budget.evaluations"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _settable(path: tuple) -> bool:
    if path[:1] in (("ray",), ("memory",), ("tracking",)):
        return True
    return len(path) >= 3 and path[0] == "stages" and isinstance(path[1], int) and path[2] in ("budget", "holdout_top_k")


def resume_changes(run_dir: Path, exp: Experiment, sets: list[str] | tuple[str, ...], ckpt: dict | None) -> tuple[Experiment, list[str], bool]:
    """The experiment with `sets` applied, the changes (as "field: old -> new"), and whether the
    finished run's last stage reopens. Raises ConfigError (file experiment.yaml, the field) for a
    change that may not be made."""
    file = str(RunDir(run_dir).experiment)
    raw = experiment_data(run_dir)
    try:
        new = parse_experiment(apply_sets(raw, parse_sets(sets)), file=file)
    except ConfigError as exc:
        raise exc.located(file=file) from None
    old_data, new_data = exp.to_dict(), new.to_dict()
    ckpt = ckpt or {}
    done = set(ckpt.get("stages_done", []))
    finished = bool(ckpt.get("finished"))
    last_index = len(exp.stages) - 1
    last = exp.stages[last_index].name
    can_reopen = finished and (ckpt.get("final_optimizer") or {}).get("stage") == last
    last_stage_fields: list[str] = []
    changes = []
    for path in _diff(old_data, new_data):
        field = field_name(path)
        if not _settable(path):
            raise ConfigError(f"cannot change on resume (the run so far was made with it); what may change: {SETTABLE}", file=file, field=field)
        if path[0] == "stages" and exp.stages[path[1]].name in done:
            name = exp.stages[path[1]].name
            if path[1] != last_index or not can_reopen:
                raise ConfigError(
                    f"stage '{name}' is finished; only a stage not yet finished changes its budget or holdout_top_k "
                    "(or the last stage of a finished run, whose raised budget reopens it)",
                    file=file,
                    field=field,
                )
            last_stage_fields.append(field)
        changes.append(f"{field}: {_get(old_data, path)!r} -> {_get(new_data, path)!r}")
    reopen = bool(last_stage_fields) and _raises_budget(exp.stages[last_index], new.stages[last_index])
    if last_stage_fields and not reopen:
        raise ConfigError(f"stage '{last}' is finished; raise its budget to reopen it", file=file, field=last_stage_fields[0])
    return new, changes, reopen


def _raises_budget(old: Any, new: Any) -> bool:
    def more(a: float | None, b: float | None) -> bool:
        return (a is not None and b is None) or (a is not None and b is not None and b > a)

    return more(old.budget.evaluations, new.budget.evaluations) or more(old.budget.seconds, new.budget.seconds)


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def reopened_checkpoint(ckpt: dict, stage: str) -> dict:
    """The finished run's final checkpoint turned into one in the middle of its last stage."""
    out = dict(ckpt)
    out["finished"] = False
    out["stages_done"] = [s for s in ckpt.get("stages_done", []) if s != stage]
    out["stage"] = stage
    out["phase"] = "search"
    out["optimizer"] = ckpt["final_optimizer"]["state"]
    out.pop("final_optimizer", None)
    return out


def log_changes(run_dir: Path, changes: list[str]) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(run_dir / "resume.log", "a", encoding="utf-8") as handle:
        for change in changes:
            handle.write(f"{stamp} {change}\n")
