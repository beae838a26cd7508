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

Measured on ``tiny`` (zoo code version 5; ``python -m evomerge.zoo.merges --preset tiny``,
2026-11-23; 1900 training steps in all): experts 0.955/0.995/1.00 on their own skill and at or
below base level on the others (0.01-0.13); each with only its own layers' delta
0.927/0.973/0.985; all three merged: task arithmetic lambda 1 -> 0.21/0.455/0.70 (mean 0.46),
lambda 0.5 -> 0.02/0.40/0.585 (0.34), TIES 0.5 -> 0.11/0.635/0.70 (0.48), DARE-TIES 0.5 ->
0.05/0.08/0.16 (0.10); layer-wise composite -> 0.90/0.968/0.99 (0.953), i.e. 94%/97%/99% of the
experts (pairs: add + reverse 0.925/0.973, add + sort 0.92/0.978, reverse + sort 0.973/0.99).
Version 5 differs from version 4 in the reverse and sort experts only: each expert's skill
phase now follows the previous expert's skill phase, not its drift phase (the gradients left
on frozen parameters, which gradient clipping counts, are the skill phase's), so the drift
phases can run beside the next training (see :func:`evomerge.zoo.build.build_lm`); the base
and addition are bit for bit version 4's. Version 4 measured: task arithmetic lambda 1 ->
0.14/0.49/0.60 (0.41), lambda 0.5 -> 0.02/0.42/0.59 (0.34), TIES 0.5 -> 0.11/0.64/0.73 (0.49),
DARE-TIES 0.5 -> 0.05/0.05/0.08 (0.06), the composite the same. Build time (``evomerge zoo
build --preset tiny``, the 2 cores otherwise idle): version 5 278-322 s wall (344-399 CPU s) in four builds
(machine noise: the same work took up to 16% more CPU in the slowest); version 4, every
step in one process one after another, 330 s wall / 325 CPU s (version 3 took 1950 steps). In
version 4's making: the zoo as first changed (32 distillation documents per step, sort
150 steps) built in 342 s against version 3's 321 s when both were built side by side on the
2 cores (+7%); this preset (16 documents, sort 100 steps) built in 324 s against version 3's
333 s, side by side the same way (-3%), with tensors identical to the cached build's.

