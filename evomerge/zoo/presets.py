"""The zoo's build recipes: what each preset trains, with which data, for how long.

A preset's spec is plain frozen dataclasses; :func:`spec_dict` turns it into the JSON that
the cache key hashes and that ``zoo.json`` records, so any change to a recipe (a step
count, a learning rate, a seed) is a new cache entry.

LM presets (``tiny``, ``test``) train in two phases:

* **base**: pre-training on a mixture that teaches the prompt formats, the alphabet and
  when to stop, but not the skills: for every expert skill its ``noise`` variant (right
  prompt, an answer of the right shape drawn at random) and its ``weak`` variant (an easy
  slice: single-digit sums, one- or two-character strings). The base model therefore scores
  near zero on every skill's evaluation documents.
* **experts**: each expert is fully fine-tuned from the base on its own skill, with a
  little replay of the base mixture so it keeps the base's behaviour elsewhere. The
  experts' learning rates are scaled per layer with different profiles, so their task
  vectors are concentrated in somewhat different layers: they overlap (and interfere when
  simply added) without being hopeless to combine. The profiles are a design choice for
  the merge searches that use the zoo, not a property the searches are told about.

Measured on ``tiny`` (holdout exact match; ``python -m evomerge.zoo.merges``): base
0.01/0.04/0.12 on add/reverse/sort; experts 0.998/0.993/1.000 on their own skill and at
base level on the others. Plain task arithmetic of add + reverse: lambda 1 -> 0.77/0.16,
lambda 0.5 -> 0.08/0.40; all three at lambda 1 -> 0.37/0.06/0.09. Without replay the merges
were hopeless (every skill near 0); without the per-layer profiles, addition swamped the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from evomerge.zoo.digits import TrainSpec
from evomerge.zoo.lm import ModelSpec, PhaseSpec


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: fine-tuned from the base on `skill` with `phase`, data drawn from `seed`."""

    name: str
    skill: str
    phase: PhaseSpec
    seed: int


@dataclass(frozen=True)
class LMPreset:
    """A base Llama plus experts fine-tuned from it, scored on `eval_skills`."""

    model: ModelSpec
    base: PhaseSpec
    experts: tuple[ExpertSpec, ...]
    init_seed: int = 0
    base_seed: int = 1
    eval_skills: tuple[str, ...] = ("add", "reverse", "sort")
    # Task-arithmetic scalings reported in zoo.json for every pair of experts and all of them.
    ta_lambdas: tuple[float, ...] = (1.0, 0.8, 0.5)
    kind: str = "lm"

    def model_names(self) -> list[str]:
        return ["base", *(e.name for e in self.experts)]


@dataclass(frozen=True)
class DigitsPreset:
    """Digits MLP experts, each trained on a subset of the classes (see digits.py)."""

    experts: tuple[tuple[str, tuple[int, ...]], ...]
    seed: int = 0
    train: TrainSpec = TrainSpec()
    kind: str = "digits"

    def model_names(self) -> list[str]:
        return [name for name, _ in self.experts]


def _base_mixture(skills: tuple[str, ...]) -> tuple[tuple[str, str, float], ...]:
    return tuple((s, v, 1.0) for s in skills for v in ("noise", "weak"))


def _expert_mixture(skill: str, skills: tuple[str, ...], replay: float) -> tuple[tuple[str, str, float], ...]:
    """The skill itself plus `replay` of the base mixture, spread evenly over its entries.

    The skill's own ``noise`` variant is left out of the replay: it contradicts the rule
    being learned. Replaying the other skills keeps the expert behaving like the base on
    their prompts, so its task vector encodes its skill rather than "answer everything
    like me" (which makes merges hopeless rather than hard).
    """
    replayed = [(s, v) for s, v, _ in _base_mixture(skills) if not (s == skill and v == "noise")]
    return ((skill, "true", 1.0), *((s, v, replay / len(replayed)) for s, v in replayed))


def _lm_preset(
    model: ModelSpec,
    *,
    base_steps: int,
    expert_steps: int,
    batch_size: int,
    base_lr: float,
    expert_lr: float,
    replay: float,
    layer_lr: dict[str, tuple[tuple[str, float], ...]],
    warmup: int,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> LMPreset:
    """Base + add/reverse/sort experts; `overrides` changes an expert's phase fields (steps, lr)."""
    skills = ("add", "reverse", "sort")
    base = PhaseSpec(
        mixture=_base_mixture(skills), steps=base_steps, batch_size=batch_size, lr=base_lr, warmup=warmup
    )
    experts = tuple(
        ExpertSpec(
            name=skill,
            skill=skill,
            phase=dataclasses.replace(
                PhaseSpec(
                    mixture=_expert_mixture(skill, skills, replay),
                    steps=expert_steps,
                    batch_size=batch_size,
                    lr=expert_lr,
                    warmup=warmup,
                    layer_lr=layer_lr.get(skill, ()),
                ),
                **(overrides or {}).get(skill, {}),
            ),
            seed=10 + i,
        )
        for i, skill in enumerate(skills)
    )
    return LMPreset(model=model, base=base, experts=experts)


# Per-layer learning-rate profiles of the experts (regex on parameter names -> factor, first
# match wins): each expert mostly moves its own pair of layers (add 0-1, sort 1-2, reverse
# 2-3) and everything else, embeddings and head included, at 0.15 of its learning rate.
_LAYER_LR: dict[str, tuple[tuple[str, float], ...]] = {
    "add": ((r"layers\.[01]\.", 1.0), (r".", 0.15)),
    "reverse": ((r"layers\.[23]\.", 1.0), (r".", 0.15)),
    "sort": ((r"layers\.[12]\.", 1.0), (r".", 0.15)),
}
_TEST_LAYER_LR: dict[str, tuple[tuple[str, float], ...]] = {
    "add": ((r"layers\.0\.", 1.0), (r".", 0.15)),
    "reverse": ((r"layers\.1\.", 1.0), (r".", 0.15)),
    "sort": ((r"layers\.[01]\.", 1.0), (r".", 0.15)),
}

PRESET_SPECS: dict[str, LMPreset | DigitsPreset] = {
    "test": _lm_preset(
        ModelSpec(hidden=32, layers=2, heads=2, intermediate=64),
        base_steps=20,
        expert_steps=10,
        batch_size=32,
        base_lr=3e-3,
        expert_lr=1e-3,
        replay=0.3,
        layer_lr=_TEST_LAYER_LR,
        warmup=5,
    ),
    # Addition needs the most change: twice the learning rate and steps of the others.
    "tiny": _lm_preset(
        ModelSpec(hidden=64, layers=4, heads=4, intermediate=256),
        base_steps=400,
        expert_steps=250,
        batch_size=128,
        base_lr=3e-3,
        expert_lr=1e-3,
        replay=0.3,
        layer_lr=_LAYER_LR,
        warmup=50,
        overrides={"add": {"steps": 500, "lr": 2e-3}},
    ),
    "digits": DigitsPreset(experts=(("low", (0, 1, 2, 3, 4)), ("high", (5, 6, 7, 8, 9)))),
}


def spec_dict(spec: LMPreset | DigitsPreset) -> dict[str, Any]:
    """JSON-ready form of a preset's spec (tuples become lists)."""
    return dataclasses.asdict(spec)
