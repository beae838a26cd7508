"""Absolute paths of this task's data files, for the YAML's `!function` tags."""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
search = str(_HERE / "search.jsonl")
holdout = str(_HERE / "holdout.jsonl")
