"""The object-store interface and its local implementation: keys, listings, atomic puts.

    ObjectStore     the protocol every backend implements (a local folder here, S3 in elite.data.s3)
    LocalStore      objects as files under a folder, the embedded default
    check_key       the key rule both backends apply: relative '/'-paths that cannot leave the root

Guide: docs/storage.md.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import hashlib
import io
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from elite.errors import InputError, StorageError
from elite.fileio import atomic_path, fsync_folder

MiB = 1024 * 1024
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # elite.fileio.atomic_path's in-progress files
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters, and '\\' (a separator on Windows)
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


# ---- the interface -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root, '/'-separated
    size: int  # bytes
    etag: str | None  # S3's ETag without quotes ("<md5>-<parts>" after a multipart upload); None locally
    last_modified: datetime.datetime | None  # UTC


class ObjectStore(Protocol):
    """A flat namespace of immutable-by-convention objects under one root (a folder or an S3 prefix)."""

    def uri(self, key: str = "") -> str:
        """The root's URI, or a key's: file:///... or s3://bucket/prefix/key."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, at any depth, sorted by key; fetched page by page."""
        ...

    def get(self, key: str) -> bytes:
        ...

    def open(self, key: str) -> BinaryIO:
        """A seekable read-only file over the object, read piece by piece (S3: ranged GETs)."""
        ...

    def put(self, key: str, data: bytes | str | os.PathLike[str]) -> None:
        """Store bytes, or a local file's contents, under `key`: readers see the old object or the whole new one."""
        ...

    def exists(self, key: str) -> bool:
        ...

    def sha256(self, key: str) -> str:
        """Hex sha256 of the object's bytes."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""
        ...


def check_key(key: str) -> str:
    """`key` if it is a clean relative '/'-path, else InputError. Applied by both backends alike."""
    if not isinstance(key, str) or not key:
        raise InputError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise InputError(f"object key {key!r} is absolute; keys are relative to the store's root")
    if _BAD_KEY_CHARS.search(key):
        raise InputError(f"object key {key!r} holds a backslash or a control character")
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InputError(f"object key {key!r} has an empty, '.' or '..' segment; keys may not leave the root")
    if _TEMP_NAME.fullmatch(segments[-1]):
        raise InputError(f"object key {key!r} looks like an in-progress write (.<name>.<8 hex>.tmp); such "
                         "names are reserved and never listed")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: a key, a folder ending in '/', a partial name, or '' for everything."""
    if prefix:
        check_key(prefix.rstrip("/") + "/x" if prefix.endswith("/") else prefix)
    return prefix


def source_file(data: str | os.PathLike[str], target: str) -> Path:
    source = Path(data)
    if not source.is_file():
        raise InputError(f"{source}: not a file, cannot put it as {target}")
    return source


# ---- local folders -------------------------------------------------------------------------------

class LocalStore:
    """Objects as files under a folder; the folder is made by the first put."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._real_root = self.root.resolve()  # once: resolving is a syscall per path component

    def uri(self, key: str = "") -> str:
        return (self.root / check_key(key) if key else self.root).as_uri()  # names only: no link check needed

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # a symlink inside the root could still lead out of it; resolve() follows links (strict=False: the
        # file need not exist yet)
        if not path.resolve().is_relative_to(self._real_root):
            raise InputError(f"object key {key!r} leads out of {self.root} through a symbolic link")
        return path

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = self.root / check_prefix(prefix).rpartition("/")[0]  # walk only the prefix's folder

        def fail(err: OSError) -> None:
            if not isinstance(err, FileNotFoundError):  # a folder deleted mid-walk is simply empty
                raise StorageError(f"{self.uri()}: cannot list {err.filename}: {err.strerror}") from err

        found: builtins.list[ObjectInfo] = []
        for folder, _, names in os.walk(start, onerror=fail):
            for name in names:
                path = Path(folder, name)
                key = path.relative_to(self.root).as_posix()
                if _TEMP_NAME.fullmatch(name) or not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted since the walk saw it
                    continue
                modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC)
                found.append(ObjectInfo(key, stat.st_size, None, modified))
        # str order is code point order, which is UTF-8 byte order: the order S3 lists in
        yield from sorted(found, key=lambda info: info.key)

    def get(self, key: str) -> bytes:
        with self._errors(key, "read"), self._open_regular(key) as handle:
            return handle.read()

    def open(self, key: str) -> BinaryIO:
        with self._errors(key, "open"):
            return self._open_regular(key)  # the caller closes it

    def _open_regular(self, key: str) -> io.BufferedReader:
        """Open a key for reading only if it is a regular file. O_NONBLOCK makes opening a FIFO return at once
        (a plain open waits for a writer), and the check is on the opened file itself, so nothing can be swapped
        in between; reading a FIFO or a device (/dev/zero) would block or never end."""
        fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(
                    mode) else "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "special"
                raise StorageError(f"{self.uri(key)}: not a regular file ({kind}); refused, reading it could block")
            os.set_blocking(fd, True)
            return cast(io.BufferedReader, os.fdopen(fd, "rb"))
        except BaseException:
            os.close(fd)
            raise

    def put(self, key: str, data: bytes | str | os.PathLike[str]) -> None:
        path = self._path(key)
        if isinstance(data, bytes | bytearray | memoryview):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        else:
            source = source_file(data, self.uri(key))
            with atomic_path(path) as tmp:
                shutil.copyfile(source, tmp)
        fsync_folder(path.parent)  # make the rename itself durable, not only the bytes

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def sha256(self, key: str) -> str:
        with self._errors(key, "hash"), self._open_regular(key) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"):
            self._path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _errors(self, key: str, doing: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, NotADirectoryError) as err:
            raise StorageError(f"{self.uri(key)}: not found") from err
        except IsADirectoryError as err:
            raise StorageError(f"{self.uri(key)}: is a folder, not an object") from err
        except OSError as err:
            raise StorageError(f"{self.uri(key)}: {doing} failed: {err.strerror or err}") from err


def is_uri(text: str) -> bool:
    """True for `scheme://...` (s3://, file://), false for plain paths and store keys."""
    return SCHEME.match(text) is not None

