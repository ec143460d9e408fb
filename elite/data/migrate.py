"""Convert a store of the earlier part format (schema_version 1) into an embedding table (schema_version 2).

    migrate_store("embeddings/", "embeddings-table/")          also s3:// on either side

Every current row of the old store (per concept id and encoder: its newest row) is written to the table with its
hashes, source, encoder, creation time and metadata columns unchanged; tensors are copied bit for bit (the mask
changes type only: list of uint8 -> bytes). Rows go in chunks, each one MERGE commit, so memory stays flat in the
store's size, and a migration that stopped midway is finished by running it again: rows already in the table
unchanged are skipped. The old store is only read, never changed.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from elite.data.parts_store import PartStore
from elite.data.s3 import StorageSettings
from elite.data.storage import embedding_store, embedding_table
from elite.data.store_format import EmbeddingRecord
from elite.errors import InputError

__all__ = ["MigrationReport", "migrate_store"]

CHUNK_ROWS = 256  # rows per commit: ~100 MB of real-size local tokens


@dataclass(frozen=True)
class MigrationReport:
    source_rows: int  # current rows in the old store
    written: int  # rows inserted or replaced in the table by this run
    skipped: int  # rows the table held already, unchanged
    encoders: list[str]
    version: int | None  # the table's version afterwards


def migrate_store(old_uri: str | os.PathLike[str], new_uri: str | os.PathLike[str],
                  settings: StorageSettings | None = None, *, chunk_rows: int = CHUNK_ROWS,
                  progress: Callable[[int], None] | None = None) -> MigrationReport:
    old = embedding_store(old_uri, settings)
    if not isinstance(old, PartStore):
        raise InputError(f"{os.fspath(old_uri)}: not a store of the earlier part format (schema_version 1): it is "
                         "empty or a table already; nothing to migrate")
    if os.fspath(old_uri).rstrip("/") == os.fspath(new_uri).rstrip("/"):
        raise InputError("migrate into a new location: the table cannot be written over the parts it reads")
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
    table = embedding_table(new_uri, settings)
    encoders = sorted({key[3] for key in old.stored_keys()})  # (concept id, image, mask, encoder)
    total = written = skipped = 0
    for encoder_id in encoders:
        ids = old.concept_ids(encoder_id)
        for start in range(0, len(ids), chunk_rows):
            arrays = old.read_arrays(ids[start:start + chunk_rows], encoder_id)  # the newest row of each id
            records = [EmbeddingRecord(cid, arrays.source_uris[i], arrays.image_sha256[i], arrays.mask_sha256[i],
                                       arrays.encoder_ids[i], arrays.words[i], arrays.local_tokens[i],
                                       arrays.mask_grid[i],
                                       {key: values[i] for key, values in arrays.metadata.items()
                                        if values[i] is not None})
                       for i, cid in enumerate(arrays.concept_ids)]
            created = [value.astype("datetime64[us]").item().replace(tzinfo=datetime.UTC)
                       for value in np.asarray(arrays.created_at)]
            result = table.append(records, created_at=created)
            total += len(records)
            written += result.written
            skipped += result.skipped
            if progress is not None:
                progress(len(records))
    return MigrationReport(total, written, skipped, encoders, table.version())
