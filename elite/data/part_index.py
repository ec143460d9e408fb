"""Reading an embedding store from immutable Parquet files: the part of both store formats that is the same.

`PartIndex` keeps, per data file it has seen, the footer and the small key columns (INDEX_COLUMNS); files never
change once visible (a Delta table's data files, the earlier format's parts), so each is read once per process.
From that index it answers `current`, `has` and `read_info`, and `read_arrays` reads only the row groups that
hold the rows asked for. Subclasses say which files are visible now (`_listing`) and check each file's schema
(`_check_file`): `elite.data.store.EmbeddingStore` (the Delta Lake table) and `elite.data.parts_store.PartStore`
(the earlier folder of parts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from elite.data.store_format import (
    CORE_COLUMNS,
    CORE_SCHEMA,
    INDEX_COLUMNS,
    TENSOR_COLUMNS,
    ArraysBuilder,
    StoredArrays,
    StoreKey,
    plain_table,
)
from elite.errors import InputError, StorageError
from elite.fileio import atomic_path, fsync_folder
from elite.model.concepts import ConceptEmbedding

__all__ = ["AppendResult", "LocalFolder", "PartIndex", "PartStorage", "embeddings_from_arrays", "is_part_name"]


@dataclass(frozen=True)
class AppendResult:
    written: int
    skipped: int  # already stored unchanged, or repeated within the same call
    part: str | None = None  # the earlier format: name of the new part file; None when nothing was new
    version: int | None = None  # the Delta table: the version committed; None when nothing was new


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

    On S3, `elite.data.storage.ObjectStorePartStorage` puts whole parts: an upload only becomes visible when
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
        fsync_folder(self.root)  # make the rename itself durable, not only the file's bytes

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


class PartIndex:
    """The reading side of a store of immutable Parquet files. Not thread-safe: one instance per thread."""

    def __init__(self, storage: PartStorage) -> None:
        self.storage = storage
        self._parts: dict[str, _Part] = {}
        self._keys: set[StoreKey] = set()
        self._index_cache: tuple[tuple[str, ...], pa.Table] | None = None  # (part names, their joined key columns)

    def _listing(self) -> list[str]:
        """Names (relative to `storage`) of the files that make up the store now."""
        raise NotImplementedError

    def _check_file(self, schema: pa.Schema, uri: str) -> None:
        """Refuse a data file whose schema this release does not read (a StorageError naming it)."""
        raise NotImplementedError

    def uri(self) -> str:
        return self.storage.uri()

    def is_empty(self) -> bool:
        return not self._refresh()

    def has(self, concept_id: str, image_sha256: str, mask_sha256: str | None, encoder_id: str) -> bool:
        self._refresh()
        return (concept_id, image_sha256, mask_sha256, encoder_id) in self._keys

    def stored_keys(self) -> frozenset[StoreKey]:
        """Every stored (concept id, image sha256, mask sha256, encoder id): one listing for many `has` checks."""
        self._refresh()
        return frozenset(self._keys)

    def current(self, encoder_id: str) -> dict[str, tuple[str, str | None, str]]:
        """concept id -> (image sha256, mask sha256, source URI) of its newest row under `encoder_id`, from the
        cached key columns (no tensor or metadata read): what an encode run plans with."""
        newest = _newest_rows(self._index(encoder_id), check_encoders=False)
        return dict(zip(newest.column("concept_id").to_pylist(), zip(
            newest.column("image_sha256").to_pylist(), newest.column("mask_sha256").to_pylist(),
            newest.column("source_uri").to_pylist(), strict=True), strict=True))

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
            raise InputError(f"concept id {missing[0]!r} is not in the embedding store at {self.uri()}"
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
            raise InputError(f"concept id {missing[0]!r} is not in the embedding store at {self.uri()}"
                             + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        pieces = []
        part_nos = newest.column("_part").to_numpy()
        rows = newest.column("_row").to_numpy()
        for part_no in np.unique(part_nos):
            part = parts[part_no]
            columns = [name for name in part.footer.schema.to_arrow_schema().names if name not in TENSOR_COLUMNS]
            with self._guard(part.name), self.storage.open_part(part.name) as source:
                table = plain_table(pq.ParquetFile(source, metadata=part.footer).read(columns=columns,
                                                                                     use_threads=False))
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
        return embeddings_from_arrays(self.read_arrays(concept_ids, encoder_id))

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
        names = self._listing()
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
            self._check_file(schema, uri)
            keys = plain_table(parquet.read(columns=INDEX_COLUMNS, use_threads=False))
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
        out = ArraysBuilder(len(rows))
        for part_no in np.unique(part_nos):
            part = parts[part_no]
            positions = np.flatnonzero(part_nos == part_no)  # output positions served by this part
            groups = np.searchsorted(part.row_group_starts, rows[positions], side="right") - 1
            with self._guard(part.name), self.storage.open_part(part.name) as source:
                parquet = pq.ParquetFile(source, metadata=part.footer)
                for group in np.unique(groups):
                    in_group = positions[groups == group]
                    table = plain_table(parquet.read_row_group(int(group), use_threads=False))
                    wanted = rows[in_group] - part.row_group_starts[group]  # rows within the group
                    if not np.array_equal(wanted, np.arange(table.num_rows)):  # whole group in order: no copy
                        table = table.take(wanted)
                    out.put(in_group, table, self.storage.uri(part.name))
        return out.build()


def _positions(have: list[str], wanted: list[str]) -> list[int]:
    """Positions in `have` of each of `wanted` (all present), in `wanted`'s order."""
    where = {cid: n for n, cid in enumerate(have)}
    return [where[cid] for cid in wanted]


def _keys_of(keys: pa.Table) -> Iterator[StoreKey]:
    return zip(keys.column("concept_id").to_pylist(), keys.column("image_sha256").to_pylist(),
               keys.column("mask_sha256").to_pylist(), keys.column("encoder_id").to_pylist(), strict=True)


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


def embeddings_from_arrays(arrays: StoredArrays) -> list[ConceptEmbedding]:
    """Stored rows as `ConceptEmbedding`s (float32 tensors), as the pipeline and the embeddings file take them."""
    return [ConceptEmbedding(cid, torch.from_numpy(arrays.words[i]),
                             torch.from_numpy(arrays.local_tokens[i].astype(np.float32)),
                             torch.from_numpy(arrays.mask_grid[i].astype(np.float32)))
            for i, cid in enumerate(arrays.concept_ids)]
