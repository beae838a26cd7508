"""The lm_eval evaluator against lm-eval itself, on the zoo tasks and small local tasks.

One TaskManager per module (evaluators cache theirs per process); models are tiny random zoo
Llamas with the zoo tokenizer, so a test is about the evaluator, not about a trained model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.evaluate import EvalResult, Subset, build_evaluator
from evomerge.resources import builtin_dir

TASKS = builtin_dir("evaluators") / "tasks"
ZOO = ["zoo_add", "zoo_reverse", "zoo_sort", "zoo_add_rev"]

pytestmark = pytest.mark.skipif(
    not all((TASKS / t / f"{t}.yaml").is_file() for t in ZOO), reason="zoo task folders not generated"
)


def _model(seed: int, std: float = 0.3):
    from evomerge.zoo.lm import ModelSpec, new_model

    model = new_model(ModelSpec(hidden=32, layers=2, heads=2, intermediate=64, init_std=std), torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    from evomerge.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


def _mc_rows(rng: np.random.Generator, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, 50, size=2))
        right = a + b
        choices = [str(right), str(right + 1), str(abs(right - 3)), str(right * 2 + 1)]
        order = rng.permutation(4)
        rows.append({"question": f"{a}+{b}=", "choices": [choices[i] for i in order], "label": int(np.argmax(order == 0))})
    return rows


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    """Local lm-eval task folders: a multiple-choice task (two splits), a single-split task,
    a broken YAML and a task whose data file is missing."""
    root = tmp_path_factory.mktemp("lm-tasks")
    rng = np.random.default_rng(0)
    mc = root / "evo_mc"
    mc.mkdir()
    for split, n in (("validation", 40), ("test", 30)):
        (mc / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in _mc_rows(rng, n)) + "\n")
    (mc / "evo_mc.yaml").write_text(
        f"""task: evo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {mc / 'validation.jsonl'}
    test: {mc / 'test.jsonl'}
