"""Evaluators: score in-memory models on a search or holdout split (types in `base.py`, kinds
and `build_evaluator` in `registry.py`)."""

from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.registry import (
    EVALUATORS,
    build_evaluator,
    evaluator_class,
    register_evaluator,
    resolve_spec,
)
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.subset import Subset

__all__ = ["EVALUATORS", "EvalResult", "Evaluator", "Subset", "build_evaluator", "evaluator_class", "register_evaluator", "resolve_spec"]
