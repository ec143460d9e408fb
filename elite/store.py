"""The Parquet embedding store: append-only part files of encoded concepts, one row per concept.

Layout and the reasons for it: docs/embedding-store.md. In short:

- A store is a folder (or an S3 prefix, through `elite.storage`) of immutable `part-<utc time>-<uuid>.parquet` files.
  Each `append` writes one new part under a dot-prefixed temporary name, fsyncs it and renames it,
  so a writer killed mid-write leaves only an invisible `.part-*.tmp` file, never a partial part.
- Rows are deduplicated on (image sha256, mask sha256, encoder id) against the stored parts.
- The local tokens, (patches, text_dim) float16, are one binary value per row: the benchmark
  (benchmarks/bench_store.py) measured that layout 2.3-2.6x faster to write and read than a list
  column with zstd (4-6x without compression), and it keeps float16, which DuckDB 1.x cannot decode,
  out of the Parquet types.
- Readers find rows from a small index of key columns, then read only the row groups that hold them.

File access goes through `PartStorage`: `LocalFolder` here, `elite.storage.ObjectStorePartStorage` for S3.
"""

from __future__ import annotations

import datetime
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elite.errors import InputError, StorageError
from elite.fileio import atomic_path, sha256_bytes, sha256_file

if TYPE_CHECKING:
    from elite.concepts import ConceptEmbedding

__all__ = [
    "SCHEMA_VERSION",
    "AppendResult",
    "EmbeddingRecord",
    "EmbeddingStore",
    "LocalFolder",
    "PartStorage",
    "StoreKey",
    "StoredArrays",
    "sha256_bytes",
    "sha256_file",
]

SCHEMA_VERSION = 1  # bump on any change to the core columns below; readers refuse other versions
SCHEMA_VERSION_KEY = b"elite.schema_version"  # in each part's footer, checked before any data is read
# The unit a selective read fetches (16 x 384 KiB of real-size local tokens, ~3 MB after zstd): a read of a few
# ids costs about this many rows each, a store open costs per group. Chosen from benchmarks/bench_store.py.
DEFAULT_ROW_GROUP_ROWS = 16
COMPRESSION = "zstd"  # zero (background) patches shrink to nothing; see docs/embedding-store.md

MetadataValue = str | int | float | bool | None

