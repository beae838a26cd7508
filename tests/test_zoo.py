"""The model zoo: cached deterministic builds, HF-loadable models, refs, digits, task data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError, SourceError
from evomerge.zoo import (
    PRESETS,
    build_zoo,
    digits,
    list_zoo_models,
    lm,
    read_manifest,
    resolve_zoo_ref,
    zoo_hash,
)
from evomerge.zoo.skills import COMPOSITIONS
from evomerge.zoo.tasks import TASK_SKILLS, eval_docs, eval_prompts, training_sampler

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("evomerge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def test_zoo(cache: Path) -> Path:
    return build_zoo("test")


# ---- builds ------------------------------------------------------------------------------------


def test_test_preset_builds_into_the_cache_with_a_manifest(cache: Path, test_zoo: Path) -> None:
    assert test_zoo == (cache / "zoo" / f"test-{zoo_hash('test')}").resolve()
    manifest = read_manifest(test_zoo)
    assert manifest["preset"] == "test" and manifest["hash"] == zoo_hash("test")
    assert list(manifest["models"]) == list_zoo_models("test") == ["base", "add", "reverse", "sort"]
    assert manifest["models"]["add"]["skill"] == "add"
    assert set(manifest["models"]["add"]["holdout_accuracy"]) == {"add", "reverse", "sort"}
    groups = {tuple(row["models"]) for row in manifest["task_arithmetic"]}
    assert ("add", "reverse", "sort") in groups and ("add", "reverse") in groups
    # Nothing half-built or temporary is left beside it.
    assert [p.name for p in test_zoo.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []


def test_second_build_reuses_the_cache(test_zoo: Path) -> None:
    weights = test_zoo / "add" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    messages: list[str] = []
    assert build_zoo("test", progress=messages.append) == test_zoo
    assert weights.stat().st_mtime_ns == before
    assert messages and all("reusing" in m for m in messages)


def test_builds_are_deterministic(test_zoo: Path, tmp_path: Path) -> None:
    other = build_zoo("test", tmp_path / "again")
    for name in list_zoo_models("test"):
        a = load_file(str(test_zoo / name / "model.safetensors"))
        b = load_file(str(other / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # The base moved during fine-tuning: experts differ from it.
    base = load_file(str(test_zoo / "base" / "model.safetensors"))
    add = load_file(str(test_zoo / "add" / "model.safetensors"))
    assert any(not torch.equal(base[k], add[k]) for k in base)


def test_two_processes_building_at_once_share_one_build(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = "from evomerge.zoo import build_zoo; print('DIR', build_zoo('test', progress=print))"
    env = {**os.environ, "EVOMERGE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    dirs = {line for out in outputs for line in out.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    # One of them trained, the other waited for the lock and reused the finished build.
    assert sorted("building into" in out for out in outputs) == [False, True]
    assert [p.name for p in (tmp_path / "zoo").iterdir() if not p.name.endswith(".lock")] == [
        f"test-{zoo_hash('test')}"
    ]


def test_out_dir_that_is_not_a_zoo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a zoo directory"):
        build_zoo("test", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unknown_preset(cache: Path) -> None:
    with pytest.raises(ConfigError, match="valid: test, tiny, digits"):
        build_zoo("huge")
    assert PRESETS == ("test", "tiny", "digits")


def test_models_load_offline_with_auto_classes(test_zoo: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(test_zoo / "add")
    tok = AutoTokenizer.from_pretrained(test_zoo / "add")
    assert type(model).__name__ == "LlamaForCausalLM"
    text = "23+45=68\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(text), model.config.vocab_size)
    # The safetensors file holds what the model holds.
    tensors = load_file(str(test_zoo / "add" / "model.safetensors"))
    assert set(tensors) == set(model.state_dict())


def compare_forked_and_inline_builds(root: Path) -> None:
    """Build the `test` preset forked and in-process under `root`; fail unless they agree."""
    import multiprocessing

    from evomerge.zoo.build import build_lm, can_fork
    from evomerge.zoo.presets import PRESET_SPECS

    assert can_fork(), "the forked build needs a process with no other thread"
    spec = PRESET_SPECS["test"]
    lines: list[str] = []
    forked = build_lm(spec, root / "forked", lines.append)
    inline = build_lm(spec, root / "inline", lambda _m: None, parallel=False)
    assert forked["models"] == inline["models"] and forked["task_arithmetic"] == inline["task_arithmetic"]
    for name in spec.model_names():
        a = load_file(str(root / "forked" / name / "model.safetensors"))
        b = load_file(str(root / "inline" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The forked processes' progress lines reach the caller.
    assert any(line.startswith("sort: drift phase") for line in lines)
    assert any(line.startswith("base: holdout accuracy") for line in lines)
    assert multiprocessing.active_children() == []


def test_forked_build_equals_the_in_process_build(tmp_path: Path) -> None:
    """Batches, drift phases, scoring and task arithmetic in forked processes: the same tensors
    and figures as the build that runs everything in this process, one step after another.

    The build forks only where no other thread runs (`can_fork`), as in `evomerge zoo` or
    `evomerge demo` before Ray starts; this test process has threads (Ray's, tqdm's), so the
    comparison runs in a fresh interpreter."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tests.test_zoo", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("parallel", [True, False])
