"""Errors umtam raises for problems a user can fix.

Every message names the file, key, tensor or value at fault and, where one
exists, a hint. The CLI turns these into one line on stderr and an exit code;
anything else escaping the library is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


class UmtamError(Exception):
    """Base class: a runtime or data problem (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class DivergenceError(UmtamError):
    """Training produced NaN or inf: a property of the run (its rate, its data), not of the set-up.

    Apart from other errors so that a study can record a divergence as a result
    and still fail loudly on a missing file or a bad option.
    """


class ConfigError(UmtamError):
    """A bad option or recipe value: the user asked for something invalid (exit code 2)."""

    exit_code = 2


class CheckpointError(UmtamError):
    """A checkpoint directory is missing, incomplete, corrupted or incompatible."""


class DataError(UmtamError):
    """A dataset cannot be found or does not parse."""


class MergeError(UmtamError):
    """Checkpoints cannot be merged (different bases, keys or shapes)."""
