"""The `evomerge` command line.

Each verb imports what it needs when it runs, so `evomerge --help`, `space describe` and the
torch-free `merge` path start without loading torch, Ray or lm-eval.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click

from evomerge.errors import EvomergeError, one_line_warnings


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2: errors evomerge raises where it
    knows what went wrong (EvomergeError), and as the last line of defence file faults nothing
    caught before (OSError, a SQLite file: `evomerge.faults`). Ctrl-C ends with one line (naming
    `evomerge resume DIR` when a run was going on) and exit code 130."""

    def invoke(self, ctx: click.Context):
        import sqlite3

        from evomerge.faults import os_fault, sqlite_fault

        try:
            return super().invoke(ctx)
        except EvomergeError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:  # RunInterrupted says how the run goes on
            click.echo(str(exc) or "interrupted (Ctrl-C)", err=True)
            sys.exit(130)
        except OSError as exc:
            _fail(str(os_fault(exc)), 2)
        except sqlite3.DatabaseError as exc:
            _fail(str(sqlite_fault(exc, "database")), 2)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


@click.group(cls=_Group)
@click.version_option(package_name="evomerge")
def main() -> None:
    """Evolutionary search for model-merge recipes."""
    one_line_warnings()


_FORCE_HELP = (
    "Write into a non-empty --out that evomerge did not write: files of the model's names are replaced, nothing is removed."
)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) checkpoints as sources.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB, 500MB.")
@click.option("--force", is_flag=True, help=_FORCE_HELP)
def merge(recipe: Path, out_dir: Path, allow_pickle: bool, max_shard_size: str, force: bool) -> None:
    """Build the model a mergekit-format RECIPE describes and write it to --out."""
    from evomerge import api
    from evomerge.progress import Progress
    from evomerge.recipe import Recipe

    Recipe.from_yaml(recipe)  # a bad recipe is named before a bad --max-shard-size
    shard_bytes = parse_size(max_shard_size)
    start = time.perf_counter()
    with Progress("merging tensors") as bar:
        out = api.merge(
            recipe, out_dir, allow_pickle=allow_pickle, max_shard_bytes=shard_bytes, force=force,
            progress=bar.update, pickle_switch="pass --allow-pickle",
        )  # fmt: skip
    click.echo(f"wrote {out} ({time.perf_counter() - start:.1f} s)")


@main.group()
def space() -> None:
    """Search spaces: what a genome means."""


@space.command("describe")
@click.argument("space_ref")
@click.option("--models", required=True, help="Comma-separated model references (DFS: model A first).")
@click.option("--base", default=None, help="Base model, for methods that need one.")
def space_describe(space_ref: str, models: str, base: str | None) -> None:
    """Print the genome size of SPACE_REF (a built-in name or a YAML path) and what each gene controls."""
    from evomerge.merge.sources import SourcePool
    from evomerge.spaces import build_space

    refs = [m.strip() for m in models.split(",") if m.strip()]
    if not refs:
        raise EvomergeError("no model given (comma-separated references, e.g. zoo:tiny/add,zoo:tiny/reverse)", field="--models")
    pool = SourcePool(pickle_switch=None)
    pool.open_all([*(("--models", ref) for ref in refs), *((("--base", base),) if base else ())])
    try:
        built = build_space(space_ref, models=refs, base=base, pool=pool)
    except EvomergeError as exc:  # the space names an experiment's fields; here they are options
        exc.field = {"models": "--models", "models.base": "--base"}.get(exc.field or "", exc.field)
        raise
    click.echo(built.describe())


@main.group()
def zoo() -> None:
    """Tiny, deterministic models for the demo and the tests."""