def test_a_failing_step_of_the_build_is_reported(tmp_path: Path, parallel: bool) -> None:
    from evomerge.zoo.build import build_lm
    from evomerge.zoo.presets import PRESET_SPECS

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises((RuntimeError, OSError), match="Not a directory"):
        build_lm(PRESET_SPECS["test"], tmp_path / "file", lambda _m: None, parallel=parallel)
    import multiprocessing

    assert multiprocessing.active_children() == []


def test_phase_batches_are_what_training_draws() -> None:
    """The batches made ahead of the training train the model as drawing them in place does."""
    spec = lm.ModelSpec(hidden=16, layers=2, heads=2, intermediate=32)
    phase = lm.PhaseSpec(mixture=(("add", "true", 1.0), ("sort", "weak", 1.0)), steps=4, batch_size=8, warmup=1,
                         preserve=3.0, preserve_skills=("sort",))
    models = [lm.new_model(spec, torch.Generator().manual_seed(0)) for _ in range(2)]
    rngs = [np.random.default_rng(5) for _ in range(2)]
    batches = list(lm.phase_batches(phase, rngs[0]))
    assert len(batches) == 4 and all(b.x.shape == b.y.shape and b.rows.dtype == torch.bool for b in batches)
    assert lm.train(models[0], phase, batches) == lm.train(models[1], phase, rngs[1])
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(),
                                                 strict=True))
    # both generators were left at the same point, where a following phase continues
    assert rngs[0].integers(1 << 30) == rngs[1].integers(1 << 30)


# ---- references --------------------------------------------------------------------------------


