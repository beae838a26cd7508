"""Evaluator kinds other than lm_eval, subsets, shard arithmetic, EvalResult.combine, shipped YAMLs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import ConfigError
from evomerge.evaluate import EvalResult, Subset, build_evaluator, evaluator_class
from evomerge.evaluate.subset import select, shard_slice
from evomerge.resources import builtin_dir, builtin_names

SCORER = '''
import math
import numpy as np

def score(model, tokenizer, split, subset=None, scale=1.0):
    w = float(model.weight.detach().sum())
    if w > 100:
        raise ValueError("weights exploded")
    if w < -100:
        return {"acc": math.nan}
    per = np.array([1.0, 0.0, 1.0]) * scale
    return {"objectives": {"acc": float(per.mean()), "loss": w}, "per_sample": {"toy": per}}

def plain(model, tokenizer, split):
    return {"acc": 0.25 if split == "search" else 0.75}
'''


class Linear(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((2,), value))


def test_select_and_shards():
    assert select(10, key="t").tolist() == list(range(10))
    assert select(10, key="t", limit=3).tolist() == [0, 1, 2]
    a = select(100, key="t", size=10, subset=Subset(1, 2))
    assert len(a) == 10 and np.all(np.diff(a) > 0)
    assert a.tolist() == select(100, key="t", size=10, subset=Subset(1, 2)).tolist()
    assert a.tolist() != select(100, key="t", size=10, subset=Subset(1, 3)).tolist()
    fixed = [select(100, key="t", size=10, per_generation=False, subset=Subset(1, g)).tolist() for g in range(3)]
    assert fixed[0] == fixed[1] == fixed[2]
    blocks = [shard_slice(10, (i, 3)) for i in range(3)]
    assert [list(range(10))[b] for b in blocks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError):
        shard_slice(10, (3, 3))


def test_combine_recomputes_objectives_and_propagates_failures():
    weights = {"mean": {"a": 1.0, "b": 3.0}}
    part = [
        EvalResult({"mean": 0.0}, {"mean": True}, {"a": np.array([1.0, 0.0]), "b": np.array([1.0])}, {"a": ["x:0", "x:1"], "b": ["x:0"]}, objective_weights=weights),
        EvalResult({"mean": 0.0}, {"mean": True}, {"a": np.array([1.0]), "b": np.array([0.0])}, {"a": ["x:2"], "b": ["x:1"]}, objective_weights=weights),
    ]
    whole = EvalResult.combine(part)
    assert whole.doc_ids == {"a": ["x:0", "x:1", "x:2"], "b": ["x:0", "x:1"]}
    assert whole.task_scores == pytest.approx({"a": 2 / 3, "b": 0.5})
    assert whole.objectives["mean"] == pytest.approx((2 / 3 + 3 * 0.5) / 4)
    assert whole.counts == {"a": 3, "b": 2}
    # an empty shard (fewer documents than shards) is not a failure
    empty = EvalResult({"mean": 0.0}, {"mean": True}, {"a": np.array([]), "b": np.array([])}, {"a": [], "b": []}, objective_weights=weights)
    assert EvalResult.combine([*part, empty]).objectives == whole.objectives
    failed = EvalResult.combine([part[0], EvalResult.failure("boom", {"mean": True})])
    assert failed.failed and failed.error == "boom" and failed.objectives["mean"] == -math.inf


def test_classification_on_digits():
    pytest.importorskip("evomerge.zoo.digits")
    from evomerge.zoo.digits import load_split, new_model

    ev = build_evaluator("digits")
    model = new_model(0)
    search = ev.evaluate(model, None, "search")
    holdout = ev.evaluate(model, None, "holdout")
    x, y = load_split("test")
    with torch.no_grad():
        expected = (model(torch.tensor(np.asarray(x))).argmax(-1).numpy() == y).astype(float)
    np.testing.assert_array_equal(holdout.per_sample["digits"], expected)
    assert holdout.doc_ids["digits"][:2] == ["test:0", "test:1"] and search.counts["digits"] == len(load_split("train")[1])
    assert holdout.objectives["acc"] == pytest.approx(expected.mean())
    sub = build_evaluator("digits", {"subsample": {"size": 100}})
    r1 = sub.evaluate(model, None, "search", Subset(3, 1))
    assert r1.counts["digits"] == 100 and r1.doc_ids == sub.evaluate(model, None, "search", Subset(3, 1)).doc_ids
    parts = [ev.evaluate(model, None, "holdout", shard=(i, 4)) for i in range(4)]
    assert EvalResult.combine(parts).objectives["acc"] == pytest.approx(holdout.objectives["acc"])
    with torch.no_grad():
        model.layers[0].weight.fill_(float("nan"))
    assert ev.evaluate(model, None, "search").failed


def test_python_evaluator(tmp_path: Path):
    (tmp_path / "scorer.py").write_text(SCORER)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump({"kind": "python", "callable": "scorer.py:score", "objectives": {"acc": True, "loss": False}, "args": {"scale": 1.0}}))
    ev = build_evaluator(spec)
    assert ev.objective_directions() == {"acc": True, "loss": False} and ev.primary == "acc"
    ok = ev.evaluate(Linear(1.0), None, "search", Subset(0, 0))
    assert ok.objectives == {"acc": pytest.approx(2 / 3), "loss": 2.0} and ok.doc_ids["toy"] == [0, 1, 2]
    raised = ev.evaluate(Linear(100.0), None, "search")
    assert raised.failed and "weights exploded" in raised.error and raised.objectives == {"acc": -math.inf, "loss": math.inf}
    nan = ev.evaluate(Linear(-100.0), None, "search")
    assert nan.failed and "not finite" in nan.error
    plain = build_evaluator({"kind": "python", "callable": f"{tmp_path / 'scorer.py'}:plain", "objectives": {"acc": True}})
    assert plain.evaluate(Linear(0.0), None, "holdout").objectives == {"acc": 0.75}
    with pytest.raises(ValueError):
        plain.evaluate(Linear(0.0), None, "valid")  # type: ignore[arg-type]


def test_build_errors(tmp_path: Path):
    cases = [
        ({"kind": "python", "callable": "nope.module:fn", "objectives": {"a": True}}, "callable", "cannot import 'nope.module'"),
        ({"kind": "python", "callable": "math:nothing", "objectives": {"a": True}}, "callable", "has no function 'nothing'"),
        ({"kind": "python", "callable": "math:sqrt"}, "objectives", "required"),
        ({"kind": "classification", "splits": {"search": "test", "holdout": "test"}}, "splits", "same split"),
        ({"tasks": ["zoo_add"]}, "kind", "missing; valid"),
        ({"kind": "lm_eval", "tasks": [{"task": "zoo_add", "metrc": "acc"}]}, "tasks[0].metrc", "unknown field; valid: task, metric"),
        ({"kind": "lm_eval", "tasks": ["zoo_add"], "objectives": {"a": 5}}, "objectives.a", "expected one of: list"),
    ]
    for spec, field, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            build_evaluator(spec)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="no built-in evaluators named 'zoo_nope'.*zoo_add"):
        build_evaluator("zoo_nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: lm_eval\ntasks: [zoo_add\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        build_evaluator(bad)
    assert info.value.file == str(bad)


@pytest.mark.parametrize("name", builtin_names("evaluators"))
def test_shipped_evaluators_are_valid_and_documented(name: str):
    path = builtin_dir("evaluators") / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#"), f"{path} needs a comment block on top"
    data = yaml.safe_load(text)
    spec_cls = evaluator_class(data["kind"]).spec_model
    spec_cls.model_validate(data)


def test_mgsm_language_check_scoring():
    from evomerge.evaluate.base import import_callable
    from evomerge.evaluate.lmeval_tasks import task_manager

    folder = builtin_dir("evaluators") / "tasks" / "mgsm_ja_lang"
    score = import_callable(f"{folder / 'utils.py'}:process_results", file=None, field="t")
    doc = {"answer_number": 1800}
    assert score(doc, ["卵は全部で1,800個です。答えは1,800です。"]) == {"ja_exact_match": 1, "exact_match": 1, "japanese": 1}
    assert score(doc, ["The answer is 1800."]) == {"ja_exact_match": 0, "exact_match": 1, "japanese": 0}
    assert score(doc, ["答えは1799です。"])["ja_exact_match"] == 0
    assert "mgsm_ja_lang" in task_manager((str(folder.parent),), False).all_tasks