@zoo.command("build")
@click.option("--preset", type=click.Choice(["test", "tiny", "digits"]), default="tiny", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Directory (default: the cache).")
def zoo_build(preset: str, out_dir: Path | None) -> None:
    """Build (or reuse from the cache) a zoo preset and print where it is."""
    from evomerge.zoo import build_zoo

    path = build_zoo(preset, out_dir, progress=click.echo)
    click.echo(str(path))


@zoo.command("list")
@click.option("--preset", type=click.Choice(["test", "tiny", "digits"]), default="tiny", show_default=True)
def zoo_list(preset: str) -> None:
    """List a preset's models as zoo: references."""
    from evomerge.zoo import list_zoo_models

    for name in list_zoo_models(preset):
        click.echo(f"zoo:{preset}/{name}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Where the demo writes (default: runs/demo).")
@click.option("--merge-only", is_flag=True, help="Skip the search: one hand-set TIES merge of two experts (seconds).")
def demo(out_dir: Path | None, merge_only: bool) -> None:
    """The main job of `make run`: build the tiny zoo, evolve a PS+DFS merge of its experts on
    local Ray workers (experiments/tiny_ps_dfs.yaml), export the best model, write the report and
    print the results table."""
    from evomerge.demo import run_demo_search, run_merge_only

    (run_merge_only if merge_only else run_demo_search)(out_dir, echo=click.echo)


# --- run, resume, status, export (orchestration) ---------------------------------------------


@main.command()
@click.argument("experiment")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Run directory (default: OUTPUT_DIR/NAME of the experiment).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. stages.ps.budget.evaluations=20 (repeatable).")
@click.option("--local", is_flag=True, help="Evaluate in this process instead of on Ray workers.")
def run(experiment: str, out_dir: Path | None, sets: tuple[str, ...], local: bool) -> None:
    """Validate EXPERIMENT (a YAML path or a built-in name) and run it."""
    from evomerge import api

    run_obj = api.run(api.Experiment(experiment).with_overrides(*sets), out=out_dir, local=local, echo=click.echo)
    click.echo(f"done: {run_obj.run_dir} (evomerge status {run_obj.run_dir})")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Change a budget, holdout_top_k or ray setting, e.g. stages.ps.budget.evaluations=200 (repeatable; "
              "seed, models, spaces, evaluators and optimizers are fixed). A raised budget of a finished run's last stage reopens it.")  # fmt: skip
@click.option("--local", is_flag=True, help="Evaluate in this process instead of on Ray workers.")
@click.option("--rebuild", is_flag=True,
              help="Re-evaluate the rows the ledger lost (a copy made without ledger.sqlite-wal): the first stage that lost "
              "rows restarts from its seed, surviving rows are told again from the ledger, only missing ones are evaluated.")  # fmt: skip
def resume(run_dir: Path, sets: tuple[str, ...], local: bool, rebuild: bool) -> None:
    """Carry on the run in RUN_DIR from its last checkpoint (after a stop, a crash or kill -9)."""
    from evomerge import api

    api.resume(run_dir, overrides=sets, local=local, echo=click.echo, rebuild=rebuild)
    click.echo(f"done: {run_dir}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run_dir: Path, as_json: bool) -> None:
    """Stage, evaluations/budget, best search and holdout scores, failures, finished or not."""
    import json

    from evomerge import api
    from evomerge.run.status import format_status

    facts = api.Run(run_dir).status()
    click.echo(json.dumps(facts, indent=2, default=str) if as_json else format_status(facts))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Also write the merged model here (outside RUN_DIR).")
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.option("--push-to-hub", "repo", default=None, metavar="REPO",
              help="Upload the exported model to this Hugging Face Hub repo (user-or-org/name; created when missing); "
              "without --out it is exported to a temporary directory.")  # fmt: skip
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo as private.")
def export(run_dir: Path, out_dir: Path | None, force: bool, repo: str | None, private: bool) -> None:
    """Write RUN_DIR/best/recipe.yaml (a mergekit config) and, with --out, the merged model;
    --push-to-hub uploads the model to the Hugging Face Hub."""
    if private and repo is None:
        raise EvomergeError("give --private with --push-to-hub REPO", field="--private")
    from evomerge import api

    if repo is not None:
        pushed = api.Run(run_dir).push_to_hub(repo, out=out_dir, private=private, force=force, echo=click.echo)
        click.echo(f"recipe: {pushed.recipe}" + (f"\nmodel: {pushed.model}" if pushed.model else ""))
        click.echo(f"pushed: {pushed.url}")
        return
    exported = api.Run(run_dir).export(out_dir, force=force)
    click.echo(f"recipe: {exported.recipe}")
    if exported.model is not None:
        click.echo(f"model: {exported.model}")


# --- report -----------------------------------------------------------------------------------
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Where to write (default: RUN_DIR/report).")
def report(run_dir: Path, out_dir: Path | None) -> None:
    """Write plots and an HTML summary of the run in RUN_DIR (finished or not); print the page's path."""
    from evomerge import api

    click.echo(str(api.Run(run_dir).report(out_dir)))


def parse_size(text: str) -> int:
    units = {"TB": 1024**4, "GB": 1024**3, "MB": 1024**2, "KB": 1024, "B": 1}
    value = text.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            try:
                size = float(number) * factor
            except ValueError:
                break
            if math.isfinite(size) and size >= 1:
                return int(size)
            break
    raise EvomergeError(f"'{text}' is not a positive size (examples: 5GB, 500MB)", field="--max-shard-size")


if __name__ == "__main__":
    main()
