"""A cached, separate virtual environment holding ``mergekit`` for benchmarks and fixtures.

mergekit has its own dependency pins, so it is never a dependency of evomerge or of CI.
Benchmarks and the parity-fixture generator call :func:`ensure_mergekit` to get the path
of a ``mergekit-yaml`` executable, installed on first use into
``$EVOMERGE_CACHE/mergekit-venv`` (default ``~/.cache/evomerge/mergekit-venv``).

The CPU build ``torch==2.13.0`` is installed *first*: mergekit only asks for ``torch>=2.0``,
and a plain resolution of that would pull the multi-GB CUDA stack on a CPU machine.

Run it directly to install (or locate) mergekit: ``python experiments/benchmarks/mergekit_venv.py``,
or ``... --venv DIR`` for a venv at DIR (``make mergekit`` builds ``.venv-mergekit`` in the repo this
way for ``tests/test_mergekit_run.py``, which runs ``mergekit-yaml`` on evomerge's exported recipes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
TORCH_SPEC = "torch==2.13.0"
_MARKER = ".evomerge-mergekit-ok"


def cache_dir() -> Path:
    """Root of evomerge's cache: ``$EVOMERGE_CACHE`` or ``~/.cache/evomerge``."""
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge")


def venv_dir() -> Path:
    return cache_dir() / "mergekit-venv"


def _bin(venv_path: Path, name: str) -> Path:
    sub = "Scripts" if os.name == "nt" else "bin"
    suffix = ".exe" if os.name == "nt" else ""
    return venv_path / sub / f"{name}{suffix}"


def _run(cmd: list[str], root: Path) -> None:
    print("[mergekit-venv] $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
            f"Delete {root} and retry, or set EVOMERGE_CACHE to another folder."
        )


def ensure_mergekit(version: str = MERGEKIT_VERSION, root: Path | None = None) -> Path:
    """Return the path of ``mergekit-yaml``, creating the venv (default :func:`venv_dir`) on
    first use.

    The venv is reused when its marker file names the same mergekit version; a half-built
    venv (no marker) is rebuilt from scratch.
    """
    root = Path(root).absolute() if root is not None else venv_dir()
    exe = _bin(root, "mergekit-yaml")
    marker = root / _MARKER
    if exe.exists() and marker.exists() and marker.read_text().strip() == version:
        return exe
    print(f"[mergekit-venv] installing mergekit=={version} into {root} (first use only)", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    py = str(_bin(root, "python"))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "on"]
    print(f"[mergekit-venv] step 1/2: {TORCH_SPEC} (CPU build when no GPU torch is wanted)", flush=True)
    _run(pip + [TORCH_SPEC], root)
    print(f"[mergekit-venv] step 2/2: mergekit=={version}", flush=True)
    _run(pip + [f"mergekit=={version}", TORCH_SPEC], root)
    if not exe.exists():
        raise RuntimeError(f"mergekit installed but {exe} is missing; delete {root} and retry")
    marker.write_text(version + "\n")
    print(f"[mergekit-venv] ready: {exe}", flush=True)
    return exe


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Install (or locate) mergekit in its own venv; prints mergekit-yaml's path.")
    parser.add_argument("--venv", type=Path, default=None, help=f"the venv's directory (default: {venv_dir()})")
    print(ensure_mergekit(root=parser.parse_args().venv))
    sys.exit(0)