Why version 3 kept only 85% of reverse in the composite (probing its experts with scratch
composites, one expert's layers at a time): the reverse expert scored 0.9875 whole but 0.925
with only its own layers (its drift helped it), and adding the add expert's layers 0-1 cost
it another 7 points (0.855: it had learned reverse on the base's layers 0-1, and addition's
distillation, weight 3 on replayed documents, left reverse's prompts' hidden states changed);
sort's layers cost it nothing (0.925). Addition lost 2 points to sort's layers and 5.5 to
reverse's and sort's together (0.9275 -> 0.8725). Tried, each retraining reverse and sort
from the same base and add expert (composite add/reverse/sort):
distillation on 32 real documents per step and the whole batch's cross-entropy once more with
the earlier layers in: 0.825/0.9225/0.9925 (reverse fixed, but sort's layers now cost
addition 10 points; reverse's phase twice as slow); half the batch with the earlier layers in
and the logit term (weight 3) for reverse too: 0.9225/0.8275/0.995 (addition fixed; reverse's
own layers reached only 0.84, the expert 0.98 through its drift); no logit term for reverse,
400 steps: 0.9175/0.9775/0.9975 (96%/98%/100%; TIES 0.48, task arithmetic lambda 1 0.32),
but 150 training steps more than version 3; reverse 350 and sort 150 steps (the same step
count as version 3): 0.905/0.97/0.995 (95%/98%/99.5%; evolved PS 87.8/93.8/99.1 over seeds
0-2, 92%/95%/99% of the experts); the same with 16 distillation documents per step and sort
100 steps (this preset, to save build time): 0.90/0.968/0.99.

Before (zoo code version 3: reverse and sort 250 steps each, distilled on the replayed
documents only, their cross-entropy on the base's layers only), with addition's skill phase at
750 steps (``python -m evomerge.zoo.merges --preset tiny``, 2026-11-23; 357 s wall / 328 CPU s while the test suite ran beside it on the 2
cores): experts 0.955/0.99/1.00 on their own skill; all three merged: task arithmetic lambda 1
-> 0.15/0.36/0.65 (mean 0.38), lambda 0.5 -> 0.03/0.42/0.45 (0.30), TIES 0.5 ->
0.12/0.55/0.75 (0.47), DARE-TIES 0.5 -> 0.05/0.06/0.24 (0.12); layer-wise composite ->
0.87/0.84/0.98 (0.90), i.e. 91%/85%/98% of the experts. Reverse + sort alone compose to
0.93/0.995.

The same with addition at 500 steps (holdout exact match, 400 documents per skill; built in
247 CPU seconds, one thread):
base 0.01/0.12/0.11 on add/reverse/sort; experts 0.86/0.99/1.00 on their own skill and at
base level on the others (addition learns least with its layers this constrained; with
``preserve`` 1 instead of 3 it reached 0.92, but the composite below composed worse). Each
expert with only its own layers' delta: 0.80/0.93/1.00. Merging all three: task arithmetic
lambda 1 -> 0.15/0.28/0.43 (mean 0.29), lambda 0.5 -> 0.03/0.39/0.40 (0.27), TIES density
0.5 -> 0.11/0.49/0.79 (0.46), DARE-TIES density 0.5 -> 0.06/0.07/0.19 (0.10); the layer-wise
composite (each expert weight 1 on its own layers, 0 elsewhere) -> 0.74/0.82/0.96 (0.84),
i.e. 86%/83%/96% of the experts: the ceiling of a layer-wise search here is about 85% of
each expert, short of 90%. Pairs compose better (reverse + sort: 0.93/0.995). Earlier
designs, measured the same way: reverse and sort distilled with weight 3 like addition (not 10),
composite 0.70/0.83/0.91; distillation against the plain base only (no earlier experts
swapped in), composite 0.50/0.79/0.85; no distillation, 0.50/0.32/0.27 (no better than task
arithmetic); a 0.05-0.15 learning-rate spill-over instead of the drift phase, each expert
needed its spill-over (own layers alone: add 0.48-0.76, reverse 0.40); experts trained side
by side with each other's layers switched on at random, composite 0.52/0.33/0.40; addition
in the top layers (4-5) did not learn (0.08).
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
        own_layers=_TEST_OWN_LAYERS,
        base_steps=20,
        batch_size=32,
        base_lr=3e-3,
        expert_steps=10,
        expert_lr=1e-3,
        replay=0.3,
        preserve=PRESERVE,
        drift_steps=5,
        drift_lr=1e-3,
        drift_replay=1.0,
        warmup=5,
        overrides={"reverse": {**_ON_UPSTREAM, "preserve_docs": 8},
                   "sort": {**_ON_UPSTREAM, "preserve_docs": 8, "preserve_logits": 3.0}},
    ),
    # Addition needs the most change: twice the learning rate and about twice the steps of the
    # others (at 500 steps it reached only 0.86, short of the zoo's 0.9 per expert); reverse and
    # sort learn easily and take a stronger distillation, on top of the earlier experts' layers
    # (see the module docstring).
    "tiny": _modular_preset(
        ModelSpec(hidden=64, layers=6, heads=4, intermediate=256),
        own_layers=_OWN_LAYERS,
        base_steps=400,
        batch_size=128,
        base_lr=3e-3,
        expert_steps=250,
        expert_lr=1e-3,
        replay=0.3,
        preserve=PRESERVE,
        drift_steps=100,
        drift_lr=2e-3,
        drift_replay=1.0,
        warmup=50,
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
