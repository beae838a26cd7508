"""Evaluators: score in-memory models on a search or holdout split (see `base.py`)."""

from evomerge.evaluate.base import Evaluator, build_evaluator
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset

__all__ = ["EvalResult", "Evaluator", "Subset", "build_evaluator"]