# The core columns, in file order. Everything else in a part is a user metadata column.
CORE_SCHEMA = pa.schema([
    pa.field("concept_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("mask_sha256", pa.string()),  # null: no mask file (whole image, or its alpha channel)
    pa.field("encoder_id", pa.string(), nullable=False),
    pa.field("words", pa.list_(pa.list_(pa.float32())), nullable=False),  # (5, text_dim)
    pa.field("local_tokens", pa.binary(), nullable=False),  # (grid * grid, text_dim) float16, little-endian
    pa.field("mask_grid", pa.list_(pa.list_(pa.uint8())), nullable=False),  # (grid, grid), 1 = object patch
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("schema_version", pa.int32(), nullable=False),
])
CORE_COLUMNS = frozenset(CORE_SCHEMA.names)
TENSOR_COLUMNS = ("words", "local_tokens", "mask_grid")
INDEX_COLUMNS = ["concept_id", "image_sha256", "mask_sha256", "encoder_id", "created_at"]
_SHA256 = re.compile(r"[0-9a-f]{64}")

StoreKey = tuple[str, str | None, str]  # (image sha256, mask sha256 or None, encoder id): the dedupe key




@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class EmbeddingRecord:
    """One concept as the store holds it. Arrays are normalised on construction: words to float32,
    local tokens to float16 (what is stored, so a read gives back exactly these bits), the mask to uint8."""

    concept_id: str
    source_uri: str
    image_sha256: str
    mask_sha256: str | None
    encoder_id: str
    words: np.ndarray  # (5, text_dim) float32
    local_tokens: np.ndarray  # (grid * grid, text_dim) float16
    mask_grid: np.ndarray  # (grid, grid) uint8, 1 = object patch
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)  # user columns, passed through

    def __post_init__(self) -> None:
        who = f"concept {self.concept_id!r}"
        for name in ("concept_id", "source_uri", "encoder_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"{who}: {name} must be a non-empty string")
        for name in ("image_sha256", "mask_sha256"):
            value = getattr(self, name)
            if not (value is None and name == "mask_sha256") and not (
                    isinstance(value, str) and _SHA256.fullmatch(value)):
                raise InputError(f"{who}: {name} must be 64 lowercase hex digits, got {value!r}")
        words = np.ascontiguousarray(self.words, dtype=np.float32)
        mask_grid = np.asarray(self.mask_grid)
        with np.errstate(over="ignore"):  # overflow shows up as inf, refused below with a clear message
            local_tokens = np.ascontiguousarray(self.local_tokens, dtype="<f2")
        _check_shapes(who, words, local_tokens, mask_grid)
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "local_tokens", local_tokens)
        object.__setattr__(self, "mask_grid", np.ascontiguousarray(mask_grid, dtype=np.uint8))
        object.__setattr__(self, "metadata", _checked_metadata(who, self.metadata))

    @property
    def key(self) -> StoreKey:
        return (self.image_sha256, self.mask_sha256, self.encoder_id)

    @classmethod
    def from_embedding(cls, embedding: ConceptEmbedding, *, source_uri: str, image_sha256: str,
                       mask_sha256: str | None, encoder_id: str,
                       metadata: Mapping[str, MetadataValue] | None = None) -> EmbeddingRecord:
        def to_numpy(tensor: Any) -> np.ndarray:
            return tensor.detach().to("cpu").float().numpy()  # float() first: numpy has no bfloat16

        return cls(embedding.concept_id, source_uri, image_sha256, mask_sha256, encoder_id,
                   to_numpy(embedding.words), to_numpy(embedding.local_tokens),
                   to_numpy(embedding.mask_grid), dict(metadata or {}))


def _check_shapes(who: str, words: np.ndarray, local_tokens: np.ndarray, mask_grid: np.ndarray) -> None:
    if words.ndim != 2 or words.shape[0] == 0 or words.shape[1] == 0:
        raise InputError(f"{who}: words must be (words, text_dim), got shape {words.shape}")
    if mask_grid.ndim != 2 or mask_grid.shape[0] != mask_grid.shape[1] or mask_grid.size == 0:
        raise InputError(f"{who}: mask_grid must be a square (grid, grid), got shape {mask_grid.shape}")
    if not np.isin(mask_grid, (0, 1)).all():
        raise InputError(f"{who}: mask_grid must hold only 0 and 1")
    expected = (mask_grid.size, words.shape[1])  # one local token per mask cell, in the words' width
    if local_tokens.shape != expected:
        raise InputError(f"{who}: local_tokens must be {expected} for a {mask_grid.shape} mask and "
                         f"text_dim {words.shape[1]}, got {local_tokens.shape}")
    if not (np.isfinite(words).all() and np.isfinite(local_tokens).all()):
        raise InputError(f"{who}: words or local tokens are not finite (NaN, or beyond float16's range)")


def _checked_metadata(who: str, metadata: Mapping[str, MetadataValue]) -> dict[str, MetadataValue]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"{who}: metadata keys must be non-empty strings, got {key!r}")
        if key in CORE_COLUMNS:
            raise InputError(f"{who}: metadata key {key!r} collides with a core column of the store")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise InputError(f"{who}: metadata {key!r} is a {type(value).__name__}; "
                             "only str, int, float, bool and None are stored")
    return dict(metadata)


@dataclass(frozen=True)
class AppendResult:
    written: int
    skipped: int  # already stored, or repeated within the same call
    part: str | None  # name of the new part file; None when nothing was new


