"""Opening storage by location: one call for local folders and S3 alike.

    open_store("embeddings/")                  LocalStore, the embedded default (also file:///abs/path)
    open_store("s3://bucket/prefix")           S3Store through boto3
    open_object("s3://bucket/prompts.txt")     (store of the folder, key) for one object
    embedding_store(uri)                       the embedding table (elite.data.store) on either

Both backends take the same '/'-separated relative keys and refuse the same bad ones ('..', absolute,
backslashes, control characters), so data moves between them unchanged and no key escapes a local root.
A put is all-or-nothing on both. Guide: docs/storage.md.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from elite.data.objects import SCHEME, LocalStore, ObjectInfo, ObjectStore, check_key, is_uri
from elite.data.part_index import LocalFolder, PartStorage, is_part_name
from elite.data.parts_store import PartStore
from elite.data.s3 import S3Store, StorageSettings, storage_settings_from_env
from elite.data.store import EmbeddingStore
from elite.data.store_format import DEFAULT_ROW_GROUP_ROWS
from elite.errors import InputError, StorageError

AnyEmbeddingStore = EmbeddingStore | PartStore  # what the jobs read; they write only to an EmbeddingStore
DELTA_LOG = "_delta_log"

__all__ = [
    "AnyEmbeddingStore",
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "ObjectStorePartStorage",
    "S3Store",
    "StorageSettings",
    "check_key",
    "embedding_store",
    "embedding_table",
    "is_uri",
    "open_object",
    "open_store",
    "storage_settings_from_env",
]

def open_store(uri: str | os.PathLike[str], settings: StorageSettings | None = None) -> LocalStore | S3Store:
    """A plain path or file:// URL -> LocalStore; s3://bucket[/prefix] -> S3Store; any other scheme -> InputError.

    `settings` apply to S3 only; None reads them from the environment (`storage_settings_from_env`).
    """
    text = os.fspath(uri)
    match = SCHEME.match(text)
    if match is None:
        if not text:
            raise InputError("storage location is empty; give a folder, file:///path or s3://bucket/prefix")
        return LocalStore(text)
    scheme, rest = match.group(1).lower(), text[match.end():]
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InputError(f"{text}: no bucket; expected s3://bucket/prefix")
        return S3Store(bucket, prefix, settings)
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise InputError(f"{text}: file URLs must be file:///absolute/path (no host)")
        return LocalStore(unquote("/" + path))
    raise InputError(f"{text}: unsupported storage scheme {scheme!r}; use a folder, file:///path or s3://bucket/prefix")


def open_object(uri: str, settings: StorageSettings | None = None) -> tuple[LocalStore | S3Store, str]:
    """(store of the containing folder, key) for the URI or path of one object, e.g. a prompt file."""
    folder, name = posixpath.split(uri.rstrip("/"))
    if not name or folder.endswith(":"):  # "s3://bucket" alone names a bucket, not an object
        raise InputError(f"{uri!r} names a folder or bucket, not an object")
    return open_store(folder or ".", settings), name  # a bare file name lives in the current folder


class ObjectStorePartStorage:
    """elite.data.store's `PartStorage` on any ObjectStore: parts are objects directly under the store's root
    (list_parts lists the whole root, so give the embedding store a prefix of its own).

    A part is written to a local temporary file first, then put in one go, so it appears whole or not at all
    (on S3 as a single PUT or a multipart upload completed only after every part arrived).
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def list_parts(self) -> list[str]:
        return sorted(info.key for info in self.store.list() if "/" not in info.key and is_part_name(info.key))

    def open_part(self, name: str) -> Any:
        # PythonFile: pyarrow seeks and reads through it, so a Parquet read fetches the footer and the row groups
        # it needs, not the whole part
        return pa.PythonFile(self.store.open(name), mode="r")

    def write_part(self, name: str, write: Callable[[Any], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="elite-part-") as folder:
            path = Path(folder, "part.parquet")
            with pa.OSFile(str(path), "wb") as sink:
                write(sink)
            self.store.put(name, path)

    def uri(self, name: str = "") -> str:
        return self.store.uri(name)


def embedding_table(uri: str | os.PathLike[str], settings: StorageSettings | None = None) -> EmbeddingStore:
    """The embedding table to write to (`embedding_store(uri, writable=True)`): a store of the earlier format is
    refused with how to migrate it."""
    store = embedding_store(uri, settings, writable=True)
    assert isinstance(store, EmbeddingStore)  # writable=True refuses the other kind
    return store


def embedding_store(uri: str | os.PathLike[str], settings: StorageSettings | None = None, *,
                    version: int | None = None, writable: bool = False,
                    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> AnyEmbeddingStore:
    """The embedding store at a folder, file:// URL or s3://bucket/prefix: the Delta table (made by the first
    append where there is nothing yet), or a store of the earlier part format, which is read as it is.

    `writable`: refuse a store of the earlier format with a StorageError saying how to migrate it, before any
    work is done. `version`: the table as it was at that version (read-only).
    """
    store = open_store(uri, settings)
    storage: PartStorage
    if isinstance(store, LocalStore):
        storage = LocalFolder(store.root)  # memory-maps data files
        is_table, location = (store.root / DELTA_LOG).is_dir(), str(store.root)
        options: dict[str, str] = {}
    else:
        storage = ObjectStorePartStorage(store)
        is_table = next(iter(store.list(DELTA_LOG + "/")), None) is not None
        location, options = f"s3://{store.bucket}/{store.prefix}".rstrip("/"), store.delta_storage_options()
    if not is_table and storage.list_parts():
        if writable:
            raise StorageError(f"{storage.uri()}: an embedding store of the earlier part format (schema_version 1);"
                               f" jobs read it but write only tables: convert it with `elite store migrate "
                               f"{uri} NEW` and use NEW")
        if version is not None:
            raise InputError(f"{storage.uri()}: a store of the earlier part format has no versions")
        return PartStore(storage, row_group_rows=row_group_rows)
    return EmbeddingStore(location, storage=storage, storage_options=options, version=version,
                          row_group_rows=row_group_rows)
