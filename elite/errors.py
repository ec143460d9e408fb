"""The one exception tree of the library, and the failure record of batch jobs.

    EliteError                   base: every error the library raises on purpose
    ├── CheckpointError          a mapper or model file is missing, truncated, unsafe or has the wrong layout
    ├── InputError               an image, mask, prompt, id or argument cannot be used (names the item and why)
    └── StorageError             reading or writing files or objects failed, and trying again will not help
        └── TransientStorageError   ... failed in a way that may pass (throttling, 5xx, a dropped connection):
                                    the only error the flows retry, after a delay

Batch jobs catch `EliteError` per item, record it as a `Failure` and carry on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Variables whose values are credentials: never printed, logged, stored in a table, an artifact or a Prefect state
SECRET_VARIABLES = ("ELITE_S3_ACCESS_KEY_ID", "ELITE_S3_SECRET_ACCESS_KEY", "ELITE_S3_SESSION_TOKEN",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")  # http://user:password@host -> http://***@host


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """`text` without credentials: the user and password of any URL in it, the values of SECRET_VARIABLES as set
    in this process, and `secrets` (e.g. a StorageSettings' keys), each replaced by ***."""
    text = _URL_USERINFO.sub("***@", text)
    for value in (*secrets, *(os.environ.get(name) for name in SECRET_VARIABLES)):
        if value and len(value) >= 4:  # a one-letter "secret" would blank out text, not hide anything
            text = text.replace(value, "***")
    return text


@dataclass(frozen=True)
class Failure:
    """One item a batch job could not process: which, where, at what stage, and why (a failures-table row)."""

    concept_id: str  # the concept; "" for an item that is not one (a prompt-file or manifest line)
    uri: str  # the object at fault: image, mask, "<file>:<line>", or the output that was not written
    stage: str  # manifest, prompts, read, preprocess, encode, generate, write
    reason: str

    def __post_init__(self) -> None:
        # A file name may hold bytes that are not UTF-8 (Python keeps them as surrogates) or control characters:
        # recording the failure must never fail itself, so every field becomes printable text (b"\xff" -> "\\xff")
        for name in ("concept_id", "uri", "stage", "reason"):
            object.__setattr__(self, name, printable(redact(str(getattr(self, name)))))

    def row(self) -> dict[str, str]:
        return {"concept_id": self.concept_id, "uri": self.uri, "stage": self.stage, "reason": self.reason}


def printable(text: str) -> str:
    """`text` as valid, one-line UTF-8: undecodable bytes of a file name (surrogates) and control characters
    written as backslash escapes, so a name cannot break a table, a log line or the terminal."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(f"\\x{ord(c):02x}" if c < " " or c == "\x7f" else c for c in text)


class EliteError(Exception):
    """Base class of every error raised on purpose by `elite`. Its message never holds credentials: they are
    redacted here, so neither a log, a failures table nor a Prefect state can store them."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class CheckpointError(EliteError):
    """A checkpoint is missing, truncated, unsafe to load, or does not match the expected layout."""


class InputError(EliteError):
    """An input (image, mask, prompt, argument) cannot be used; the message names it and says why."""


class StorageError(EliteError):
    """Reading or writing a file or object failed (not found, access denied, ...): retrying will not help."""


class TransientStorageError(StorageError):
    """Reading or writing failed in a way that may pass on its own (throttling, 5xx, timeouts, refused or dropped
    connections), after the client's own retries: worth retrying the whole task later."""


def check_integer(name: str, value: object, minimum: int) -> None:
    """InputError unless `value` is an int (not a bool) of at least `minimum`: counts and sizes of jobs."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
