"""The embedding store: a Delta Lake table (schema_version 2) on a local folder or S3, one current row per concept.

Layout, schema and the reasons for them: docs/embedding-store.md. In short:

- Writes go through `deltalake` (delta-rs): every `append` is one MERGE on (concept_id, encoder_id), so a table
  holds one row per concept and encoder. A concept whose image, mask and source are unchanged is left alone, a
  changed one is replaced; each commit is a table version (`history`, `EmbeddingStore(..., version=N)`).
- Commits are atomic (a put-if-absent of the next log entry: a rename locally, a conditional PUT on S3), so a
  reader never sees part of a version and a writer killed mid-commit leaves only unreferenced data files. Two
  writers committing at once: one commit fails with a conflict and is redone on the new version (`append`
  retries up to `commit_retries` times), so no row is lost and no concept gets two current rows.
- Reads do not go through a query engine: the table's log names the data files (immutable, like the earlier
  format's parts), and `elite.data.part_index.PartIndex` reads their key columns once and then only the row
  groups that hold the rows asked for, through our own object store (local mmap or ranged S3 GETs).
- `optimize` compacts small files (one per encode batch) and can Z-order by concept_id; `vacuum` deletes files
  no version within the retention needs.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

import pyarrow as pa
from deltalake import ColumnProperties, CommitProperties, DeltaTable, WriterProperties
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from elite.data.part_index import AppendResult, LocalFolder, PartIndex, PartStorage
from elite.data.store_format import (
    CORE_SCHEMA,
    DEFAULT_ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    TENSOR_COLUMNS,
    EmbeddingRecord,
    check_core_columns,
    record_batch,
)
from elite.errors import InputError, StorageError, TransientStorageError

__all__ = ["COMMIT_RETRIES", "COMPACT_MIN_FILES", "SCHEMA_VERSION", "AppendResult", "EmbeddingStore", "sql_literal"]

VERSION_PROPERTY = SCHEMA_VERSION_KEY.decode()  # "elite.schema_version", a table property
# the scheduled step (`compact_small_files`): files under this size count as small; compaction packs them into
# files of deltalake's target size (100 MB), leaving files at that size alone, so it rewrites only new data
SMALL_FILE_BYTES = 32 * 2**20
COMPACT_MIN_FILES = 64  # default trigger: about 64 encode batches (512 concepts) appended since the last compaction
COMMIT_RETRIES = 30  # conflicting commits redone before giving up: ~50 s of backoff in all
# statistics in the log for these only: what other engines prune files by (the tensors' would bloat the log)
STATS_COLUMNS = "concept_id,encoder_id,image_sha256,mask_sha256,source_uri,created_at,schema_version"
# Delta reader features whose files cannot be read as plain Parquet (rows deleted in a side file, renamed columns)
UNSUPPORTED_READER_FEATURES = ("deletionVectors", "columnMapping")
_TRANSIENT = ("timed out", "timeout", "connection", "503", "slow down", "slowdown", "throttl", "500 internal")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
T = TypeVar("T")


def sql_literal(text: str) -> str:
    """A SQL string literal for DataFusion (the MERGE predicate): single quotes doubled, nothing else special."""
    return "'" + text.replace("'", "''") + "'"


class EmbeddingStore(PartIndex):
    """Append and read concept embeddings in a Delta table. One instance per thread; any number of processes
    and hosts may write the same table at once.

    `location` is a folder or an s3://bucket/prefix URI; for S3 give `storage` (how data files are read, e.g.
    `elite.data.storage.ObjectStorePartStorage`) and `storage_options` (deltalake's, from
    `elite.data.s3.S3Store.delta_storage_options`) - `elite.data.storage.embedding_store(uri)` does both. `version`
    opens the table as it was at that version, read-only.
    """

    def __init__(self, location: str | os.PathLike[str], *, storage: PartStorage | None = None,
                 storage_options: dict[str, str] | None = None, version: int | None = None,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, commit_retries: int = COMMIT_RETRIES) -> None:
        text = os.fspath(location)
        remote = "://" in text
        if storage is None and remote:
            raise InputError(f"{text}: give `storage` for a remote table (elite.data.storage.embedding_store "
                             "does it)")
        self.table_uri = text if remote else os.path.abspath(text)
        super().__init__(storage if storage is not None else LocalFolder(self.table_uri))
        if row_group_rows < 1:
            raise InputError(f"row_group_rows must be >= 1, got {row_group_rows}")
        if version is not None and version < 0:
            raise InputError(f"table version must be >= 0, got {version}")
        self.storage_options = dict(storage_options or {})
        self.pinned_version = version
        self.row_group_rows = row_group_rows
        self.commit_retries = commit_retries
        self._table: DeltaTable | None = None
        self._checked: tuple[int, int] | None = None  # (version, id of the metadata) last checked
        self._files_of: tuple[int, list[tuple[str, int]]] | None = None  # (version, its data files and sizes)

    # ---- the table ---------------------------------------------------------------------------

    def table(self) -> DeltaTable | None:
        """The deltalake table at its newest version (or the pinned one); None while nothing was ever written."""
        if self._table is None:
            try:
                self._table = DeltaTable(self.table_uri, version=self.pinned_version,
                                         storage_options=self.storage_options or None)
            except TableNotFoundError:
                if self.pinned_version is not None:
                    raise InputError(f"{self.uri()}: no embedding table here, so no version "
                                     f"{self.pinned_version} to read") from None
                return None
            except (DeltaError, OSError) as err:
                if self.pinned_version is not None and "version" in str(err).lower():
                    raise InputError(f"{self.uri()}: cannot open version {self.pinned_version} of the embedding "
                                     f"table: {err}") from err
                raise self._error("opening", err) from err
        elif self.pinned_version is None:
            self._call("reading the log of", self._table.update_incremental)
        self._check_table(self._table)
        return self._table

    def version(self) -> int | None:
        """The table version read now; None for an empty location."""
        table = self.table()
        return None if table is None else table.version()

    def _check_table(self, table: DeltaTable) -> None:
        metadata = table.metadata()
        if self._checked == (table.version(), id(metadata)):
            return
        found = metadata.configuration.get(VERSION_PROPERTY)
        if found is None:
            raise StorageError(f"{self.uri()}: a Delta table, but not an ELITE embedding table (no "
                               f"{VERSION_PROPERTY} table property)")
        if found != str(SCHEMA_VERSION):
            newer = found.isdigit() and int(found) > SCHEMA_VERSION
            raise StorageError(f"{self.uri()}: embedding table of schema_version {found}, but this release reads "
                               f"schema_version {SCHEMA_VERSION}" + ("; it was written by a newer release, "
                                                                     "upgrade elite to read it" if newer else ""))
        features = set(table.protocol().reader_features or ())
        unsupported = sorted(features.intersection(UNSUPPORTED_READER_FEATURES))
        if unsupported:
            raise StorageError(f"{self.uri()}: the table uses Delta reader features this release does not read "
                               f"({', '.join(unsupported)}); rewrite it without them")
        check_core_columns(self._schema(table), CORE_SCHEMA, self.uri())
        self._checked = (table.version(), id(metadata))

    def _schema(self, table: DeltaTable) -> pa.Schema:
        return pa.schema(table.schema().to_arrow())

    def _files(self) -> list[tuple[str, int]]:
        """(path relative to the table, size in bytes) of each data file of the current version, sorted by path;
        listed once per version (a version's files never change)."""
        table = self.table()
        if table is None:
            return []
        version = table.version()
        if self._files_of is None or self._files_of[0] != version:
            actions = pa.table(table.get_add_actions(flatten=True))
            paths = [unquote(path) for path in actions.column("path").to_pylist()]  # relative, URL-encoded
            self._files_of = (version, sorted(zip(paths, actions.column("size_bytes").to_pylist(), strict=True)))
        return self._files_of[1]

    def _listing(self) -> list[str]:
        return [path for path, _ in self._files()]

    def _check_file(self, schema: pa.Schema, uri: str) -> None:
        check_core_columns(schema, CORE_SCHEMA, uri)

    def _check_writable(self) -> None:
        if self.pinned_version is not None:
            raise InputError(f"{self.uri()}: opened at version {self.pinned_version}, read-only")

    # ---- writing ---------------------------------------------------------------------------

    def append(self, records: Sequence[EmbeddingRecord], *,
               created_at: Sequence[datetime.datetime] | None = None) -> AppendResult:
        """Merge `records` into the table in one commit: a concept (id and encoder) not stored is inserted, one
        stored with another image, mask or source replaces its row, one stored unchanged is skipped (counted in
        `skipped`, as is an id repeated in the call: its last record is kept). `created_at` (one per record, for
        migrations) keeps given times; by default every row gets the time of the call."""
        self._check_writable()
        latest: dict[tuple[str, str], tuple[EmbeddingRecord, datetime.datetime | None]] = {}
        times = list(created_at) if created_at is not None else [None] * len(records)
        if len(times) != len(records):
            raise InputError(f"created_at has {len(times)} values for {len(records)} records")
        for record, when in zip(records, times, strict=True):
            if not isinstance(record, EmbeddingRecord):
                raise InputError(f"append takes EmbeddingRecord items, got a {type(record).__name__}")
            latest.pop((record.concept_id, record.encoder_id), None)  # re-inserted: the last one wins, in order
            latest[(record.concept_id, record.encoder_id)] = (record, when)
        if not latest:
            return AppendResult(0, 0, None)
        kept = sorted(latest.values(), key=lambda pair: pair[0].concept_id)  # tight concept_id stats per file
        now = datetime.datetime.now(datetime.UTC)
        metrics = self._retrying("merging into", lambda: self._merge(kept, now))
        written = int(metrics.get("num_target_rows_inserted", 0)) + int(metrics.get("num_target_rows_updated", 0))
        table = self.table()
        return AppendResult(written, len(records) - written, None,
                            None if table is None or not written else table.version())

    def _merge(self, kept: list[tuple[EmbeddingRecord, datetime.datetime | None]],
               now: datetime.datetime) -> dict[str, Any]:
        table = self.table() or self._create()
        records = [record for record, _ in kept]
        schema = self._write_schema(records, self._schema(table))
        source = pa.Table.from_batches([record_batch(records, schema, now)])
        if any(when is not None for _, when in kept):
            given = pa.array([when or now for _, when in kept], pa.timestamp("us", tz="UTC"))
            source = source.set_column(source.schema.get_field_index("created_at"), "created_at", given)
        ids = ", ".join(sql_literal(record.concept_id) for record in records)
        encoders = ", ".join(sql_literal(e) for e in sorted({record.encoder_id for record in records}))
        # the IN lists let delta-rs skip every data file whose concept_id range holds none of these ids
        predicate = (f"t.concept_id = s.concept_id AND t.encoder_id = s.encoder_id "
                     f"AND t.concept_id IN ({ids}) AND t.encoder_id IN ({encoders})")
        changed = ("(t.image_sha256 <> s.image_sha256) OR (t.mask_sha256 IS DISTINCT FROM s.mask_sha256) "
                   "OR (t.source_uri <> s.source_uri)")
        merger = table.merge(source, predicate, source_alias="s", target_alias="t", merge_schema=True,
                             streamed_exec=False, writer_properties=self._writer_properties(),
                             commit_properties=CommitProperties(max_commit_retries=0))
        return merger.when_matched_update_all(predicate=changed).when_not_matched_insert_all().execute()

    def _create(self) -> DeltaTable:
        configuration = {VERSION_PROPERTY: str(SCHEMA_VERSION), "delta.dataSkippingStatsColumns": STATS_COLUMNS}
        try:
            # no commit retries: a create that lost the race for version 0 would otherwise commit its table
            # metadata again as the next version, over whatever the winner committed since
            DeltaTable.create(self.table_uri, CORE_SCHEMA, mode="ignore", name="elite-embeddings",
                              description=f"ELITE concept embeddings, schema_version {SCHEMA_VERSION}",
                              configuration=configuration, storage_options=self.storage_options or None,
                              raise_if_key_not_exists=False,
                              commit_properties=CommitProperties(max_commit_retries=0))
        except (DeltaError, OSError) as err:
            if self.table() is None:  # another writer creating it at the same moment is fine
                raise self._error("creating", err) from err
        table = self.table()
        if table is None:
            raise StorageError(f"{self.uri()}: the embedding table was created but cannot be opened")
        return table

    def _write_schema(self, records: Sequence[EmbeddingRecord], stored: pa.Schema) -> pa.Schema:
        """The core columns, every metadata column the table has (a replaced row gets null where its new record
        has no value: the row is replaced whole), then the records' new metadata columns, typed as the table
        already types them."""
        keys = [name for name in stored.names if name not in CORE_SCHEMA.names]
        keys += sorted({key for record in records for key in record.metadata} - set(keys))
        fields = []
        for key in keys:
            index = stored.get_field_index(key)
            type_ = None if index < 0 else stored.field(index).type
            values = [record.metadata.get(key) for record in records]
            try:
                array = pa.array(values, type=type_)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
                where = f"the stored type {type_}" if type_ is not None else "one column type"
                raise InputError(f"metadata {key!r}: values do not fit {where}: {err}") from err
            fields.append(pa.field(key, pa.string() if pa.types.is_null(array.type) else array.type))
        return pa.schema([*CORE_SCHEMA, *fields])

    def _writer_properties(self) -> WriterProperties:
        # tensors: no dictionary, no statistics (a 384 KiB min/max per page helps no query); small row groups, so
        # reading a few concepts fetches a few row groups (DEFAULT_ROW_GROUP_ROWS, from benchmarks/bench_store.py)
        tensor = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
        return WriterProperties(max_row_group_size=self.row_group_rows, compression="ZSTD", compression_level=1,
                                column_properties={name: tensor for name in TENSOR_COLUMNS})

    # ---- maintenance -------------------------------------------------------------------------

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The table's commits, newest first: version, timestamp (ms), operation and its metrics."""
        table = self.table()
        return [] if table is None else self._call("reading the history of", lambda: table.history(limit))

    def optimize(self, *, z_order: bool = False, target_size: int | None = None) -> dict[str, Any]:
        """Rewrite small data files into few large ones (ordered by concept_id with `z_order`), in one commit;
        readers of older versions are unaffected until `vacuum`. Returns deltalake's metrics."""
        self._check_writable()

        def run() -> dict[str, Any]:
            table = self.table()
            if table is None:
                return {"numFilesAdded": 0, "numFilesRemoved": 0}
            options: dict[str, Any] = {"target_size": target_size, "writer_properties": self._writer_properties(),
                                       "commit_properties": CommitProperties(max_commit_retries=0)}
            if z_order:
                return table.optimize.z_order(["concept_id"], **options)
            return table.optimize.compact(**options)

        return self._retrying("compacting", run)

    def small_files(self, below: int = SMALL_FILE_BYTES) -> int:
        """How many data files of the current version are smaller than `below` bytes (one per encode batch)."""
        return sum(1 for _, size in self._files() if size < below)

    def compact_small_files(self, min_files: int = COMPACT_MIN_FILES) -> dict[str, Any] | None:
        """`optimize()` when at least `min_files` small files have piled up (the encode job's compaction step);
        returns its metrics, or None when there was nothing worth compacting."""
        if min_files < 1:
            raise InputError(f"min_files must be >= 1, got {min_files}")
        return self.optimize() if self.small_files() >= min_files else None

    def vacuum(self, retention_hours: float | None = None, *, dry_run: bool = False) -> list[str]:
        """Delete data files that no version younger than `retention_hours` (default: the table's, 7 days) uses,
        and files the log never referenced (a killed writer's). Returns the files (to be) deleted. Versions older
        than the retention can no longer be read afterwards."""
        self._check_writable()  # to an old version, the newer versions' files look unreferenced
        if retention_hours is not None and retention_hours < 0:
            raise InputError(f"retention_hours must be >= 0, got {retention_hours}")
        hours = None if retention_hours is None else math.ceil(retention_hours)  # never keep less than asked

        def run() -> list[str]:
            table = self.table()
            # full: also the files no commit ever referenced (deltalake's default looks only at removed files)
            return [] if table is None else table.vacuum(hours, dry_run=dry_run, enforce_retention_duration=False,
                                                         full=True)

        return self._retrying("vacuuming", run)

    # ---- errors ----------------------------------------------------------------------------

    def _retrying(self, doing: str, run: Callable[[], T]) -> T:
        """`run()`, redone on a commit conflict with jittered exponential backoff, up to `commit_retries` times;
        `run` gets the table through `table()`, which reads the commits it conflicted with first."""
        for attempt in range(self.commit_retries + 1):
            try:
                return run()
            except CommitFailedError as err:
                if attempt == self.commit_retries:
                    raise TransientStorageError(f"{self.uri()}: {doing} the embedding table failed after "
                                                f"{attempt + 1} conflicting commits: {err}") from err
                time.sleep(min(2.0, 0.02 * 2 ** attempt) * random.uniform(0.5, 1.5))
            except (DeltaError, OSError, pa.ArrowException) as err:
                raise self._error(doing, err) from err
        raise AssertionError("unreachable")

    def _call(self, doing: str, run: Callable[[], T]) -> T:
        try:
            return run()
        except (DeltaError, OSError) as err:
            raise self._error(doing, err) from err

    def _error(self, doing: str, err: Exception) -> StorageError:
        text = _ANSI.sub("", str(err)).strip()  # delta-rs colours parts of its messages for a terminal
        kind = TransientStorageError if any(word in text.lower() for word in _TRANSIENT) else StorageError
        return kind(f"{self.uri()}: {doing} the embedding table failed: {text}")
