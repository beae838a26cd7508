"""The zoo's build recipes: what each preset trains, with which data, for how long.

A preset's spec is plain frozen dataclasses; :func:`spec_dict` turns it into the JSON that
the cache key hashes and that ``zoo.json`` records, so any change to a recipe (a step
count, a learning rate, a seed) is a new cache entry.

LM presets (``tiny``, ``test``) train a base, then experts from it:

* **base**: pre-training on a mixture that teaches the prompt formats, the alphabet and
  when to stop, but not the skills: for every expert skill its ``noise`` variant (right
  prompt, an answer of the right shape drawn at random) and its ``weak`` variant (an easy
  slice: single-digit sums, one- or two-character strings). The base model therefore scores
  near zero on every skill's evaluation documents.
* **experts**, each in two phases from the base (:func:`_modular_preset`):

  1. *skill*: only the expert's own layers train (``tiny``: add 0-1, reverse 2-3, sort 4-5
     of 6; everything else frozen), on its skill plus a little replay of the base mixture,
     with feature distillation (``preserve``) of the other skills: their hidden states must
     stay those of the base, with the own layers of the experts trained before it swapped in
     (add, then reverse, then sort). Addition, the first, distils with weight 3 on the
     replayed documents; reverse and sort, which learn easily, with weight 10 on 32 real
     documents of the other skills per step (``preserve_docs``; not trained on), sort also on
     the next-token distributions (``preserve_logits`` 3: it is the last, what it changes is
     what exact match reads), and half of their batch takes its cross-entropy with the
     earlier experts' layers in (``upstream_ce`` 0.5), so their skill also works on top of
     those. So each expert's skill lives in its own layers, which the other skills' prompts
     barely notice, also where earlier experts have changed them;
  2. *drift*: its own layers frozen, all other transformer layers train on its skill and
     the replay mixture: a diffuse change elsewhere, like the many small parameter changes
     of a real full fine-tune, that the expert barely needs but that lands in the other
     experts' layers. Addition's skill phase gets twice the learning rate of the others and
     the most steps, so its task vector is also the largest (unequal magnitudes, as between real fine-tunes).

  Uniform merges (the hand-set defaults) therefore add every expert's drift into the
  others' layers, while a merge with per-layer-group weights can keep each expert where its
  skill is. The layout is a design choice for the merge searches that use the zoo, not a
  property the searches are told about.

What the experts and the hand-set merges score on ``tiny`` (``python -m evomerge.zoo.merges
--preset tiny``), and the designs tried before this one: ``docs/benchmarks.md``.
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
    # A second phase after `phase` (same random stream), e.g. the diffuse "drift" of ``tiny``.
    drift: PhaseSpec | None = None
    # The layers `phase` trains the skill into (empty: no such split); read by zoo.merges.
    own_layers: tuple[int, ...] = ()


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


# Weight of the experts' feature distillation (skill phase): 1 let addition learn more but the
# layer-wise composite compose worse, 10 kept addition from learning (measured on tiny).
PRESERVE = 3.0


def _layers_regex(layers: tuple[int, ...]) -> str:
    return rf"layers\.({'|'.join(map(str, layers))})\."


def _modular_preset(
    model: ModelSpec,
    *,
    own_layers: dict[str, tuple[int, ...]],
    base_steps: int,
    batch_size: int,
    base_lr: float,
    expert_steps: int,
    expert_lr: float,
    replay: float,
    preserve: float,
    drift_steps: int,
    drift_lr: float,
    drift_replay: float,
    warmup: int,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> LMPreset:
    """Base + add/reverse/sort experts, each trained in two phases (see the module docstring).

    1. skill: only the expert's `own_layers` train (everything else frozen) on its skill plus
       `replay` of the base mixture, with feature distillation (`preserve`) on the other
       skills' documents, so its own layers are close to invisible to their prompts;
    2. drift: its own layers frozen, every other transformer layer trains at `drift_lr` on
       its skill plus `drift_replay` of the base mixture: a diffuse change that the expert
       barely needs but that lands in the other experts' layers.
    `overrides` changes fields of an expert's skill phase (steps, lr).
    """
    skills = ("add", "reverse", "sort")
    base = PhaseSpec(
        mixture=_base_mixture(skills), steps=base_steps, batch_size=batch_size, lr=base_lr, warmup=warmup
    )
    experts = []
    for i, skill in enumerate(skills):
        mine = _layers_regex(own_layers[skill])
        phase = PhaseSpec(
            mixture=_expert_mixture(skill, skills, replay),
            steps=expert_steps,
            batch_size=batch_size,
            lr=expert_lr,
            warmup=warmup,
            layer_lr=((mine, 1.0), (r".", 0.0)),
            preserve=preserve,
            preserve_skills=tuple(s for s in skills if s != skill),
        )
        drift = PhaseSpec(
            mixture=_expert_mixture(skill, skills, drift_replay),
            steps=drift_steps,
            batch_size=batch_size,
            lr=drift_lr,
            warmup=max(1, min(warmup, drift_steps // 10)),
            layer_lr=((mine, 0.0), (r"layers\.", 1.0), (r".", 0.0)),
        )
        experts.append(ExpertSpec(
            name=skill,
            skill=skill,
            phase=dataclasses.replace(phase, **(overrides or {}).get(skill, {})),
            seed=10 + i,
            drift=drift,
            own_layers=own_layers[skill],
        ))
    return LMPreset(model=model, base=base, experts=tuple(experts))


# The later experts (reverse, sort) distil on 16 real documents per step of the other skills
# and take half of their skill's cross-entropy with the earlier experts' layers swapped in.
_ON_UPSTREAM: dict[str, Any] = {"preserve": 10.0, "preserve_docs": 16, "upstream_ce": 0.5}

# Which layers each expert trains its skill into: disjoint, two layers each in ``tiny``.
_OWN_LAYERS = {"add": (0, 1), "reverse": (2, 3), "sort": (4, 5)}
_TEST_OWN_LAYERS = {"add": (0,), "reverse": (1,), "sort": (2,)}

PRESET_SPECS: dict[str, LMPreset | DigitsPreset] = {
    "test": _modular_preset(
        ModelSpec(hidden=32, layers=3, heads=2, intermediate=64),
        own_layers=_TEST_OWN_LAYERS, base_steps=20, batch_size=32, base_lr=3e-3,
        expert_steps=10, expert_lr=1e-3, replay=0.3, preserve=PRESERVE,
        drift_steps=5, drift_lr=1e-3, drift_replay=1.0, warmup=5,
        overrides={"reverse": {**_ON_UPSTREAM, "preserve_docs": 8},
                   "sort": {**_ON_UPSTREAM, "preserve_docs": 8, "preserve_logits": 3.0}},
    ),
    # Addition needs the most change: twice the learning rate and about twice the steps of the
    # others (at 500 steps it reached only 0.86, short of the zoo's 0.9 per expert); reverse and
    # sort learn easily and take a stronger distillation, on top of the earlier experts' layers
    # (see the module docstring).
    "tiny": _modular_preset(
        ModelSpec(hidden=64, layers=6, heads=4, intermediate=256),
        own_layers=_OWN_LAYERS, base_steps=400, batch_size=128, base_lr=3e-3,
        expert_steps=250, expert_lr=1e-3, replay=0.3, preserve=PRESERVE,
        drift_steps=100, drift_lr=2e-3, drift_replay=1.0, warmup=50,
        overrides={
            "add": {"steps": 750, "lr": 2e-3},
            "reverse": {"steps": 350, **_ON_UPSTREAM},
            "sort": {"steps": 100, **_ON_UPSTREAM, "preserve_logits": 3.0},
        },
    ),
    "digits": DigitsPreset(experts=(("low", (0, 1, 2, 3, 4)), ("high", (5, 6, 7, 8, 9)))),
}


def spec_dict(spec: LMPreset | DigitsPreset) -> dict[str, Any]:
    """JSON-ready form of a preset's spec (tuples become lists)."""
    return dataclasses.asdict(spec)
