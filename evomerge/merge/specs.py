"""What each merge method is called and which parameters it takes: the torch-free half of the
method registry.

Recipe validation, merge planning and search-space checks only need names, defaults, valid
ranges and whether a base model is required; reading them from here keeps `import torch`
(seconds) off paths that never compute a tensor with it (`evomerge merge` of a linear or
task_arithmetic recipe, see `evomerge.merge.fast`). `evomerge.merge.methods` builds its method
objects from these specs, so there is one declaration of every parameter and of its valid values:
a recipe (every scalar, gradient anchor and `{filter, value}` of it), a plan's resolved values,
a search space's gene bounds and fixed values are all checked against `ParamSpec.problem`.

The parameters per method are mergekit 0.1.5's (`mergekit.merge_methods`): the task-arithmetic
family accepts `density` and `rescale` even without sparsification (task_arithmetic), where
neither has an effect (`inert`: accepted so that mergekit configs run, never searched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: its default and its valid values.

    kind "number": a finite number (not a boolean) in [low, high] (either end may be None: no
    bound; `high_open`: high itself excluded). kind "bool": true or false.
    """

    name: str
    default: float | bool | None = None
    required: bool = False
    doc: str = ""  # one short phrase, used in error messages / describe()
    kind: Literal["number", "bool"] = "number"
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    inert: bool = False  # accepted (mergekit accepts it) but without effect in this method

    @property
    def valid(self) -> str:
        """What a valid value is, in words: "in [0, 1]", "a finite number", "true or false"."""
        if self.kind == "bool":
            return "true or false"
        if self.low is not None and self.high is not None:
            return f"in [{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"a finite number >= {_num(self.low)}"
        if self.high is not None:
            return f"a finite number {'<' if self.high_open else '<='} {_num(self.high)}"
        return "a finite number"

    def problem(self, value: Any) -> str | None:
        """None when `value` (a plain scalar) is valid, else why not: "density must be in [0, 1],
        got 1.5"."""
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            ok = False
        else:
            ok = math.isfinite(value)
            ok = ok and (self.low is None or value >= self.low)
            ok = ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))
        return None if ok else f"{self.name} must be {self.valid}, got {value!r}"


def _num(value: float | None) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method's name, whether it needs `base_model`, and its parameters."""

    name: str
    requires_base: bool
    model_params: tuple[ParamSpec, ...] = ()
    global_params: tuple[ParamSpec, ...] = ()
    # A rule over one model's resolved values together (each valid alone): why not, or None.
    model_rule: Callable[[Mapping[str, Any]], str | None] | None = None

    def param(self, name: str) -> ParamSpec | None:
        """The spec of parameter `name` (per-model first), None when the method has none."""
        return next((p for p in (*self.model_params, *self.global_params) if p.name == name), None)


class UnknownMethodError(ValueError):
    """A merge method name evomerge does not implement."""


_WEIGHT = ParamSpec("weight", required=True, doc="scale of this model's task vector")
_DENSITY = ParamSpec("density", 1.0, doc="fraction of the task vector kept", low=0.0, high=1.0)
_GAMMA = ParamSpec("gamma", 0.01, doc="fraction of largest-magnitude entries dropped as outliers", low=0.0, high=1.0, high_open=True)
_EPSILON = ParamSpec("epsilon", 0.15, doc="spread of keep probabilities around density", low=0.0)

# The task-arithmetic family as mergekit 0.1.5 defines it:
# name -> (sparsification, consensus (TIES sign election), normalize default, rescale default).
TASK_ARITHMETIC_FAMILY: dict[str, tuple[str | None, bool, bool, bool]] = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}


def della_problem(density: float, epsilon: float) -> str | None:
    """DELLA's keep probabilities run from density - epsilon to density + epsilon: both must lie
    in (0, 1) when it sparsifies (0 < density < 1), as mergekit requires."""
    if 0 < density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
        return (
            f"DELLA needs density - epsilon > 0 and density + epsilon < 1 "
            f"(got density={density}, epsilon={epsilon}); lower epsilon or move density"
        )
    return None


def _della_rule(values: Mapping[str, Any]) -> str | None:
    return della_problem(float(values["density"]), float(values["epsilon"]))


def _family_spec(name: str) -> MethodSpec:
    sparsify, _consensus, normalize, rescale = TASK_ARITHMETIC_FAMILY[name]
    extra = {"outliers": (_GAMMA,), "della": (_EPSILON,)}.get(sparsify or "", ())
    sparse = sparsify is not None  # without sparsification density and rescale change nothing
    return MethodSpec(
        name,
        requires_base=True,
        model_params=(_WEIGHT, _DENSITY if sparse else _inert(_DENSITY), *extra),
        global_params=(
            _inert(ParamSpec("int8_mask", False, doc="store masks as int8 (no numerical effect)", kind="bool")),
            ParamSpec("normalize", normalize, doc="divide by the sum of contributing weights", kind="bool"),
            ParamSpec("rescale", rescale, doc="rescale kept entries to preserve the L1 norm", kind="bool", inert=not sparse),
            ParamSpec("lambda", 1.0, doc="scale of the merged task vector"),
        ),
        model_rule=_della_rule if sparsify == "della" else None,
    )


def _inert(spec: ParamSpec) -> ParamSpec:
    return ParamSpec(**{**spec.__dict__, "inert": True})


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear",
            requires_base=False,
            model_params=(ParamSpec("weight", required=True, doc="mixing weight of this model"),),
            global_params=(ParamSpec("normalize", True, doc="divide by the sum of the weights", kind="bool"),),
        ),
        MethodSpec(
            "slerp",
            requires_base=True,
            global_params=(ParamSpec("t", required=True, doc="interpolation factor, 0 = base_model", low=0.0, high=1.0),),
        ),
        MethodSpec(
            "model_stock",
            requires_base=True,
            global_params=(ParamSpec("filter_wise", False, doc="one interpolation factor per output row", kind="bool"),),
        ),
        MethodSpec(
            "passthrough",
            requires_base=False,
            model_params=(ParamSpec("scale", None, doc="multiply the tensor by this factor"),),
        ),
        *(_family_spec(name) for name in TASK_ARITHMETIC_FAMILY),
    )
}


def get_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; raises :class:`UnknownMethodError` listing the valid ones."""
    try:
        return METHOD_SPECS[name]
    except KeyError:
        valid = ", ".join(sorted(METHOD_SPECS))
        raise UnknownMethodError(f"unknown merge_method '{name}'; valid: {valid}") from None
