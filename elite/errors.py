"""The one exception tree of the library.

    EliteError                 base: every error the library raises on purpose
    ├── CheckpointError        a mapper or model file is missing, truncated, unsafe or has the wrong layout
    ├── InputError             an image, mask, prompt or argument cannot be used (names the item and why)
    └── StorageError           reading or writing files or objects failed

Callers that process batches catch `EliteError`, record it as a `Failure` against the item and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """One item a batch job could not process: which, at what stage, and why."""

    item: str
    stage: str
    reason: str


class EliteError(Exception):
    """Base class of every error raised on purpose by `elite`."""


class CheckpointError(EliteError):
    """A checkpoint is missing, truncated, unsafe to load, or does not match the expected layout."""


class InputError(EliteError):
    """An input (image, mask, prompt, argument) cannot be used; the message names it and says why."""


class StorageError(EliteError):
    """Reading or writing a file or object failed."""
