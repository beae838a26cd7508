"""Built-in YAMLs and lm-eval task folders are package data: found with importlib.resources in
`evomerge/_builtin/`, and shipped in the wheel (the top-level folders are their one source)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

import evomerge
from evomerge.resources import KINDS, builtin_dir, builtin_names, find_yaml

PACKAGE = Path(evomerge.__file__).parent
REPO = PACKAGE.parent
IN_CHECKOUT = (REPO / "pyproject.toml").is_file() and (REPO / "search_spaces").is_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_builtins_resolve_inside_the_package(kind):
    folder = builtin_dir(kind)
    assert folder == Path(str(files("evomerge._builtin") / kind))
    assert folder.parent == PACKAGE / "_builtin"  # not the checkout's top-level folder
    assert folder.is_dir() and builtin_names(kind)


def test_named_builtins_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = find_yaml("search_spaces", "ps_ties")
    assert space == PACKAGE / "_builtin" / "search_spaces" / "ps_ties.yaml" and space.is_file()
    assert find_yaml("evaluators", "zoo_all").is_file()
    assert find_yaml("experiments", "tiny_ps").is_file()
    assert (builtin_dir("evaluators") / "tasks" / "zoo_add" / "zoo_add.yaml").is_file()


def test_a_path_is_used_before_the_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ps_ties.yaml").write_text("kind: ps\n")
    assert find_yaml("search_spaces", "ps_ties.yaml") == Path("ps_ties.yaml")
    assert find_yaml("search_spaces", "ps_ties") == builtin_dir("search_spaces") / "ps_ties.yaml"


@pytest.mark.skipif(not IN_CHECKOUT, reason="needs the repository checkout")
@pytest.mark.parametrize("kind", KINDS)
def test_checkout_links_to_the_top_level_folders(kind):
    link = PACKAGE / "_builtin" / kind
    assert link.is_symlink() and link.resolve() == (REPO / kind).resolve()


def _source_files(kind: str, pattern: str) -> set[str]:
    top = REPO / kind
    return {f"evomerge/_builtin/{kind}/{p.relative_to(top).as_posix()}" for p in top.glob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.skipif(not IN_CHECKOUT, reason="needs the repository checkout")
def test_the_wheel_ships_every_builtin(tmp_path):
    """Builds the wheel from a copy of the sources (a few seconds, no network: .venv's setuptools),
    so the checkout's build/ is not touched."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("evomerge", *KINDS):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("evomerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("evomerge/_builtin/") and not n.endswith("__init__.py")}
    expected = (_source_files("search_spaces", "*.yaml") | _source_files("evaluators", "*.yaml")
                | _source_files("evaluators", "tasks/*/*") | _source_files("experiments", "*.yaml"))
    assert shipped == expected
    assert "evomerge/_builtin/evaluators/tasks/zoo_add/zoo_add.yaml" in shipped
    assert "evomerge/_builtin/experiments/tiny_ps.yaml" in shipped
    assert not any("/benchmarks/" in n or n.endswith("results.py") for n in shipped)
