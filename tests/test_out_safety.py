"""`--out` never takes away what evomerge did not write (`evomerge.modeldir`): real merges of the
small random Llama checkpoints, through the CLI where users meet it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.sources import SourcePool
from evomerge.merge.writer import write_model
from evomerge.modeldir import MANIFEST, model_dir_writer
from evomerge.recipe import Recipe
from tests.run_helpers import cli
from tests.test_run import experiment, write_exp

REPO = Path(__file__).resolve().parents[1]


def recipe_text(family: dict[str, Path], weight: float = 0.5) -> str:
    a, b = family["a"], family["b"]
    return f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: {weight}}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"


@pytest.fixture
def good_yaml(llama_family: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(recipe_text(llama_family))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) with a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(out: str, *parts: str) -> None:
    assert out.count("\n") == 1 and out.startswith("error: ") and "Traceback" not in out, out
    for part in parts:
        assert part in out, out


def test_non_empty_foreign_dir_is_refused_and_force_keeps_its_files(good_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_text("x\n")
    code, text = cli("merge", good_yaml, "--out", out)
    assert code == 2
    one_error_line(text, str(out), "not empty", "--force")
    assert sorted(os.listdir(out)) == ["keep"]  # nothing written, not even a staging directory
    assert sorted(os.listdir(tmp_path)) == ["d", "good.yaml"]

    code, text = cli("merge", good_yaml, "--out", out, "--force")
    assert code == 0, text
    assert (out / "keep").read_text() == "x\n"
    assert {"config.json", "model.safetensors", "mergekit_config.yml", "README.md", MANIFEST} <= set(os.listdir(out))
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert "keep" not in listed and "model.safetensors" in listed
    assert not [n for n in os.listdir(out) + os.listdir(tmp_path) if "evomerge-stage" in n]


def test_rewriting_an_evomerge_dir_replaces_only_its_files(llama_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m"
    recipe = Recipe.parse(yaml.safe_load(recipe_text(llama_family)))
    write_model(recipe, SourcePool(), out, max_shard_bytes=5_000)  # sharded
    shards = sorted(n for n in os.listdir(out) if n.startswith("model-"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("mine\n")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("1\n")

    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(llama_family, weight=0.25))
    code, text = cli("merge", path, "--out", out)  # no --force needed: evomerge wrote it
    assert code == 0, text
    names = set(os.listdir(out))
    assert "model.safetensors" in names and not names & {*shards, "model.safetensors.index.json"}  # old shards went
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "eval" / "scores.csv").read_text() == "1\n"
    assert "weight: 0.25" in (out / "mergekit_config.yml").read_text()

    # a directory an evomerge from before the manifest wrote is still known by its mergekit_config.yml
    (out / MANIFEST).unlink()
    code, text = cli("merge", path, "--out", out)
    assert code == 0, text
    assert (out / "notes.txt").read_text() == "mine\n"


def test_out_naming_a_file_or_a_source_is_refused(llama_family: dict[str, Path], good_yaml: Path, tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("data\n")
    code, text = cli("merge", good_yaml, "--out", target)
    assert code == 2
    one_error_line(text, str(target), "not a directory")
    code, text = cli("merge", good_yaml, "--out", target / "sub")
    assert code == 2
    one_error_line(text, str(target / "sub"), "is a file, not a directory")
    assert target.read_text() == "data\n"

    before = snapshot(llama_family["a"])
    code, text = cli("merge", good_yaml, "--out", llama_family["a"], "--force")
    assert code == 2
    one_error_line(text, "source model")
    assert snapshot(llama_family["a"]) == before


def test_export_into_equal_to_or_around_the_run_is_refused(llama_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = experiment(llama_family)
    exp["stages"][0]["budget"] = {"evaluations": 4}
    run_dir = tmp_path / "runs" / "r"
    code, text = cli("run", write_exp(tmp_path / "e.yaml", exp), "--out", run_dir, "--local")
    assert code == 0, text
    before = snapshot(run_dir)
    monkeypatch.chdir(tmp_path / "runs")
    for out, why in [(run_dir, "is the run directory itself"), (run_dir / "model", "inside the run"), (Path("."), "contains the run"), (tmp_path, "contains the run")]:
        for force in ([], ["--force"]):
            code, text = cli("export", run_dir, "--out", out, *force)
            assert code == 2, (out, text)
            one_error_line(text, why)
    assert snapshot(run_dir) == before  # not even best/recipe.yaml was rewritten

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep").write_text("x")
    code, text = cli("export", run_dir, "--out", foreign)
    assert code == 2
    one_error_line(text, str(foreign), "--force")
    code, text = cli("export", run_dir, "--out", foreign, "--force")
    assert code == 0, text
    assert (foreign / "keep").read_text() == "x" and (foreign / "model.safetensors").is_file()
    code, text = cli("export", run_dir, "--out", foreign)  # now it is evomerge's
    assert code == 0, text


def test_a_killed_writers_staging_dir_goes_on_the_next_write(llama_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m"
    child = f"""
