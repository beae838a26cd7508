"""Hub-ready exports: the model card names each source as the experiment wrote it (a Hub id, a
path relative to the experiment) and carries the Hub's metadata, parsed by
`huggingface_hub.ModelCard`; `export --push-to-hub` uploads the exported folder (what it would
upload is checked here, offline) and fails in one line when the Hub cannot be reached."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.modeldir import MANIFEST
from evomerge.run.hub import upload_files
from tests.run_helpers import cli
from tests.test_run import experiment, write_exp

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "tiny-org/llama-a"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def finished_run(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run whose experiment names its models by a Hub id (served from a local Hub
    cache, offline) and by paths relative to the experiment file."""
    import huggingface_hub.constants as hub

    root = tmp_path_factory.mktemp("hub-run")
    for name in ("base", "b"):
        shutil.copytree(llama_family[name], root / "exp" / "models" / name)
    cache = root / "hub-cache"
    snapshot = cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / SNAPSHOT
    shutil.copytree(llama_family["a"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(SNAPSHOT)
    exp = experiment(llama_family)
    exp["models"] = {"base": "models/base", "sources": [HUB_ID, "./models/b"]}
    exp["stages"][0].update(optimizer={"name": "cmaes", "popsize": 3}, budget={"evaluations": 3}, holdout_top_k=1)
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "HF_HUB_CACHE", str(cache))
        code, out = cli("run", write_exp(root / "exp" / "exp.yaml", exp), "--out", run_dir, "--local")
        assert code == 0, out
        code, out = cli("export", run_dir, "--out", root / "model")
        assert code == 0, out
    return run_dir


def test_the_card_names_the_sources_as_written_and_parses_as_a_hub_card(finished_run: Path) -> None:
    from huggingface_hub import ModelCard

    model_dir = finished_run.parent / "model"
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.base_model == ["models/base", HUB_ID, "./models/b"]
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert {"merge", "evomerge", "ties"} <= set(card.data.tags)
    text = card.content
    assert str(finished_run.parent) not in text  # no local path of this machine on the Hub
    for ref in ("`models/base`", f"`{HUB_ID}`", "`./models/b`"):
        assert ref in text.split("## Search")[0]  # the sources table
    assert "| `ps` | cmaes (popsize: 3) | 3 evaluations | 3 |" in text and "| 7 |" in text  # search: seed 7 + stage 0
    assert "holdout/acc" in text and "## Selection" in text
    recipe = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["base_model"] == "models/base" and [m["model"] for m in recipe["models"]] == [HUB_ID, "./models/b"]
    assert yaml.safe_load((model_dir / "mergekit_config.yml").read_text())["base_model"] == str(finished_run.parent / "exp" / "models" / "base")


def test_the_upload_is_the_exported_folder_without_evomerge_bookkeeping(finished_run: Path) -> None:
    model_dir = finished_run.parent / "model"
    assert (model_dir / MANIFEST).is_file()
    files = upload_files(model_dir)
    assert files == sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    assert {"README.md", "config.json", "model.safetensors", "mergekit_config.yml"} <= set(files)


def push(run_dir: Path, *args: object, **env: str) -> subprocess.CompletedProcess:
    """`evomerge export RUN ...` in a process of its own, with this environment (the run's Hub
    cache, no other Hugging Face setting)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
    environ.update(env, PYTHONPATH=str(REPO), HF_HUB_CACHE=str(run_dir.parent / "hub-cache"))
    command = [sys.executable, "-m", "evomerge.cli", "export", str(run_dir), *map(str, args)]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_an_unreachable_hub_is_one_line_and_exit_2(finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    # The Hub's address here is a closed port on this machine: the real upload path, refused.
    done = push(finished_run, "--push-to-hub", "someone/merged", "--private", HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_offline_test", HF_HOME=str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --push-to-hub: cannot push to the Hugging Face Hub repo 'someone/merged': ")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(finished_run.parent / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_offline_test")
    code, out = cli("export", finished_run, "--push-to-hub", "someone/merged")  # HF_HUB_OFFLINE=1 (tests/conftest.py)
    assert code == 2 and "cannot push to the Hugging Face Hub repo 'someone/merged': OfflineModeIsEnabled" in out, out


def test_a_bad_repo_or_no_token_is_refused_before_exporting(finished_run: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "model"
    code, out = cli("export", finished_run, "--out", out_dir, "--push-to-hub", "not a repo")
    assert code == 2 and "error: --push-to-hub: 'not a repo' is not a Hub repo id (user-or-org/name)" in out and not out_dir.exists()
    done = push(finished_run, "--out", out_dir, "--push-to-hub", "someone/merged", HF_HOME=str(tmp_path / "hf-home"))
    assert done.returncode == 2 and done.stderr == "error: --push-to-hub: no Hugging Face token: set HF_TOKEN or run `hf auth login`\n"
    assert not out_dir.exists()


def test_a_merged_recipe_card_links_its_sources_as_the_recipe_names_them(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    for name in ("base", "a"):
        shutil.copytree(llama_family[name], tmp_path / "models" / name)
    recipe = {"merge_method": "task_arithmetic", "base_model": "models/base", "models": [{"model": "models/a", "parameters": {"weight": 0.5}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, out = cli("merge", tmp_path / "recipe.yaml", "--out", tmp_path / "merged")
    assert code == 0, out
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert sorted(card.data.base_model) == ["models/a", "models/base"] and card.data.base_model_relation == "merge"
    assert {"merge", "evomerge"} <= set(card.data.tags)
