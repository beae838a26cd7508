"""The merge-method registry: one declaration per method (`MethodSpec`) holding its name, its
parameters (defaults, valid ranges), its capabilities (needs a base, how many models, random,
writes into `out=`, sparsification) and a reference to its kernel.

Everything reads these declarations: recipe validation (`Recipe.check`), merge planning
(`evomerge.merge.plan`), the engine (`evomerge.merge.methods.get_method` imports the kernel),
PS spaces and `space describe` (`evomerge.spaces`). Nothing here imports torch: a built-in's
kernel is a lazy `"module:attr"` reference, imported when a tensor is first merged, so
validation and `space describe` stay fast. Every value is checked against `ParamSpec.problem`
(a recipe's scalars, gradient anchors and `{filter, value}` values, a plan's resolved values,
a search space's gene bounds) and every model count against `MethodSpec.count_problem`.

Adding a method: declare it with `register_method` (a `MethodSpec`) or decorate its kernel
function with `merge_method(...)`, in one module. evomerge imports plugin modules when a method
name is not known yet (`evomerge.plugins.load_plugins`: `EVOMERGE_PLUGINS`, entry points).

The parameters per method are mergekit 0.1.5's (`mergekit.merge_methods`): the task-arithmetic
family accepts `density` and `rescale` even without sparsification (task_arithmetic), where
neither has an effect (`inert`: accepted so that mergekit configs run, never searched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from evomerge.plugins import load_plugins


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
class ModelCount:
    """How many models one output tensor (one slice) merges: besides the base for a method that
    needs one, all inputs otherwise. ``high`` None: no upper bound. (A recipe as a whole merges
    at least one model besides its base: `Recipe.check`.)"""

    low: int = 0
    high: int | None = None

    def text(self, with_base: bool) -> str:
        """In words: "base_model and exactly one other model", "at least 2 models"."""
        if self.high == self.low:
            amount = f"exactly {_count(self.low)}"
        elif self.high is None:
            amount = f"at least {_count(self.low)}"
        else:
            amount = f"{self.low} to {self.high}"
        noun = "model" if (self.high or self.low) == 1 else "models"
        return f"base_model and {amount} other {noun}" if with_base else f"{amount} {noun}"


def _count(n: int) -> str:
    return "one" if n == 1 else str(n)


@dataclass(frozen=True)
class MethodSpec:
    """A merge method, declared once: parameters, capabilities and kernel.

    ``kernel``: a ``"module:attr"`` reference (imported on first use) or the object itself; a
    class is instantiated with the spec, a function ``f(base, tensors, model_params, params,
    ctx[, out])`` is called with the parameters resolved (defaults filled in) per tensor (see
    `evomerge.merge.methods`). ``writes_out``: the kernel takes ``out=`` and may write the
    result into it. ``lists_base``: recipes list base_model under ``models:`` too (mergekit's
    slerp configs do). ``sparsify`` / ``consensus``: the task-arithmetic family's options
    (magnitude, random, outliers or della sparsification; TIES sign election).
    """

    name: str
    requires_base: bool
    model_params: tuple[ParamSpec, ...] = ()
    global_params: tuple[ParamSpec, ...] = ()
    # A rule over one model's resolved values together (each valid alone): why not, or None.
    model_rule: Callable[[Mapping[str, Any]], str | None] | None = None
    models: ModelCount = ModelCount()
    random: bool = False  # draws random masks (seeded by the recipe's evomerge.seed)
    writes_out: bool = False
    lists_base: bool = False
    sparsify: Literal["magnitude", "random", "outliers", "della"] | None = None
    consensus: bool = False
    kernel: str | Callable[..., Any] | None = None
    # "module:attr" of a numpy twin of the kernel that gives the same tensors bit for bit
    # (`evomerge.merge.fast.NumpyKernel`): `evomerge merge` then needs no torch
    numpy_kernel: str | None = None
    doc: str = ""  # one line, for describe()

    def param(self, name: str) -> ParamSpec | None:
        """The spec of parameter `name` (per-model first), None when the method has none."""
        return next((p for p in (*self.model_params, *self.global_params) if p.name == name), None)

    def count_problem(self, count: int) -> str | None:
        """None when one output tensor may merge ``count`` models (besides the base, for a method
        that needs one), else why not; the one message for this rule wherever it is checked."""
        if count >= self.models.low and (self.models.high is None or count <= self.models.high):
            return None
        return f"merge method '{self.name}' merges {self.models.text(self.requires_base)} per slice, got {count}"

    def describe(self) -> str:
        """The declaration in words: capabilities, then one line per parameter."""
        caps = ["needs base_model" if self.requires_base else "no base model"]
        caps += [self.models.text(self.requires_base)] if self.models != ModelCount() else []
        caps += [c for c, on in (("random", self.random), ("writes into out=", self.writes_out)) if on]
        caps += [f"sparsifies ({self.sparsify})"] if self.sparsify else []
        lines = [f"{self.name} ({'; '.join(caps)})" + (f": {self.doc}" if self.doc else "")]
        for title, specs in (("per model", self.model_params), ("global", self.global_params)):
            for spec in specs:
                dflt = "required" if spec.required else f"default {spec.default!r}"
                note = ", no effect" if spec.inert else ""
                lines.append(f"  {title:9s} {spec.name}: {spec.doc} ({spec.valid}, {dflt}{note})")
        return "\n".join(lines)


class UnknownMethodError(ValueError):
    """A merge method name evomerge does not implement."""


# ---- the registry ----------------------------------------------------------------------------

METHOD_SPECS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the registry (a name taken by another declaration needs ``replace``)."""
    old = METHOD_SPECS.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"merge method '{spec.name}' is already registered; pass replace=True to replace it")
    if spec.kernel is None:
        raise ValueError(f"merge method '{spec.name}' has no kernel")
    METHOD_SPECS[spec.name] = spec
    return spec


