"""lm-eval task lookup: one TaskManager per process, tasks loaded by name with errors a user can act on.

Building lm-eval's full task index takes ~16 s (it parses every YAML lm-eval ships), so the
managers are cached per process, and when every task an evaluator names is found in its local
folders (`include_path`) a manager over those folders alone is used (well under a second). lm-eval
silently skips task YAMLs it cannot parse; `load_task` looks for such a file when a name is
unknown, so the user sees the parse error instead of "unknown task".

lm-eval's modules are imported where they are used (importing lm-eval takes seconds).
"""

from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

log = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def task_manager(include_paths: tuple[str, ...] = (), include_defaults: bool = True) -> Any:
    """A cached `lm_eval.tasks.TaskManager` over `include_paths` (+ lm-eval's own tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _broken_yaml(name: str, include_paths: tuple[str, ...]) -> ConfigError | None:
    """The parse error of a local task YAML that seems to define `name`, if there is one."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for root in include_paths:
        for path in sorted(Path(root).glob("**/*.yaml")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if name not in text and name not in (path.stem, path.parent.name):
                continue
            try:
                load_yaml(path, resolve_func=False, recursive=True)
            except Exception as err:  # lm-eval raises yaml, OS and value errors alike
                return ConfigError(f"lm-eval cannot read this task YAML: {_one_line(err)}", file=str(path), field="task")
    return None


def find_manager(
    names: list[str], include_paths: tuple[str, ...], include_defaults: bool | None, *, file: str | None
) -> Any:
    """The cheapest manager that knows every name, or a ConfigError for the first unknown one.

    include_defaults: True/False force lm-eval's registry in or out; None uses it only when a
    name is not found in the local folders.
    """
    if include_paths and include_defaults is not True:
        local = task_manager(include_paths, False)
        if all(n in local.all_tasks for n in names) or include_defaults is False:
            manager = local
        else:
            manager = task_manager(include_paths, True)
    else:
        manager = task_manager(include_paths, True)
    for i, name in enumerate(names):
        if name in manager.all_tasks:
            continue
        broken = _broken_yaml(name, include_paths)
        if broken is not None:
            raise broken
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"closest known: {', '.join(close)}" if close else "no similar task is known"
        where = f"lm-eval tasks and {', '.join(include_paths)}" if include_paths else "lm-eval tasks"
        raise ConfigError(f"unknown task '{name}' (searched {where}); {hint}", file=file, field=f"tasks[{i}].task")
    return manager


def load_task(manager: Any, name: str, *, file: str | None, field: str) -> Any:
    """The lm-eval Task object of `name` (its dataset loaded); groups and tags are refused."""
    entry = manager.task_index.get(name)
    task_file = str(entry.yaml_path) if entry is not None and entry.yaml_path else file
    try:
        loaded = manager.load([name])
    except Exception as err:  # missing data file, bad !function, dataset not cached offline...
        raise ConfigError(f"task '{name}' cannot be loaded: {_one_line(err)}", file=task_file, field=field) from err
    tasks = loaded["tasks"]
    if len(tasks) != 1 or name not in tasks:
        members = ", ".join(sorted(tasks)[:12]) + (" ..." if len(tasks) > 12 else "")
        raise ConfigError(
            f"'{name}' is a group or tag of {len(tasks)} tasks; list the tasks themselves: {members}",
            file=file,
            field=field,
        )
    return tasks[name]