import os, signal
from evomerge.modeldir import model_dir_writer
with model_dir_writer({str(out)!r}) as stage:
    (stage / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True)
    assert proc.returncode == -9
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".m.evomerge-stage-")]
    assert len(leftovers) == 1 and not out.exists()

    # a live writer's staging directory (locked) and look-alikes that are not evomerge's stay
    live = tmp_path / ".m.evomerge-stage-live0000"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / ".m.evomerge-stage-not-ours"
    other.mkdir()
    try:
        write_model(Recipe.parse(yaml.safe_load(recipe_text(llama_family))), SourcePool(), out)
    finally:
        os.close(fd)
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".m."))
    assert left == [".m.evomerge-stage-live0000", ".m.evomerge-stage-not-ours"]
    assert (out / "config.json").is_file()

    # inside an existing directory the same holds
    inner = out / ".evomerge-stage-abcd1234"
    inner.mkdir()
    (inner / "config.json").write_text("{}")
    write_model(Recipe.parse(yaml.safe_load(recipe_text(llama_family))), SourcePool(), out)
    assert not inner.exists()


def test_directories_get_the_mode_the_umask_gives(good_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "model"
    proc = subprocess.run(
        [sys.executable, "-c", "from evomerge.cli import main; main()", "merge", str(good_yaml), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027),  # noqa: PLW1509
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o640


def test_a_failing_write_leaves_the_target_as_it_was(llama_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = Recipe.parse(yaml.safe_load(recipe_text(llama_family)))

    def fail(done: int, total: int) -> None:
        if done == 3:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_model(recipe, SourcePool(), tmp_path / "new", progress=fail)
    assert os.listdir(tmp_path) == []

    out = tmp_path / "m"
    write_model(recipe, SourcePool(), out)
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)
    with pytest.raises(OSError):
        write_model(recipe, SourcePool(), out, progress=fail, max_shard_bytes=5_000)
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["m"]


def test_two_writers_to_one_directory_take_turns(llama_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()  # empty: both write file by file into it, under its lock
    errors: list[BaseException] = []

    def write(weight: float, shard: int) -> None:
        try:
            write_model(Recipe.parse(yaml.safe_load(recipe_text(llama_family, weight))), SourcePool(), out, max_shard_bytes=shard)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(0.3, 5_000)), threading.Thread(target=write, args=(0.7, 10**9))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert listed == set(os.listdir(out)) - {MANIFEST}  # one model, whole: no file of the other left over
    assert ("model.safetensors" in listed) != ("model.safetensors.index.json" in listed)


def test_weights_exports_follow_the_same_rules(tmp_path: Path) -> None:
    import torch

    from evomerge.run.weights import write_weights_model

    template = tmp_path / "template"
    template.mkdir()
    (template / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep").write_text("x")
    tensors = {"w": torch.ones(2, 2)}
    with pytest.raises(ConfigError, match="--force"):
        write_weights_model(tensors, template, out, "card\n")
    with pytest.raises(ConfigError, match="template model"):
        write_weights_model(tensors, template, template, "card\n", force=True)
    write_weights_model(tensors, template, out, "card\n", force=True)
    assert (out / "keep").read_text() == "x" and (out / "model.safetensors").is_file()
    with model_dir_writer(out) as stage:  # evomerge's now: no force needed
        (stage / "README.md").write_text("again\n")
    assert (out / "keep").read_text() == "x" and not (out / "model.safetensors").exists()


def test_zoo_builds_remove_a_killed_builds_leftovers_and_follow_the_umask(tmp_path: Path) -> None:
    leftover = tmp_path / ".z.tmp-abcd1234"  # what a build killed before its rename leaves
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    mine = tmp_path / ".z.tmp-mine"  # not named like a build's temporary directory
    mine.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", "from evomerge.cli import main; main()", "zoo", "build", "--preset", "test", "--out", str(tmp_path / "z")],
        cwd=REPO, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027),  # noqa: PLW1509
    )
    assert proc.returncode == 0, proc.stderr
    assert not leftover.exists() and mine.is_dir()
    assert stat.S_IMODE((tmp_path / "z").stat().st_mode) == 0o750


def test_force_warns_about_foreign_weight_files_that_stay(good_yaml: Path, tmp_path: Path) -> None:
    """A user's `pytorch_model.bin` or index beside the forced model could be loaded instead of
    it: they stay (nothing is removed) but a one-line warning names them."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"users")
    (out / "model.safetensors.index.json").write_text("{}")
    code, text = cli("merge", good_yaml, "--out", out, "--force")
    assert code == 0, text
    warning = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "model.safetensors.index.json, pytorch_model.bin" in warning[0], text
    assert (out / "pytorch_model.bin").read_bytes() == b"users"