def merge_method(name: str, **declaration: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated kernel function as merge method ``name``, declared by
    the other `MethodSpec` fields (``requires_base``, ``model_params``, ...)."""
    declaration.setdefault("requires_base", False)

    def decorate(kernel: Callable[..., Any]) -> Callable[..., Any]:
        register_method(MethodSpec(name, kernel=kernel, **declaration))
        return kernel

    return decorate


def find_spec(name: str) -> MethodSpec | None:
    """The declaration of method ``name``, importing the plugins first when it is not known."""
    if name not in METHOD_SPECS:
        load_plugins()
    return METHOD_SPECS.get(name)


def get_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; raises :class:`UnknownMethodError` listing the valid ones."""
    spec = find_spec(name)
    if spec is None:
        raise UnknownMethodError(unknown_method(name))
    return spec


def unknown_method(name: str) -> str:
    return f"unknown merge method '{name}'; valid: {', '.join(sorted(METHOD_SPECS))}"


# ---- the built-in methods (mergekit 0.1.5's) -------------------------------------------------

_WEIGHT = ParamSpec("weight", required=True, doc="scale of this model's task vector")
_DENSITY = ParamSpec("density", 1.0, doc="fraction of the task vector kept", low=0.0, high=1.0)
_GAMMA = ParamSpec("gamma", 0.01, doc="fraction of largest-magnitude entries dropped as outliers", low=0.0, high=1.0, high_open=True)
_EPSILON = ParamSpec("epsilon", 0.15, doc="spread of keep probabilities around density", low=0.0)


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


def _inert(spec: ParamSpec) -> ParamSpec:
    return ParamSpec(**{**spec.__dict__, "inert": True})


def task_arithmetic_family(
    name: str,
    *,
    sparsify: Literal["magnitude", "random", "outliers", "della"] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
) -> MethodSpec:
    """A member of the task-arithmetic family, as mergekit 0.1.5 defines it: its sparsification,
    whether it elects signs (TIES consensus) and its `normalize` / `rescale` defaults. Without
    sparsification `density` and `rescale` are accepted and change nothing (`inert`)."""
    extra = {"outliers": (_GAMMA,), "della": (_EPSILON,)}.get(sparsify or "", ())
    sparse = sparsify is not None
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
        random=sparsify in ("random", "della"),
        writes_out=True,
        sparsify=sparsify,
        consensus=consensus,
        kernel="evomerge.merge.methods.task_arithmetic:TaskArithmeticFamily",
        numpy_kernel="evomerge.merge.fast:TASK_ARITHMETIC" if not sparse and not consensus else None,
        doc="base + lambda * merged task vectors" + (f" ({sparsify} sparsification)" if sparse else "") + (", TIES sign election" if consensus else ""),
    )


for _spec in (
    MethodSpec(
        "linear",
        requires_base=False,
        model_params=(ParamSpec("weight", required=True, doc="mixing weight of this model"),),
        global_params=(ParamSpec("normalize", True, doc="divide by the sum of the weights", kind="bool"),),
        writes_out=True,
        models=ModelCount(1),
        kernel="evomerge.merge.methods.linear:Linear",
        numpy_kernel="evomerge.merge.fast:LINEAR",
        doc="weighted average of the models",
    ),
    MethodSpec(
        "slerp",
        requires_base=True,
        global_params=(ParamSpec("t", required=True, doc="interpolation factor, 0 = base_model", low=0.0, high=1.0),),
        models=ModelCount(1, 1),
        writes_out=True,
        lists_base=True,
        kernel="evomerge.merge.methods.slerp:Slerp",
        doc="spherical interpolation from base_model to the other model",
    ),
    MethodSpec(
        "model_stock",
        requires_base=True,
        global_params=(ParamSpec("filter_wise", False, doc="one interpolation factor per output row", kind="bool"),),
        models=ModelCount(2),
        kernel="evomerge.merge.methods.model_stock:ModelStock",
        doc="interpolation towards the models' mean by their task vectors' mean cosine",
    ),
    MethodSpec(
        "passthrough",
        requires_base=False,
        model_params=(ParamSpec("scale", None, doc="multiply the tensor by this factor"),),
        models=ModelCount(1, 1),
        writes_out=True,
        kernel="evomerge.merge.methods.passthrough:Passthrough",
        doc="one model's tensors (DFS layer stacks)",
    ),
    task_arithmetic_family("task_arithmetic"),
    task_arithmetic_family("ties", sparsify="magnitude", consensus=True, normalize=True),
    task_arithmetic_family("dare_ties", sparsify="random", consensus=True, rescale=True),
    task_arithmetic_family("dare_linear", sparsify="random", rescale=True),
    task_arithmetic_family("breadcrumbs", sparsify="outliers"),
    task_arithmetic_family("breadcrumbs_ties", sparsify="outliers", consensus=True),
    task_arithmetic_family("della", sparsify="della", consensus=True, normalize=True, rescale=True),
    task_arithmetic_family("della_linear", sparsify="della", rescale=True),
):
    register_method(_spec)
BUILTIN_METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
