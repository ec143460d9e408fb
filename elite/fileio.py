"""Atomic local writes: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from elite.errors import StorageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a dot-prefixed temporary path beside `path`; on success fsync it and rename it over `path`.

    The rename is atomic on POSIX file systems, and the dot prefix keeps glob-style readers
    from picking the temporary file up. On failure the temporary file is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as err:
        raise StorageError(f"{final}: write failed: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make renames inside `folder` durable (a file's own fsync does not cover its directory entry)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise StorageError(f"{folder}: fsync of the folder failed: {err}") from err


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (images and models can be large)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as err:
        raise StorageError(f"{path}: cannot read for hashing: {err}") from err
