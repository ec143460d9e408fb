"""The earlier embedding store format (schema_version 1): a folder of append-only Parquet parts.

Superseded by the Delta Lake table of `elite.data.store`; kept so that stores of this format stay readable (by
every job) until `elite store migrate` converts them (`elite.data.migrate`). Jobs never write to it.

Layout and the reasons for it: docs/embedding-store.md. In short:

- A store is a folder (or an S3 prefix, through `elite.data.storage`) of immutable
  `part-<utc time>-<uuid>.parquet` files.
  Each `append` writes one new part under a dot-prefixed temporary name, fsyncs it and renames it,
  so a writer killed mid-write leaves only an invisible `.part-*.tmp` file, never a partial part.
- Rows are deduplicated on (concept id, image sha256, mask sha256, encoder id) against the stored parts: two ids
  with the same image bytes are two rows, a changed image is a new row that reads as the concept's newest.
- The local tokens, (patches, text_dim) float16, are one binary value per row: the benchmark
  (benchmarks/bench_store.py) measured that layout 2.3-2.6x faster to write and read than a list
  column with zstd (4-6x without compression), and it keeps float16, which DuckDB 1.x cannot decode,
  out of the Parquet types.
- Readers find rows from a small index of key columns, then read only the row groups that hold them.

File access goes through `elite.data.part_index.PartStorage`: `LocalFolder` locally,
`elite.data.storage.ObjectStorePartStorage` for S3.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from elite.data.part_index import AppendResult, LocalFolder, PartIndex, PartStorage, is_part_name
from elite.data.store_format import (
    DEFAULT_ROW_GROUP_ROWS,
    PARTS_CORE_SCHEMA,
    PARTS_SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    WRITE_OPTIONS,
    EmbeddingRecord,
    StoreKey,
    check_schema,
    plain_columns,
    record_batch,
)
from elite.errors import InputError

__all__ = ["AppendResult", "PartStore", "is_part_name"]


class PartStore(PartIndex):
    """A store of the earlier format: read it, or append to it (tests and tools that make one); the jobs read it."""

    def __init__(self, root: str | os.PathLike[str] | PartStorage, *,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> None:
        super().__init__(LocalFolder(root) if isinstance(root, str | os.PathLike) else root)
        if row_group_rows < 1:
            raise InputError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.row_group_rows = row_group_rows

    def _listing(self) -> list[str]:
        return self.storage.list_parts()

    def _check_file(self, schema: pa.Schema, uri: str) -> None:
        check_schema(schema, uri)

    def part_names(self) -> list[str]:
        return [part.name for part in self._refresh()]

    def append(self, records: Sequence[EmbeddingRecord]) -> AppendResult:
        """Write the records not stored yet as one new part; skip the rest (see `AppendResult`)."""
        self._refresh()
        new: dict[StoreKey, EmbeddingRecord] = {}
        for record in records:
            if not isinstance(record, EmbeddingRecord):
                raise InputError(f"append takes EmbeddingRecord items, got a {type(record).__name__}")
            if record.key not in self._keys and record.key not in new:
                new[record.key] = record
        if not new:
            return AppendResult(0, len(records), None)
        kept = sorted(new.values(), key=lambda r: r.concept_id)  # sorted: tight concept_id stats per row group
        schema = self._part_schema(kept)
        now = datetime.datetime.now(datetime.UTC)
        name = f"part-{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet"  # unique: writers never collide

        def write(sink: Any) -> None:
            with pq.ParquetWriter(sink, schema, **WRITE_OPTIONS, use_dictionary=plain_columns(schema),
                                  write_statistics=plain_columns(schema)) as writer:
                for start in range(0, len(kept), self.row_group_rows):  # one row group in memory at a time
                    writer.write_batch(record_batch(kept[start:start + self.row_group_rows], schema, now),
                                       row_group_size=self.row_group_rows)

        with self._guard(name, "write"):
            self.storage.write_part(name, write)
        return AppendResult(len(kept), len(records) - len(kept), name)

    def _part_schema(self, records: Sequence[EmbeddingRecord]) -> pa.Schema:
        """The core schema plus the records' metadata columns, typed as stored parts already type them."""
        stored: dict[str, Any] = {}
        for part in self._parts.values():
            for key, type_ in part.metadata_types.items():
                stored.setdefault(key, type_)
        fields = []
        for key in sorted({key for record in records for key in record.metadata}):
            values = [record.metadata.get(key) for record in records]
            try:
                array = pa.array(values, type=stored.get(key))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
                where = f"the stored type {stored[key]}" if key in stored else "one column type"
                raise InputError(f"metadata {key!r}: values do not fit {where}: {err}") from err
            fields.append(pa.field(key, pa.string() if pa.types.is_null(array.type) else array.type))
        return pa.schema([*PARTS_CORE_SCHEMA, *fields],
                         metadata={SCHEMA_VERSION_KEY: str(PARTS_SCHEMA_VERSION).encode()})