@dataclass(frozen=True, eq=False)
class StoredArrays:
    """Rows read from the store, in the order asked for (sorted by concept id when all are read)."""

    concept_ids: list[str]
    words: np.ndarray  # (N, 5, text_dim) float32
    local_tokens: np.ndarray  # (N, grid * grid, text_dim) float16
    mask_grid: np.ndarray  # (N, grid, grid) uint8
    source_uris: list[str]
    image_sha256: list[str]
    mask_sha256: list[str | None]
    encoder_ids: list[str]
    created_at: np.ndarray  # (N,) datetime64[us], UTC
    metadata: dict[str, list[MetadataValue]]  # user columns; None where a row's part lacks the column

    def __len__(self) -> int:
        return len(self.concept_ids)


class PartStorage(Protocol):
    """Where part files live. A part must become visible whole or not at all, and never changes after."""

    def list_parts(self) -> list[str]:
        """Names of the visible parts, sorted; temporary and hidden files excluded."""
        ...

    def open_part(self, name: str) -> Any:
        """A pyarrow random-access file (`pyarrow.NativeFile`) over the part."""
        ...

    def write_part(self, name: str, write: Callable[[Any], None]) -> None:
        """Call `write(sink)` with a pyarrow output stream, then publish the part atomically."""
        ...

    def uri(self, name: str = "") -> str:
        """Where `name` lives, for messages."""
        ...


def is_part_name(name: str) -> bool:
    # dot and underscore prefixes are hidden by convention (and skipped by pyarrow.dataset as well)
    return name.endswith(".parquet") and not name.startswith((".", "_"))


