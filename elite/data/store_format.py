"""The embedding store's row format: schema, records, and the conversions between numpy arrays and Arrow.

Kept apart from `elite.data.store` (which manages parts and reads) so the format can be read on its own:
docs/embedding-store.md describes it column by column.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elite.errors import InputError, StorageError
from elite.model.concepts import ConceptEmbedding

# Two formats share these records and readers. schema_version 2 is the Delta Lake table (elite.data.store):
# mask_grid is binary there, as Delta has no unsigned bytes. schema_version 1 is the earlier folder of Parquet
# parts (elite.data.parts_store), read until it is migrated. Bump on any change to the core columns below.
SCHEMA_VERSION = 2
PARTS_SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"elite.schema_version"  # in each v1 part's footer; a table property of the v2 table
# The unit a selective read fetches (16 x 384 KiB of real-size local tokens, ~3 MB after zstd): a read of a few
# ids costs about this many rows each, a store open costs per group. Chosen from benchmarks/bench_store.py.
DEFAULT_ROW_GROUP_ROWS = 16
COMPRESSION = "zstd"  # zero (background) patches shrink to nothing; see docs/embedding-store.md

MetadataValue = str | int | float | bool | None

# The core columns, in file order. Everything else in a part is a user metadata column.
PARTS_CORE_SCHEMA = pa.schema([
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
# schema_version 2: the same columns, mask_grid as (grid * grid) bytes, row-major
CORE_SCHEMA = pa.schema([field if field.name != "mask_grid" else pa.field("mask_grid", pa.binary(), nullable=False)
                         for field in PARTS_CORE_SCHEMA])
CORE_COLUMNS = frozenset(CORE_SCHEMA.names)
TENSOR_COLUMNS = ("words", "local_tokens", "mask_grid")
# read once per part and kept: enough to plan an encode run (identity, changed bytes, source) without more reads
INDEX_COLUMNS = ["concept_id", "source_uri", "image_sha256", "mask_sha256", "encoder_id", "created_at"]
_SHA256 = re.compile(r"[0-9a-f]{64}")

StoreKey = tuple[str, str, str | None, str]  # (concept id, image sha256, mask sha256 or None, encoder id): dedupe key




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
        return (self.concept_id, self.image_sha256, self.mask_sha256, self.encoder_id)

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


WRITE_OPTIONS: dict[str, Any] = {
    "compression": COMPRESSION,
    # plain float encodings only: DuckDB failed on BYTE_STREAM_SPLIT float16 in the field (there is no float16
    # column here, and the float32 words stay PLAIN too, so any DuckDB >= 1.0 reads every column)
    "use_byte_stream_split": False,
    "store_schema": True,  # the Arrow schema in the footer: exact types (uint8, tz-aware timestamps) on read
}


def plain_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding and min/max statistics: all but the tensors (whose statistics
    would copy whole values into the footer and help no query)."""
    return [name for name in schema.names if name not in TENSOR_COLUMNS]


def nested_list(arrays: Sequence[np.ndarray], value_type: Any) -> pa.Array:
    """A list<list<value>> array from 2-D numpy arrays, one row each, without a per-value Python loop."""
    rows = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    inner_lengths = np.repeat([a.shape[1] for a in arrays], rows).astype(np.int32)
    values = pa.array(np.concatenate([a.reshape(-1) for a in arrays]), value_type)
    inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(inner_lengths)]), pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(rows)]), pa.int32()), inner)


def binary_rows(arrays: Sequence[np.ndarray]) -> pa.Array:
    """One binary value per array: its bytes, row-major (little-endian for multi-byte types)."""
    data = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    offsets = np.concatenate([[0], np.cumsum([d.size for d in data], dtype=np.int64)])
    if offsets[-1] >= 2**31:  # binary offsets are int32
        raise InputError(f"{len(arrays)} concepts hold over 2 GiB of local tokens, too much for one row group; "
                         "lower row_group_rows")
    return pa.Array.from_buffers(pa.binary(), len(arrays), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                            pa.py_buffer(np.concatenate(data))])


def version_of(schema: pa.Schema) -> int:
    return SCHEMA_VERSION if schema.field("mask_grid").type == pa.binary() else PARTS_SCHEMA_VERSION


def record_batch(records: Sequence[EmbeddingRecord], schema: pa.Schema,
                  created_at: datetime.datetime) -> pa.RecordBatch:
    """One row group's worth of records as a batch of `schema` (either version: the mask by its type there)."""
    local_tokens = binary_rows([r.local_tokens for r in records])  # (grid * grid * text_dim * 2,) bytes each
    columns: dict[str, pa.Array] = {
        "concept_id": pa.array([r.concept_id for r in records], pa.string()),
        "source_uri": pa.array([r.source_uri for r in records], pa.string()),
        "image_sha256": pa.array([r.image_sha256 for r in records], pa.string()),
        "mask_sha256": pa.array([r.mask_sha256 for r in records], pa.string()),
        "encoder_id": pa.array([r.encoder_id for r in records], pa.string()),
        "words": nested_list([r.words for r in records], pa.float32()),
        "local_tokens": local_tokens,
        "mask_grid": (binary_rows([r.mask_grid for r in records]) if schema.field("mask_grid").type == pa.binary()
                      else nested_list([r.mask_grid for r in records], pa.uint8())),
        "created_at": pa.array([created_at] * len(records), pa.timestamp("us", tz="UTC")),
        "schema_version": pa.array([version_of(schema)] * len(records), pa.int32()),
    }
    for f in schema:
        if f.name not in CORE_COLUMNS:
            columns[f.name] = pa.array([r.metadata.get(f.name) for r in records], f.type)
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def check_schema(schema: pa.Schema, uri: str) -> None:
    """Refuse a v1 part of another schema version, or one whose core columns are not what v1 writes."""
    version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version is None:
        raise StorageError(f"{uri}: not an ELITE embedding store part (no {SCHEMA_VERSION_KEY.decode()} "
                           "in its footer)")
    if version.decode() != str(PARTS_SCHEMA_VERSION):
        raise StorageError(f"{uri}: embedding store schema_version {version.decode()}, but this release "
                           f"reads part folders of schema_version {PARTS_SCHEMA_VERSION} and tables of "
                           f"schema_version {SCHEMA_VERSION}; read it with a matching release")
    check_core_columns(schema, PARTS_CORE_SCHEMA, uri)


