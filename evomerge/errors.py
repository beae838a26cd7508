"""Errors a user can act on: one line naming the file, the field and what would be valid."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin


class EvomergeError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.field = field

    def located(self, file: str | None = None, field: str | None = None) -> EvomergeError:
        """Fill in where the problem is, keeping what is already known."""
        self.file = self.file or file
        self.field = self.field or field
        return self

    def __str__(self) -> str:
        where = [part for part in (self.file, self.field) if part]
        return ": ".join([*where, self.message])


class ConfigError(EvomergeError):
    """An experiment, recipe or search-space file that is not valid."""


class SourceError(EvomergeError):
    """A model reference that cannot be opened, or tensors that do not fit together."""


# ---- schema errors (pydantic) as one line ----------------------------------------------------

_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")
# A validator that knows the field better than pydantic's location starts its message with it.
_SELF_LOCATED = re.compile(r"^([A-Za-z_]\w*\[\d+\][\w.\[\]]*): (.+)$", re.S)
# Union members and validator wrappers that pydantic puts in an error's location.
_TAG = re.compile(r"^(str|int|float|bool|dict|list|tuple|none|function-\w+)(\[.*\])?$|^[A-Z]\w*$")


def schema_error(
    exc: Any,
    *,
    file: str | None = None,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    valid_fields: Callable[[str], list[str]] | None = None,
    model: type | None = None,
    specific: bool = False,
) -> ConfigError:
    """A pydantic ValidationError as one line naming the file and the field.

    The one formatting path of schema errors (recipes, experiments, search spaces, evaluator
    specs): pydantic's "Value error, " prefix never reaches a message, union tags and `skip`
    (e.g. a discriminator value) are dropped from the field, an unknown field says what is valid
    (`valid_fields(parent field)`), a validator may name its own field as "stages[0].x: message",
    and pydantic's "Input should be X" reads "must be X, got VALUE".

    The valid fields come from `valid_fields(parent field)`, or else from the pydantic `model`
    that was validated (followed along the error's location). specific=True (specs made of
    nested unions, such as evaluator specs) reports the most specific error instead of the first
    (inside a union member, an unknown field wins over "not a string") and a value no member of a
    union takes lists the members ("expected one of: list[str], dict; got int").
    """
    errors = exc.errors()

    def split(e: dict) -> tuple[list, list]:
        """The error's location without, and with only, union tags and `skip`."""
        keep: list = []
        tags: list = []
        for p in e["loc"]:
            (tags if isinstance(p, str) and (p in skip or _TAG.match(p)) else keep).append(p)
        return keep, tags

    err = min(errors, key=lambda e: (e["type"].endswith("_type"), -len(e["loc"]))) if specific else errors[0]
    loc, _ = split(err)
    field = prefix + ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    message = pydantic_message(err)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = field.rsplit(".", 1)[0] if "." in field else ""
        valid = valid_fields(parent) if valid_fields else fields_at(model, err["loc"][:-1]) if model else []
        message = f"unknown field; valid: {', '.join(valid)}" if valid else "unknown field"
    elif kind == "missing":
        message = "missing (required)"
    elif specific and kind.endswith("_type"):
        tags = [t for e in errors if split(e)[0] == loc and e["type"].endswith("_type") for t in split(e)[1]]
        if len(tags) > 1:
            message = f"expected one of: {', '.join(dict.fromkeys(tags))}; got {type(err.get('input')).__name__}"
    located = _SELF_LOCATED.match(message)
    if located:
        field, message = located.group(1), located.group(2)
    return ConfigError(message, file=file, field=field.rstrip(".") or None)


def fields_at(model: type, loc: tuple | list) -> list[str]:
    """The fields of the pydantic model found at `loc` (a pydantic error location, union tags
    included) inside `model`: [] where no single model is found there."""
    types: list[Any] = [model]
    for part in loc:
        found: list[Any] = []
        for t in _members(types):
            fields = getattr(t, "model_fields", None)
            args = get_args(t)
            if fields is not None:
                if part in fields:
                    found.append(fields[part].annotation)
                elif part == getattr(t, "__name__", None):  # a union member's tag
                    found.append(t)
            elif isinstance(part, int) and get_origin(t) in (list, tuple, set, Sequence) and args:
                found.append(args[0])
            elif isinstance(part, str) and get_origin(t) in (dict, Mapping) and len(args) == 2:
                found.append(args[1])
        types = found
    models = [t for t in _members(types) if getattr(t, "model_fields", None) is not None]
    return list(models[0].model_fields) if len(models) == 1 else []


def _members(types: list[Any]) -> list[Any]:
    """The types with unions and Annotated unpacked (X | Y | None -> X, Y, None)."""
    out: list[Any] = []
    for t in types:
        if get_origin(t) in (Union, UnionType, Annotated):
            out += _members(list(get_args(t)[:1] if get_origin(t) is Annotated else get_args(t)))
        else:
            out.append(t)
    return out


def pydantic_message(err: dict) -> str:
    """The message of one pydantic error (an item of `ValidationError.errors()`) in evomerge's
    words: no "Value error, " prefix, "Input should be X" as "must be X, got VALUE"."""
    message = str(err["msg"])
    for known in _MESSAGE_PREFIXES:
        message = message.removeprefix(known)
    if err["type"] == "finite_number":
        return f"must be a finite number, got {err.get('input')!r}"
    if err["type"] in ("too_short", "list_too_short") and not err.get("input"):
        return "is empty; give at least one item"
    if message.startswith("Input should be "):  # "must be a valid integer, got 'abc'"
        return f"must be {message.removeprefix('Input should be ')}, got {err.get('input')!r}"
    return message


# ---- warnings --------------------------------------------------------------------------------


class EvomergeWarning(UserWarning):
    """Something the user asked for that evomerge did, with a consequence worth a line."""


def one_line_warnings() -> None:
    """Show EvomergeWarnings as `warning: message` (one line on stderr, no source line); other
    warnings as Python shows them. The CLI installs this once."""
    show = warnings.showwarning
    if getattr(show, "_evomerge", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' signature
        if issubclass(category, EvomergeWarning):
            print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning._evomerge = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