class LocalFolder:
    """Parts in a local folder, published by rename (see `elite.fileio.atomic_path`).

    On S3, `elite.storage.ObjectStorePartStorage` puts whole parts: an upload only becomes visible when
    it completes, which gives the same atomicity as the rename.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def list_parts(self) -> list[str]:
        if not self.root.exists():
            return []  # an empty store: the folder is made by the first append
        try:
            return sorted(entry.name for entry in os.scandir(self.root)
                          if is_part_name(entry.name) and entry.is_file())
        except OSError as err:
            raise StorageError(f"{self.root}: cannot list the embedding store: {err}") from err

    def open_part(self, name: str) -> Any:
        return pa.memory_map(str(self.root / name))  # parts never change, so mapping them is safe

    def write_part(self, name: str, write: Callable[[Any], None]) -> None:
        # the sink closes before atomic_path fsyncs and renames: inner `with` items exit first
        with atomic_path(self.root / name) as tmp, pa.OSFile(str(tmp), "wb") as sink:
            write(sink)
        try:  # make the rename itself durable, not only the file's bytes
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise StorageError(f"{self.root}: fsync of the folder failed: {err}") from err

    def uri(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)


@dataclass(frozen=True, eq=False)
class _Part:
    """What the store keeps of a part it has seen. Parts are immutable, so this is cached by name."""

    name: str
    footer: Any  # pyarrow.parquet.FileMetaData, parsed once
    row_group_starts: np.ndarray  # (row_groups + 1,) first row of each row group, then the row count
    keys: pa.Table  # INDEX_COLUMNS of every row, in file order
    metadata_types: dict[str, Any]  # user column name -> pyarrow type


class EmbeddingStore:
    """Append and read concept embeddings. One instance per thread; any number of processes may share a store."""

    def __init__(self, root: str | os.PathLike[str] | PartStorage, *,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> None:
        self.storage: PartStorage = LocalFolder(root) if isinstance(root, str | os.PathLike) else root
        if row_group_rows < 1:
            raise InputError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.row_group_rows = row_group_rows
        self._parts: dict[str, _Part] = {}
        self._keys: set[StoreKey] = set()
        self._index_cache: tuple[tuple[str, ...], pa.Table] | None = None  # (part names, their joined key columns)

    # ---- writing ---------------------------------------------------------------------------

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
            with pq.ParquetWriter(sink, schema, **_WRITE_OPTIONS, use_dictionary=_plain_columns(schema),
                                  write_statistics=_plain_columns(schema)) as writer:
                for start in range(0, len(kept), self.row_group_rows):  # one row group in memory at a time
                    writer.write_batch(_record_batch(kept[start:start + self.row_group_rows], schema, now),
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
        return pa.schema([*CORE_SCHEMA, *fields], metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})

    # ---- reading ---------------------------------------------------------------------------

    def part_names(self) -> list[str]:
        return [part.name for part in self._refresh()]

    def has(self, image_sha256: str, mask_sha256: str | None, encoder_id: str) -> bool:
        self._refresh()
        return (image_sha256, mask_sha256, encoder_id) in self._keys

    def stored_keys(self) -> frozenset[StoreKey]:
        """Every stored (image sha256, mask sha256, encoder id): one listing for a whole batch of `has` checks."""
        self._refresh()
        return frozenset(self._keys)

    def concept_ids(self, encoder_id: str | None = None) -> list[str]:
        index = self._index(encoder_id)
        return sorted(set(index.column("concept_id").to_pylist()))

    def read_arrays(self, concept_ids: Sequence[str] | None = None,
                    encoder_id: str | None = None) -> StoredArrays:
        """The rows of `concept_ids` (all concepts when None), reading only the row groups that hold them.

        A concept stored more than once under one encoder (re-encoded from a changed image) reads as its
        newest row. A concept stored under several encoders needs `encoder_id`: mixing encoders is an error.
        """
        if isinstance(concept_ids, str):
            raise InputError("concept_ids must be a sequence of ids, not one string")
        asked = None if concept_ids is None else list(concept_ids)
        parts = self._refresh()
        index = self._index(encoder_id, parts)
        if asked is not None:
            wanted = pa.array(asked, pa.string())
            index = index.filter(pc.is_in(index.column("concept_id"), value_set=wanted))
        newest = _newest_rows(index, encoder_id is None)
        row_of = dict(zip(newest.column("concept_id").to_pylist(), range(newest.num_rows), strict=True))
        ids = sorted(row_of) if asked is None else asked
        missing = [cid for cid in ids if cid not in row_of]
        if missing:
            under = f" under encoder {encoder_id!r}" if encoder_id is not None else ""
            raise InputError(f"concept id {missing[0]!r} is not in the embedding store at {self.storage.uri()}"
                             f"{under}" + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        take = np.array([row_of[cid] for cid in ids], dtype=np.int64)
        return self._read_rows(parts, newest.column("_part").to_numpy()[take], newest.column("_row").to_numpy()[take])

    def read_info(self, concept_ids: Sequence[str] | None = None, encoder_id: str | None = None) -> pa.Table:
        """`read_arrays`' rows without the tensors: concept_id, source_uri, hashes, encoder_id, created_at and the
        metadata columns (null where a row's part lacks one), in the same order. Cheap enough to plan a catalog."""
        if isinstance(concept_ids, str):
            raise InputError("concept_ids must be a sequence of ids, not one string")
        parts = self._refresh()
        index = self._index(encoder_id, parts)
        if concept_ids is not None:
            index = index.filter(pc.is_in(index.column("concept_id"), value_set=pa.array(list(concept_ids),
                                                                                          pa.string())))
        newest = _newest_rows(index, encoder_id is None)
        found = set(newest.column("concept_id").to_pylist())
        missing = [] if concept_ids is None else [cid for cid in concept_ids if cid not in found]
        if missing:
            raise InputError(f"concept id {missing[0]!r} is not in the embedding store at {self.storage.uri()}"
                             + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        pieces = []
        part_nos = newest.column("_part").to_numpy()
        rows = newest.column("_row").to_numpy()
        for part_no in np.unique(part_nos):
            part = parts[part_no]
            columns = [name for name in part.footer.schema.to_arrow_schema().names if name not in TENSOR_COLUMNS]
            with self._guard(part.name), self.storage.open_part(part.name) as source:
                table = pq.ParquetFile(source, metadata=part.footer).read(columns=columns, use_threads=False)
            pieces.append(table.take(pa.array(rows[part_nos == part_no])))
        if not pieces:
            return pa.schema([f for f in CORE_SCHEMA if f.name not in TENSOR_COLUMNS]).empty_table()
        table = pa.concat_tables(pieces, promote_options="default")
        order = pc.sort_indices(table, [("concept_id", "ascending")]) if concept_ids is None else pa.array(
            [position for position in _positions(table.column("concept_id").to_pylist(), list(concept_ids))])
        return table.take(order)

    def read_embeddings(self, concept_ids: Sequence[str] | None = None,
                        encoder_id: str | None = None) -> list[ConceptEmbedding]:
        """`read_arrays` as `ConceptEmbedding`s for generation: local tokens and mask back to float32."""
        import torch  # here, not at the top: the store itself (and DuckDB-side tools) need no torch

        from elite.concepts import ConceptEmbedding

        arrays = self.read_arrays(concept_ids, encoder_id)
        return [ConceptEmbedding(cid, torch.from_numpy(arrays.words[i]),
                                 torch.from_numpy(arrays.local_tokens[i].astype(np.float32)),
                                 torch.from_numpy(arrays.mask_grid[i].astype(np.float32)))
                for i, cid in enumerate(arrays.concept_ids)]

    # ---- internals -------------------------------------------------------------------------

    @contextmanager
    def _guard(self, name: str, doing: str = "read") -> Iterator[None]:
        """Turn pyarrow's and the OS's errors into a StorageError naming the part."""
        try:
            yield
        except (pa.ArrowException, OSError) as err:
            if doing == "write":
                raise StorageError(f"{self.storage.uri(name)}: writing the embedding store part failed: "
                                   f"{err}") from err
            raise StorageError(f"{self.storage.uri(name)}: unreadable embedding store part: {err}") from err

    def _refresh(self) -> list[_Part]:
        """The current parts, loading only those not seen before (parts never change once visible)."""
        names = self.storage.list_parts()
        gone = self._parts.keys() - set(names)
        for name in gone:
            del self._parts[name]
        if gone:  # a part was removed (e.g. compacted away): rebuild the dedupe keys
            self._keys = {key for part in self._parts.values() for key in _keys_of(part.keys)}
        for name in names:
            if name not in self._parts:
                part = self._load_part(name)
                self._parts[name] = part
                self._keys.update(_keys_of(part.keys))
        return [self._parts[name] for name in names]

    def _load_part(self, name: str) -> _Part:
        uri = self.storage.uri(name)
        with self._guard(name), self.storage.open_part(name) as source:
            parquet = pq.ParquetFile(source)
            schema = parquet.schema_arrow
            _check_schema(schema, uri)
            keys = parquet.read(columns=INDEX_COLUMNS, use_threads=False)
            footer = parquet.metadata
        sizes = [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        metadata_types = {f.name: f.type for f in schema if f.name not in CORE_COLUMNS}
        return _Part(name, footer, starts, keys, metadata_types)

    def _index(self, encoder_id: str | None, parts: list[_Part] | None = None) -> pa.Table:
        """The key columns of every stored row, with `_part` (position in `parts`) and `_row` (row in its part)."""
        parts = self._refresh() if parts is None else parts
        names = tuple(part.name for part in parts)
        if self._index_cache is None or self._index_cache[0] != names:  # rebuilt only when the parts changed
            tables = [part.keys.append_column("_part", pa.array(np.full(part.keys.num_rows, n, np.int64)))
                      .append_column("_row", pa.array(np.arange(part.keys.num_rows, dtype=np.int64)))
                      for n, part in enumerate(parts)]
            if not tables:
                empty = pa.schema([CORE_SCHEMA.field(c) for c in INDEX_COLUMNS])
                tables = [empty.empty_table().append_column("_part", pa.array([], pa.int64()))
                          .append_column("_row", pa.array([], pa.int64()))]
            self._index_cache = (names, pa.concat_tables(tables).combine_chunks())
        index = self._index_cache[1]
        if encoder_id is not None:
            index = index.filter(pc.equal(index.column("encoder_id"), encoder_id))
        return index

    def _read_rows(self, parts: list[_Part], part_nos: np.ndarray, rows: np.ndarray) -> StoredArrays:
        """Read the given (part, row) pairs, one needed row group at a time, into output position order."""
        out = _ArraysBuilder(len(rows))
        for part_no in np.unique(part_nos):
            part = parts[part_no]
            positions = np.flatnonzero(part_nos == part_no)  # output positions served by this part
            groups = np.searchsorted(part.row_group_starts, rows[positions], side="right") - 1
            with self._guard(part.name), self.storage.open_part(part.name) as source:
                parquet = pq.ParquetFile(source, metadata=part.footer)
                for group in np.unique(groups):
                    in_group = positions[groups == group]
                    table = parquet.read_row_group(int(group), use_threads=False)
                    wanted = rows[in_group] - part.row_group_starts[group]  # rows within the group
                    if not np.array_equal(wanted, np.arange(table.num_rows)):  # whole group in order: no copy
                        table = table.take(wanted)
                    out.put(in_group, table, self.storage.uri(part.name))
        return out.build()


_WRITE_OPTIONS: dict[str, Any] = {
    "compression": COMPRESSION,
    # plain float encodings only: DuckDB failed on BYTE_STREAM_SPLIT float16 in the field (there is no float16
    # column here, and the float32 words stay PLAIN too, so any DuckDB >= 1.0 reads every column)
    "use_byte_stream_split": False,
    "store_schema": True,  # the Arrow schema in the footer: exact types (uint8, tz-aware timestamps) on read
}


def _plain_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding and min/max statistics: all but the tensors (whose statistics
    would copy whole values into the footer and help no query)."""
    return [name for name in schema.names if name not in TENSOR_COLUMNS]


def _nested_list(arrays: Sequence[np.ndarray], value_type: Any) -> pa.Array:
    """A list<list<value>> array from 2-D numpy arrays, one row each, without a per-value Python loop."""
    rows = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    inner_lengths = np.repeat([a.shape[1] for a in arrays], rows).astype(np.int32)
    values = pa.array(np.concatenate([a.reshape(-1) for a in arrays]), value_type)
    inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(inner_lengths)]), pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(rows)]), pa.int32()), inner)


def _record_batch(records: Sequence[EmbeddingRecord], schema: pa.Schema,
                  created_at: datetime.datetime) -> pa.RecordBatch:
    """One row group's worth of records as a batch of `schema`."""
    tokens = [r.local_tokens.reshape(-1).view(np.uint8) for r in records]  # (grid * grid * text_dim * 2,) bytes
    offsets = np.concatenate([[0], np.cumsum([t.size for t in tokens], dtype=np.int64)])
    if offsets[-1] >= 2**31:  # binary offsets are int32
        raise InputError(f"{len(records)} concepts hold over 2 GiB of local tokens, too much for one row group; "
                         "lower row_group_rows")
    local_tokens = pa.Array.from_buffers(pa.binary(), len(records), [
        None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.concatenate(tokens))])
    columns: dict[str, pa.Array] = {
        "concept_id": pa.array([r.concept_id for r in records], pa.string()),
        "source_uri": pa.array([r.source_uri for r in records], pa.string()),
        "image_sha256": pa.array([r.image_sha256 for r in records], pa.string()),
        "mask_sha256": pa.array([r.mask_sha256 for r in records], pa.string()),
        "encoder_id": pa.array([r.encoder_id for r in records], pa.string()),
        "words": _nested_list([r.words for r in records], pa.float32()),
        "local_tokens": local_tokens,
        "mask_grid": _nested_list([r.mask_grid for r in records], pa.uint8()),
        "created_at": pa.array([created_at] * len(records), pa.timestamp("us", tz="UTC")),
        "schema_version": pa.array([SCHEMA_VERSION] * len(records), pa.int32()),
    }
    for f in schema:
        if f.name not in CORE_COLUMNS:
            columns[f.name] = pa.array([r.metadata.get(f.name) for r in records], f.type)
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def _check_schema(schema: pa.Schema, uri: str) -> None:
    """Refuse a part of another schema version, or one whose core columns are not what this version writes."""
    version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version is None:
        raise StorageError(f"{uri}: not an ELITE embedding store part (no {SCHEMA_VERSION_KEY.decode()} "
                           "in its footer)")
    if version.decode() != str(SCHEMA_VERSION):
        raise StorageError(f"{uri}: embedding store schema_version {version.decode()}, but this release "
                           f"reads schema_version {SCHEMA_VERSION}; read it with a matching release or "
                           "rewrite the store")
    for expected in CORE_SCHEMA:
        index = schema.get_field_index(expected.name)
        if index < 0 or not schema.field(index).type.equals(expected.type):
            found = "missing" if index < 0 else f"of type {schema.field(index).type}"
            raise StorageError(f"{uri}: core column {expected.name!r} is {found}, "
                               f"schema_version {SCHEMA_VERSION} has {expected.type}")


def _positions(have: list[str], wanted: list[str]) -> list[int]:
    """Positions in `have` of each of `wanted` (all present), in `wanted`'s order."""
    where = {cid: n for n, cid in enumerate(have)}
    return [where[cid] for cid in wanted]


def _keys_of(keys: pa.Table) -> Iterator[StoreKey]:
    return zip(keys.column("image_sha256").to_pylist(), keys.column("mask_sha256").to_pylist(),
               keys.column("encoder_id").to_pylist(), strict=True)


def _newest_rows(index: pa.Table, check_encoders: bool) -> pa.Table:
    """One row per concept id: its newest (then latest-written) row; several encoders for one id is an error."""
    if check_encoders and index.num_rows:
        counts = index.group_by("concept_id").aggregate([("encoder_id", "count_distinct")])
        mixed = counts.filter(pc.greater(counts.column("encoder_id_count_distinct"), 1))
        if mixed.num_rows:
            cid = mixed.column("concept_id")[0].as_py()
            encoders = sorted(set(index.filter(pc.equal(index.column("concept_id"), cid))
                                  .column("encoder_id").to_pylist()))
            raise InputError(f"concept id {cid!r} is stored under {len(encoders)} encoders ({', '.join(encoders)}); "
                             "pass encoder_id to choose one")
    ordered = index.sort_by([("concept_id", "ascending"), ("created_at", "ascending"),
                             ("_part", "ascending"), ("_row", "ascending")])
    ids = np.asarray(ordered.column("concept_id").to_pylist(), dtype=object)
    last = np.append(ids[1:] != ids[:-1], True) if len(ids) else np.zeros(0, bool)  # last row of each id
    return ordered.filter(pa.array(last))


class _ArraysBuilder:
    """Collects row-group pieces into output arrays allocated once the first piece gives the shapes."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.arrays: dict[str, np.ndarray] = {}
        self.lists: dict[str, list[Any]] = {name: [None] * rows for name in
                                            ("concept_id", "source_uri", "image_sha256", "mask_sha256", "encoder_id")}
        self.created_at = np.zeros(rows, "datetime64[us]")
        self.metadata: dict[str, list[MetadataValue]] = {}

    def put(self, positions: np.ndarray, table: pa.Table, uri: str) -> None:
        words = _lists_to_numpy(table.column("words"), np.float32, uri)  # (n, 5, text_dim)
        mask_grid = _lists_to_numpy(table.column("mask_grid"), np.uint8, uri)  # (n, grid, grid)
        patches, text_dim = mask_grid.shape[1] * mask_grid.shape[2], words.shape[2]
        tokens = _binary_to_numpy(table.column("local_tokens"), (patches, text_dim), uri)  # (n, patches, text_dim)
        for name, piece in (("words", words), ("local_tokens", tokens), ("mask_grid", mask_grid)):
            if name not in self.arrays:
                self.arrays[name] = np.empty((self.rows, *piece.shape[1:]), piece.dtype)
            elif self.arrays[name].shape[1:] != piece.shape[1:]:
                raise InputError(f"the concepts asked for have {name} of different shapes "
                                 f"({self.arrays[name].shape[1:]} and {piece.shape[1:]}, in {uri}); "
                                 "read one encoder_id at a time")
            self.arrays[name][positions] = piece
        for name, values in self.lists.items():
            for position, value in zip(positions, table.column(name).to_pylist(), strict=True):
                values[position] = value
        self.created_at[positions] = table.column("created_at").to_numpy().astype("datetime64[us]")
        for name in table.column_names:
            if name not in CORE_COLUMNS:
                column = self.metadata.setdefault(name, [None] * self.rows)
                for position, value in zip(positions, table.column(name).to_pylist(), strict=True):
                    column[position] = value

    def build(self) -> StoredArrays:
        empty: dict[str, np.ndarray] = {"words": np.zeros((0, 0, 0), np.float32),
                                        "local_tokens": np.zeros((0, 0, 0), np.float16),
                                        "mask_grid": np.zeros((0, 0, 0), np.uint8)}
        arrays = {name: self.arrays.get(name, empty[name]) for name in empty}
        return StoredArrays(self.lists["concept_id"], arrays["words"], arrays["local_tokens"], arrays["mask_grid"],
                            self.lists["source_uri"], self.lists["image_sha256"], self.lists["mask_sha256"],
                            self.lists["encoder_id"], self.created_at, self.metadata)


def _lists_to_numpy(column: pa.ChunkedArray, dtype: Any, uri: str) -> np.ndarray:
    """(rows, a, b) from a list<list<x>> column whose rows all hold a x b values."""
    outer = column.combine_chunks()
    inner = outer.flatten()
    outer_lengths = pc.list_value_length(outer).to_numpy(zero_copy_only=False)
    inner_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    if outer.null_count or inner.null_count:
        raise StorageError(f"{uri}: null values in {column.type} column")
    if len(outer) == 0:
        return np.zeros((0, 0, 0), dtype)
    if (outer_lengths != outer_lengths[0]).any() or (inner_lengths != inner_lengths[0]).any():
        raise InputError(f"the concepts asked for have arrays of different shapes (in {uri}); "
                         "read one encoder_id at a time")
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values.reshape(len(outer), int(outer_lengths[0]), int(inner_lengths[0]))


def _binary_to_numpy(column: pa.ChunkedArray, shape: tuple[int, int], uri: str) -> np.ndarray:
    """(rows, *shape) float16 from a binary column of one little-endian array per row, without copying per row."""
    array = column.combine_chunks()
    if array.null_count:
        raise StorageError(f"{uri}: null local_tokens")
    if len(array) == 0:
        return np.zeros((0, *shape), np.float16)
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
    expected = shape[0] * shape[1] * 2
    sizes = np.diff(offsets)
    if (sizes != expected).any():
        raise StorageError(f"{uri}: local_tokens of {int(sizes[sizes != expected][0])} bytes, "
                           f"expected {expected} for {shape} float16")
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    return data.view("<f2").reshape(len(array), *shape)
