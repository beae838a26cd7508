"""`evomerge export RUN --push-to-hub REPO [--private]`: the exported model uploaded to the
Hugging Face Hub with huggingface_hub.

What is uploaded is the exported directory (`--out`, or a temporary directory removed after the
upload) as `upload_files` lists it: the weights, config, tokenizer, `mergekit_config.yml` and the
model card (`README.md`, `evomerge.run.card`: its `base_model` links the merge to its parents on
the Hub), without evomerge's own bookkeeping (`.evomerge-files.json`, staging folders). The repo
is created when missing (private with `--private`); the token is huggingface_hub's (`HF_TOKEN`,
or `hf auth login`). A bad repo id or no token is refused before anything is exported; a Hub
that cannot be reached (no network, `HF_HUB_OFFLINE=1`), a refused token or repo is one line,
exit code 2.

huggingface_hub is imported inside the functions: only an export that pushes pays for it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.modeldir import MANIFEST, STAGE
from evomerge.run.export import export_run

IGNORE = [MANIFEST, f"*{STAGE}*", f"*{STAGE}*/**"]
FIELD = "--push-to-hub"


@dataclass(frozen=True)
class Pushed:
    """Where the model went: the repo's URL, the exported recipe, and the model directory (None
    when it was a temporary one) with the files uploaded from it."""

    url: str
    recipe: Path
    model: Path | None
    files: list[str]


def upload_files(model_dir: str | Path) -> list[str]:
    """The files of `model_dir` an upload sends (paths relative to it, sorted)."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(model_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=IGNORE))


def check_push(repo: str) -> None:
    """Refuse a repo id the Hub would refuse, or a push without a token, before exporting."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise EvomergeError(f"'{repo}' is not a Hub repo id (user-or-org/name): {_reason(exc)}", field=FIELD) from None
    if get_token() is None:
        raise EvomergeError("no Hugging Face token: set HF_TOKEN or run `hf auth login`", field=FIELD)


def push_to_hub(model_dir: str | Path, repo: str, *, private: bool = False) -> str:
    """Create `repo` if needed and upload `model_dir` to it; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(model_dir), repo_id=repo, repo_type="model", ignore_patterns=IGNORE,
            commit_message="Upload a merge exported by evomerge",
        )  # fmt: skip
    except Exception as exc:  # the Hub's, httpx's and huggingface_hub's errors: no common base
        raise EvomergeError(f"cannot push to the Hugging Face Hub repo '{repo}': {_reason(exc)}", field=FIELD) from None
    return str(getattr(commit, "commit_url", None) or f"{api.endpoint}/{repo}")


def push_run(
    run_dir: str | Path, repo: str, *, out: str | Path | None = None, private: bool = False, force: bool = False,
    echo: Callable[[str], None] = print,
) -> Pushed:  # fmt: skip
    """Export the run's best (`export_run`, to `out` or a temporary directory) and push it."""
    check_push(repo)
    with tempfile.TemporaryDirectory(prefix="evomerge-push-") if out is None else nullcontext(None) as tmp:
        recipe, model = export_run(run_dir, Path(tmp) / "model" if out is None else out, force=force)
        assert model is not None
        files = upload_files(model)
        echo(f"pushing {len(files)} files of {model if out is not None else 'the exported model'} to {repo}")
        url = push_to_hub(model, repo, private=private)
        return Pushed(url, recipe, None if out is None else model, files)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
