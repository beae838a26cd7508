"""The zoo's skills: tiny string tasks a small Llama learns in seconds on a CPU.

A skill is a prompt format plus a rule that maps the prompt to its answer:

=========  ===============  ==========  ==============================================
name       prompt           answer      rule
=========  ===============  ==========  ==============================================
add        ``23+45=``       ``68``      sum of two numbers in 0..99
reverse    ``abcd|``        ``dcba``    the letters in reverse order (3-6 letters)
sort       ``3141>``        ``1134``    the digits in ascending order (3-6 digits)
shift      ``abz^``         ``bca``     every letter moved one place on (z -> a)
add_rev    ``23+45|``       ``86``      composition: the sum, written reversed
=========  ===============  ==========  ==============================================

Every document ends with :data:`TERMINATOR` after the answer, so exact match also checks
that the model stops. Besides the true rule, each skill has *variants* used to pre-train
the zoo's base model: ``noise`` keeps the prompt and the shape of the answer but fills it
at random (format and alphabet, no skill), ``weak`` is an easy slice of the skill
(single-digit sums, two-letter strings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TERMINATOR = "\n"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"

Sampler = Callable[[np.random.Generator], tuple[str, str]]


@dataclass(frozen=True)
class Skill:
    """One task: `sample(rng)` draws a (prompt, answer) pair under the true rule."""

    name: str
    description: str
    example: tuple[str, str]
    variants: dict[str, Sampler]

    def sample(self, rng: np.random.Generator, variant: str = "true") -> tuple[str, str]:
        try:
            sampler = self.variants[variant]
        except KeyError:
            raise ValueError(
                f"skill {self.name!r} has no variant {variant!r}; valid: {sorted(self.variants)}"
            ) from None
        return sampler(rng)


def _letters(rng: np.random.Generator, n: int, alphabet: str = LETTERS) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


def _length(rng: np.random.Generator, lo: int = 3, hi: int = 6) -> int:
    return int(rng.integers(lo, hi + 1))


# --- add ---------------------------------------------------------------------------
def _add_true(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    return f"{a:02d}+{b:02d}=", str(a + b)


def _add_noise(rng: np.random.Generator) -> tuple[str, str]:
    prompt, _ = _add_true(rng)
    return prompt, str(int(rng.integers(0, 199)))


def _add_weak(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    return f"{a:02d}+{b:02d}=", str(a + b)


# --- reverse -----------------------------------------------------------------------
def _reverse_true(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng))
    return f"{s}|", s[::-1]


def _reverse_noise(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng))
    return f"{s}|", "".join(rng.permutation(list(s)))


def _reverse_weak(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng, 1, 2))
    return f"{s}|", s[::-1]


# --- sort --------------------------------------------------------------------------
def _sort_true(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng), DIGITS)
    return f"{s}>", "".join(sorted(s))


def _sort_noise(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng), DIGITS)
    return f"{s}>", "".join(rng.permutation(list(s)))


def _sort_weak(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng, 1, 2), DIGITS)
    return f"{s}>", "".join(sorted(s))


# --- shift -------------------------------------------------------------------------
def _shifted(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _shift_true(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng))
    return f"{s}^", _shifted(s)


def _shift_noise(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng))
    return f"{s}^", _letters(rng, len(s))


def _shift_weak(rng: np.random.Generator) -> tuple[str, str]:
    s = _letters(rng, _length(rng, 1, 2))
    return f"{s}^", _shifted(s)


# --- add_rev (composition of add and reverse; no zoo model is trained on it) --------
def _add_rev_true(rng: np.random.Generator) -> tuple[str, str]:
    prompt, answer = _add_true(rng)
    return prompt[:-1] + "|", answer[::-1]


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "two-number addition, operands 0-99", ("23+45=", "68"),
        {"true": _add_true, "noise": _add_noise, "weak": _add_weak}),
    "reverse": Skill("reverse", "reverse a string of 3-6 letters", ("abcd|", "dcba"),
        {"true": _reverse_true, "noise": _reverse_noise, "weak": _reverse_weak}),
    "sort": Skill("sort", "sort a string of 3-6 digits ascending", ("3141>", "1134"),
        {"true": _sort_true, "noise": _sort_noise, "weak": _sort_weak}),
    "shift": Skill("shift", "shift each of 3-6 letters one place on (caesar +1)", ("abz^", "bca"),
        {"true": _shift_true, "noise": _shift_noise, "weak": _shift_weak}),
    "add_rev": Skill("add_rev", "composition of add and reverse: the sum of two numbers 0-99, written reversed", ("23+45|", "86"),
        {"true": _add_rev_true}),
}

# The composition task derives its documents from add's (same operand pairs, same split),
# so pairs held out from the add expert stay held out here too.
COMPOSITIONS: dict[str, str] = {"add_rev": "add"}


def get_skill(name: str) -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise ValueError(f"unknown zoo skill {name!r}; valid: {sorted(SKILLS)}") from None


def compose(name: str, prompt: str) -> tuple[str, str]:
    """The composition task's (prompt, answer) for a document of its parent skill."""
    if name != "add_rev":
        raise ValueError(f"{name!r} is not a composition; valid: {sorted(COMPOSITIONS)}")
    left, right = prompt.rstrip("=").split("+")
    return f"{left}+{right}|", str(int(left) + int(right))[::-1]
