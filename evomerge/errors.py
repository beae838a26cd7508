"""Errors a user can act on: one line naming the file, the field and what would be valid."""

from __future__ import annotations


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