def test_resolve_zoo_ref(test_zoo: Path) -> None:
    assert resolve_zoo_ref("test/reverse") == test_zoo / "reverse"
    from evomerge.merge.sources import SourcePool

    source = SourcePool().get("zoo:test/sort")
    assert source.path == test_zoo / "sort"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("test/mul", "valid: zoo:test/base, zoo:test/add, zoo:test/reverse, zoo:test/sort"),
        ("test", "valid: zoo:test/base"),
        ("digits/add", "valid: zoo:digits/low, zoo:digits/high"),
        ("big/add", "valid presets: test, tiny, digits"),
    ],
)
def test_resolve_zoo_ref_errors(cache: Path, ref: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        resolve_zoo_ref(ref)
    assert not (cache / "zoo").exists() or not any(
        p.name.startswith(("digits-", "tiny-")) for p in (cache / "zoo").iterdir()
    )


# ---- digits ------------------------------------------------------------------------------------


def test_digits_split_is_fixed_and_stratified() -> None:
    x_tr, y_tr = digits.load_split("train")
    x_te, y_te = digits.load_split("test")
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    assert np.bincount(y_te).min() >= 35 and np.bincount(y_te).max() <= 37
    from sklearn.datasets import load_digits

    # Every image is used once: the split partitions the bundled data set.
    total = load_digits().data.sum() / 16.0
    assert np.isclose(x_tr.sum(dtype=np.float64) + x_te.sum(dtype=np.float64), total)
    again, _ = digits.load_split("test")
    assert np.array_equal(again, x_te)
    with pytest.raises(ValueError, match="valid: 'train', 'test'"):
        digits.load_split("val")  # type: ignore[arg-type]


def test_digits_expert_learns_only_its_classes(tmp_path: Path) -> None:
    model = digits.train_expert((0, 1, 2, 3, 4), seed=3, spec=digits.TrainSpec(epochs=8))
    assert sum(p.numel() for p in model.parameters()) == 19_210
    assert digits.accuracy(model, "test", classes=range(5)) > 0.9
    assert digits.accuracy(model, "test", classes=range(5, 10)) < 0.05
    x, _ = digits.load_split("test")
    assert set(np.unique(model.predict(x))) <= {0, 1, 2, 3, 4}
    again = digits.train_expert((0, 1, 2, 3, 4), seed=3, spec=digits.TrainSpec(epochs=8))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    model.save_pretrained(tmp_path / "low")
    config = json.loads((tmp_path / "low" / "config.json").read_text())
    assert config == {"architecture": "DigitsMLP", "sizes": [64, 256, 10]}
    loaded = digits.DigitsMLP.from_pretrained(tmp_path / "low")
    assert np.array_equal(loaded.predict(x), model.predict(x))
    with pytest.raises(SourceError, match="config.json"):
        digits.DigitsMLP.from_pretrained(tmp_path)


def test_held_out_distillation_on_upstream_trains_only_the_own_layers() -> None:
    """The later experts' skill phase (preserve_docs, preserve_logits, upstream_ce): only the
    own layers move, and the upstream tensors swapped in for part of each step are swapped out."""
    model = lm.new_model(lm.ModelSpec(hidden=16, layers=2, heads=2, intermediate=32), torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    upstream = {k: v + 0.05 for k, v in before.items() if lm.layer_index(k) == 0}
    phase = lm.PhaseSpec(
        mixture=(("sort", "true", 1.0), ("add", "noise", 0.3)), steps=3, batch_size=8, warmup=1,
        layer_lr=((r"layers\.1\.", 1.0), (r".", 0.0)), preserve=10.0, preserve_skills=("add",),
        preserve_docs=4, preserve_logits=3.0, upstream_ce=0.5,
    )
    losses = lm.train(model, phase, np.random.default_rng(0), upstream=upstream)
    assert len(losses) == 3 and all(np.isfinite(losses))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and {lm.layer_index(k) for k in changed} == {1}
    # the first expert's form (no upstream): the distillation alone on the held-out documents
    losses = lm.train(model, phase, np.random.default_rng(1))
    assert all(np.isfinite(losses))
    assert {lm.layer_index(k) for k in before if not torch.equal(after[k], model.state_dict()[k])} <= {1}


# ---- task data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skill", TASK_SKILLS)
def test_task_splits_are_disjoint_and_committed(skill: str) -> None:
    docs = eval_docs(skill)
    search = {d.prompt for d in docs["search"]}
    holdout = {d.prompt for d in docs["holdout"]}
    assert len(search) == len(docs["search"]) == 400 and len(holdout) == 400
    assert not search & holdout
    folder = REPO / "evaluators" / "tasks" / f"zoo_{skill}"
    for split, split_docs in docs.items():
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        assert rows == [d.to_json() for d in split_docs], f"{folder} is stale: regenerate it"
    assert (folder / f"zoo_{skill}.yaml").is_file() and (folder / "_data.py").is_file()


@pytest.mark.parametrize("skill", ["add", "reverse", "sort"])
def test_no_eval_prompt_in_training_data(skill: str) -> None:
    banned = eval_prompts(skill)
    for parent_of in (s for s, parent in COMPOSITIONS.items() if parent == skill):
        # A composition's prompts are its parent's with another operator; the parent bans them.
        assert {p.replace("|", "=") for p in eval_prompts(parent_of)} <= banned
    rng = np.random.default_rng(0)
    for variant in ("true", "noise", "weak"):
        stream = training_sampler(skill, variant, rng)
        drawn = [next(stream)[0] for _ in range(3000)]
        assert not banned & set(drawn)


# ---- demo --------------------------------------------------------------------------------------


def test_demo_merges_two_experts_and_reports(test_zoo: Path, tmp_path: Path) -> None:
    from evomerge.demo import run_merge_only
    from evomerge.recipe import Recipe

    lines: list[str] = []
    result = run_merge_only(tmp_path / "demo", lines.append, preset="test")
    recipe = Recipe.from_yaml(tmp_path / "demo" / "recipe.yaml")
    assert recipe.merge_method == "ties" and recipe.base_model == str(test_zoo / "base")
    assert [m.model for m in recipe.models or []] == [str(test_zoo / "add"), str(test_zoo / "reverse")]
    model = AutoModelForCausalLM.from_pretrained(result["model"])
    assert model.config.num_hidden_layers == 3
    assert set(result["accuracy"]) == {"zoo:test/add", "zoo:test/reverse", "ties merge"}
    assert f"merged model: {result['model'].resolve()}" in lines
    assert any(line.startswith("ties merge") for line in lines)


if __name__ == "__main__":  # test_forked_build_equals_the_in_process_build's fresh interpreter
    import sys

    compare_forked_and_inline_builds(Path(sys.argv[1]))