def check_core_columns(schema: pa.Schema, core: pa.Schema, uri: str) -> None:
    """Every core column present with the type of `core` (string and binary views count as their plain types)."""
    for expected in core:
        index = schema.get_field_index(expected.name)
        found = None if index < 0 else plain_type(schema.field(index).type)
        if found is None or not found.equals(expected.type):
            what = "missing" if found is None else f"of type {schema.field(index).type}"
            raise StorageError(f"{uri}: core column {expected.name!r} is {what}, "
                               f"schema_version {version_of(core)} has {expected.type}")


def plain_type(type_: Any) -> Any:
    """string/binary for their view and large variants (what other writers of a table may use), recursively."""
    if pa.types.is_string_view(type_) or pa.types.is_large_string(type_):
        return pa.string()
    if pa.types.is_binary_view(type_) or pa.types.is_large_binary(type_):
        return pa.binary()
    if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_list_view(type_):
        return pa.list_(plain_type(type_.value_type))
    return type_


def plain_table(table: pa.Table) -> pa.Table:
    """`table` with plain string, binary and list types (see `plain_type`): what the numpy conversions expect."""
    schema = pa.schema([f.with_type(plain_type(f.type)) for f in table.schema], metadata=table.schema.metadata)
    return table if schema.equals(table.schema) else table.cast(schema)


class ArraysBuilder:
    """Collects row-group pieces into output arrays allocated once the first piece gives the shapes."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.arrays: dict[str, np.ndarray] = {}
        self.lists: dict[str, list[Any]] = {name: [None] * rows for name in
                                            ("concept_id", "source_uri", "image_sha256", "mask_sha256", "encoder_id")}
        self.created_at = np.zeros(rows, "datetime64[us]")
        self.metadata: dict[str, list[MetadataValue]] = {}

    def put(self, positions: np.ndarray, table: pa.Table, uri: str) -> None:
        words = lists_to_numpy(table.column("words"), np.float32, uri)  # (n, 5, text_dim)
        mask_grid = mask_to_numpy(table.column("mask_grid"), uri)  # (n, grid, grid)
        patches, text_dim = mask_grid.shape[1] * mask_grid.shape[2], words.shape[2]
        tokens = binary_to_numpy(table.column("local_tokens"), (patches, text_dim), uri)  # (n, patches, text_dim)
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


def lists_to_numpy(column: pa.ChunkedArray, dtype: Any, uri: str) -> np.ndarray:
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


def mask_to_numpy(column: pa.ChunkedArray, uri: str) -> np.ndarray:
    """(rows, grid, grid) uint8 from either format's mask column: list<list<uint8>> (v1) or grid * grid bytes (v2)."""
    if column.type != pa.binary():
        return lists_to_numpy(column, np.uint8, uri)
    sizes = pc.binary_length(column).to_numpy(zero_copy_only=False) if len(column) else np.zeros(0, np.int32)
    grid = round(float(np.sqrt(sizes[0]))) if len(sizes) else 0
    if len(sizes) and (grid * grid != sizes[0] or grid == 0):
        raise StorageError(f"{uri}: a mask_grid of {int(sizes[0])} bytes is not a square grid")
    if (sizes != grid * grid).any():
        raise InputError(f"the concepts asked for have masks of different sizes (in {uri}); "
                         "read one encoder_id at a time")
    return binary_to_numpy(column, (grid, grid), uri, np.uint8)


def binary_to_numpy(column: pa.ChunkedArray, shape: tuple[int, int], uri: str, dtype: Any = "<f2") -> np.ndarray:
    """(rows, *shape) of `dtype` from a binary column of one little-endian array per row, without copying per row."""
    array = column.combine_chunks()
    dtype = np.dtype(dtype)
    if array.null_count:
        raise StorageError(f"{uri}: null values in a {column.type} tensor column")
    if len(array) == 0:
        return np.zeros((0, *shape), dtype)
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
    expected = shape[0] * shape[1] * dtype.itemsize
    sizes = np.diff(offsets)
    if (sizes != expected).any():
        raise StorageError(f"{uri}: a tensor of {int(sizes[sizes != expected][0])} bytes, "
                           f"expected {expected} for {shape} {dtype}")
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    return data.view(dtype).reshape(len(array), *shape)