validation_split: validation
test_split: test
fewshot_split: validation
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
    )
    one = root / "evo_one"
    one.mkdir()
    (one / "test.jsonl").write_text("\n".join(json.dumps(r) for r in _mc_rows(rng, 20)) + "\n")
    (one / "evo_one.yaml").write_text(
        f"""task: evo_one
dataset_path: json
dataset_kwargs:
  data_files:
    test: {one / 'test.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
"""
    )
    gen = root / "evo_gen"  # generate_until over the zoo_add documents (the HFLM fallback path)
    gen.mkdir()
    add = TASKS / "zoo_add"
    (gen / "evo_gen.yaml").write_text(
        f"""task: evo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    search: {add / 'search.jsonl'}
    holdout: {add / 'holdout.jsonl'}
validation_split: search
test_split: holdout
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    broken = root / "evo_broken"
    broken.mkdir()
    (broken / "evo_broken.yaml").write_text("task: evo_broken\ndataset_path: json\n  output_type: [loglikelihood\n")
    missing = root / "evo_missing"
    missing.mkdir()
    (missing / "evo_missing.yaml").write_text(
        (mc / "evo_mc.yaml").read_text().replace("task: evo_mc", "task: evo_missing").replace(str(mc), str(missing))
    )
    return root


def _spec(tasks, **extra) -> dict:
    return {"kind": "lm_eval", "tasks": tasks, "include_defaults": False, **extra}


@pytest.fixture(scope="module")
def zoo_ev():
    return build_evaluator("zoo_all", {"include_defaults": False})


@pytest.fixture(scope="module")
def mc_ev(local_tasks):
    return build_evaluator(_spec([{"task": "evo_mc", "metric": "acc_norm", "num_fewshot": 2}], include_path=str(local_tasks)))


def _simple_evaluate(model, tok, tasks, manager, **kwargs):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=32)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs)


def test_scores_equal_simple_evaluate_on_zoo_tasks(tok):
    ev = build_evaluator("zoo_all", {"include_defaults": False, "holdout_limit": 120})
    model = _model(1)
    result = ev.evaluate(model, tok, "holdout")
    assert not result.failed, result.error
    tasks = ["zoo_add", "zoo_reverse", "zoo_sort"]
    ref = _simple_evaluate(model, tok, tasks, ev.task_manager, limit=120)
    for name in tasks:
        samples = sorted(ref["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == result.counts[name] == 120
        assert result.doc_ids[name] == [f"holdout:{s['doc_id']}" for s in samples]
        np.testing.assert_array_equal(result.per_sample[name], [s["acc"] for s in samples])
        assert result.task_scores[name] == pytest.approx(ref["results"][name]["acc,none"], abs=0)
        # the raw (loglikelihood, greedy) answers, not only the 0/1 metric
        ours = [d.instances[0].resps[0] for d in ev.tasks[name].docs["holdout"][:120]]
        theirs = [s["resps"][0][0] for s in samples]
        np.testing.assert_allclose([o[0] for o in ours], [t[0] for t in theirs], rtol=1e-5, atol=1e-5)
        assert [o[1] for o in ours] == [t[1] for t in theirs]
    assert result.objectives["mean_acc"] == pytest.approx(np.mean([result.task_scores[t] for t in tasks]))


def test_multiple_choice_with_fewshot_equals_simple_evaluate(mc_ev, tok):
    model = _model(2, std=0.5)
    result = mc_ev.evaluate(model, tok, "holdout")
    assert not result.failed, result.error
    ref = _simple_evaluate(model, tok, ["evo_mc"], mc_ev.task_manager, num_fewshot=2)
    samples = sorted(ref["samples"]["evo_mc"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == [d.instances[0].args[0] for d in mc_ev.tasks["evo_mc"].docs["holdout"]]
    np.testing.assert_array_equal(result.per_sample["evo_mc"], [s["acc_norm"] for s in samples])
    assert 0 < result.objectives["acc_norm"] < 1  # a non-trivial comparison
    assert result.objectives["acc_norm"] == pytest.approx(ref["results"]["evo_mc"]["acc_norm,none"])


def test_holdout_is_never_scored_in_search(tok, local_tasks):
    ev = build_evaluator("zoo_add", {"include_defaults": False})
    search_prompts = {d.doc["prompt"] for d in ev.tasks["zoo_add"].docs["search"]}
    holdout_prompts = {d.doc["prompt"] for d in ev.tasks["zoo_add"].docs["holdout"]}
    assert len(search_prompts) == len(holdout_prompts) == 400 and not search_prompts & holdout_prompts
    model = _model(3)
    for gen in range(3):
        result = ev.evaluate(model, tok, "search", Subset(seed=0, generation=gen))
        assert all(i.startswith("search:") for i in result.doc_ids["zoo_add"])
    # nothing was ever computed for a holdout document
    assert all(inst.resps == [] for d in ev.tasks["zoo_add"].docs["holdout"] for inst in d.instances)
    # a single-split task is partitioned by seed, disjointly, or refused without a partition
    with pytest.raises(ConfigError, match="one evaluation split"):
        build_evaluator(_spec(["evo_one"], include_path=str(local_tasks)))
    part = build_evaluator(_spec([{"task": "evo_one", "partition": {"holdout_fraction": 0.25, "seed": 7}}], include_path=str(local_tasks)))
    search, holdout = set(part.doc_ids("search")["evo_one"]), set(part.doc_ids("holdout")["evo_one"])
    assert len(holdout) == 5 and len(search) == 15 and not search & holdout
    with pytest.raises(ConfigError, match="same split|one evaluation split"):
        build_evaluator(_spec([{"task": "evo_mc", "search_split": "test", "holdout_split": "test"}], include_path=str(local_tasks)))


def test_subsets_are_reproducible_from_the_seed(zoo_ev, tok):
    ev = build_evaluator("zoo_all", {"include_defaults": False, "subsample": {"size": 20, "per_generation": True}})
    a = ev.doc_ids("search", Subset(seed=5, generation=1))
    assert a == ev.doc_ids("search", Subset(seed=5, generation=1))
    assert all(len(v) == 20 for v in a.values())
    assert a != ev.doc_ids("search", Subset(seed=5, generation=2))
    assert a != ev.doc_ids("search", Subset(seed=6, generation=1))
    assert a["zoo_add"] != a["zoo_sort"]  # tasks draw independently
    fixed = build_evaluator("zoo_add", {"include_defaults": False, "subsample": {"size": 20, "per_generation": False}})
    assert fixed.doc_ids("search", Subset(seed=5, generation=1)) == fixed.doc_ids("search", Subset(seed=5, generation=9))
    limited = build_evaluator("zoo_add", {"include_defaults": False, "limit": 7})
    assert limited.doc_ids("search")["zoo_add"] == [f"search:{i}" for i in range(7)]
    assert len(limited.doc_ids("holdout")["zoo_add"]) == 400  # limits are for search only
    # the subset's scores are the full run's scores on those documents
    model = _model(4)
    full = zoo_ev.evaluate(model, tok, "search")
    sub = ev.evaluate(model, tok, "search", Subset(seed=5, generation=1))
    for task, ids in sub.doc_ids.items():
        pos = [full.doc_ids[task].index(i) for i in ids]
        np.testing.assert_array_equal(sub.per_sample[task], full.per_sample[task][pos])


def test_shards_combine_to_the_whole(mc_ev, tok):
    model = _model(5, std=0.5)
    whole = mc_ev.evaluate(model, tok, "search")
    parts = [mc_ev.evaluate(model, tok, "search", shard=(i, 3)) for i in range(3)]
    assert sum(p.counts["evo_mc"] for p in parts) == whole.counts["evo_mc"] == 40
    combined = EvalResult.combine(parts)
    assert combined.doc_ids == whole.doc_ids
    np.testing.assert_array_equal(combined.per_sample["evo_mc"], whole.per_sample["evo_mc"])
    assert combined.objectives == pytest.approx(whole.objectives)
    tiny = build_evaluator(_spec([{"task": "evo_mc", "metric": "acc_norm", "num_fewshot": 2}], include_path=str(mc_ev.spec.include_path), limit=2))
    sparse = [tiny.evaluate(model, tok, "search", shard=(i, 4)) for i in range(4)]
    assert not any(p.failed for p in sparse) and sum(p.counts["evo_mc"] for p in sparse) == 2
    assert EvalResult.combine(sparse).per_sample["evo_mc"].tolist() == whole.per_sample["evo_mc"][:2].tolist()
    again = EvalResult.from_dict(json.loads(json.dumps(combined.to_dict())))
    assert again.objectives == combined.objectives and again.task_scores == combined.task_scores


def test_a_broken_candidate_fails_and_the_evaluator_goes_on(tok):
    zoo_ev = build_evaluator("zoo_all", {"include_defaults": False, "limit": 20})
    model = _model(6)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    bad = zoo_ev.evaluate(model, tok, "search")
    assert bad.failed and "non-finite" in bad.error
    assert bad.objectives["mean_acc"] == -math.inf and bad.per_sample == {}

    exploding = _model(6)

    def forward(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    exploding.forward = forward
    boom = zoo_ev.evaluate(exploding, tok, "search")
    assert boom.failed and "out of memory" in boom.error and "\n" not in boom.error
    good = zoo_ev.evaluate(_model(7), tok, "search")
    assert not good.failed


def test_configuration_errors_are_one_line(local_tasks):
    inc = str(local_tasks)
    cases = [
        (_spec(["zoo_ad"]), "unknown task 'zoo_ad'.*closest known: zoo_add"),
        (_spec([{"task": "zoo_add", "metric": "f1"}]), "does not produce metric 'f1'; it produces: acc"),
        (_spec(["evo_broken"], include_path=inc), "cannot read this task YAML"),
        (_spec(["evo_missing"], include_path=inc), "cannot be loaded"),
        (_spec(["zoo_add"], objectives={"x": ["zoo_sort"]}), "'zoo_sort' is not one of the evaluator's tasks"),
        (_spec(["zoo_add"], batch_size=0), "greater than 0"),
        (_spec(["zoo_add"], colour="red"), "unknown field; valid: kind, .*tasks"),
        ({"kind": "lm_evl", "tasks": ["zoo_add"]}, "valid: lm_eval, classification, python"),
    ]
    for spec, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as info:
            build_evaluator(spec)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_evaluator(_spec(["evo_broken"], include_path=inc))
    assert info.value.file.endswith("evo_broken.yaml")
    with pytest.raises(ConfigError) as info:
        build_evaluator(_spec([{"task": "zoo_add", "metric": "f1"}]))
    assert info.value.field == "tasks[0].metric"


def test_generate_until_falls_back_to_hflm_and_equals_simple_evaluate(local_tasks, tok):
    ev = build_evaluator(_spec(["evo_gen"], include_path=str(local_tasks), holdout_limit=12, limit=5))
    model = _model(8)
    result = ev.evaluate(model, tok, "holdout")
    assert not result.failed, result.error
    assert result.counts == {"evo_gen": 12} and ev.doc_ids("search")["evo_gen"] == [f"search:{i}" for i in range(5)]
    ref = _simple_evaluate(model, tok, ["evo_gen"], ev.task_manager, limit=12)
    samples = sorted(ref["samples"]["evo_gen"], key=lambda s: s["doc_id"])
    assert [d.instances[0].resps[0] for d in ev.tasks["evo_gen"].docs["holdout"][:12]] == [s["resps"][0][0] for s in samples]
    np.testing.assert_array_equal(result.per_sample["evo_gen"], [s["exact_match"] for s in samples])


def test_registered_lm_eval_tasks_resolve_through_lm_evals_registry():
    """lm-eval's own tasks are found by name (its full TaskManager, built once per process);
    a typo lists the closest registered names, and a dataset that is not available offline is
    a one-line error naming the task."""
    with pytest.raises(ConfigError, match="unknown task 'helaswag'.*closest known: hellaswag") as info:
        build_evaluator({"kind": "lm_eval", "tasks": ["helaswag"]})
    assert info.value.field == "tasks[0].task"
    with pytest.raises(ConfigError, match="task 'mgsm_ja_lang' cannot be loaded") as info:
        build_evaluator("gsm8k_template")
    assert "\n" not in str(info.value)
