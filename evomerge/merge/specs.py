"""What each merge method is called and which parameters it takes: the torch-free half of the
method registry.

Recipe validation and merge planning only need names, defaults and whether a base model is
required; reading them from here keeps `import torch` (seconds) off paths that never compute a
tensor with it (`evomerge merge` of a linear or task_arithmetic recipe, see
`evomerge.merge.fast`). `evomerge.merge.methods` builds its method objects from these specs, so
there is one declaration of every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: float | bool | None = None
    required: bool = False
    doc: str = ""  # one short phrase, used in error messages / describe()


@dataclass(frozen=True)
class MethodSpec:
    """A merge method's name, whether it needs `base_model`, and its parameters."""

    name: str
    requires_base: bool
    model_params: tuple[ParamSpec, ...] = ()
    global_params: tuple[ParamSpec, ...] = ()


class UnknownMethodError(ValueError):
    """A merge method name evomerge does not implement."""


_WEIGHT = ParamSpec("weight", required=True, doc="scale of this model's task vector")
_DENSITY = ParamSpec("density", 1.0, doc="fraction of the task vector kept")
_GAMMA = ParamSpec("gamma", 0.01, doc="fraction of largest-magnitude entries dropped as outliers")
_EPSILON = ParamSpec("epsilon", 0.15, doc="spread of keep probabilities around density")

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


def _family_spec(name: str) -> MethodSpec:
    sparsify, _consensus, normalize, rescale = TASK_ARITHMETIC_FAMILY[name]
    extra = {"outliers": (_GAMMA,), "della": (_EPSILON,)}.get(sparsify or "", ())
    return MethodSpec(
        name,
        requires_base=True,
        model_params=(_WEIGHT, _DENSITY, *extra),
        global_params=(
            ParamSpec("int8_mask", False, doc="store masks as int8 (no numerical effect)"),
            ParamSpec("normalize", normalize, doc="divide by the sum of contributing weights"),
            ParamSpec("rescale", rescale, doc="rescale kept entries to preserve the L1 norm"),
            ParamSpec("lambda", 1.0, doc="scale of the merged task vector"),
        ),
    )


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear",
            requires_base=False,
            model_params=(ParamSpec("weight", required=True, doc="mixing weight of this model"),),
            global_params=(ParamSpec("normalize", True, doc="divide by the sum of the weights"),),
        ),
        MethodSpec(
            "slerp",
            requires_base=True,
            global_params=(ParamSpec("t", required=True, doc="interpolation factor, 0 = base_model"),),
        ),
        MethodSpec(
            "model_stock",
            requires_base=True,
            global_params=(ParamSpec("filter_wise", False, doc="one interpolation factor per output row"),),
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
