"""Bulk export of the embedding store: selected concepts -> sharded files on a folder or S3, plus a manifest.

    plan = plan_export("embeddings/", "s3://bucket/exports/run-1", "parquet", where={"class_word": "dog"})
    write_manifest(plan, [f for n, ids in enumerate(plan.shards) for f in write_shard(plan.job, n, ids)])

The job that runs these (elite.jobs.export.export_embeddings) serves `elite export` and the export flow.
Formats (layouts: docs/export.md):

- `parquet`            one self-describing Parquet file per shard, `embeddings-<shard:05d>.parquet`
- `safetensors`        elite's embeddings file per shard (`elite.model.concepts.load_embeddings`, `elite generate`)
- `numpy`              one `.npz` per shard: concept_ids, encoder_ids, words, local_tokens, mask_grid
- `textual-inversion`  one diffusers textual-inversion file per concept, `<concept_id>.safetensors`: w0 only

A plan (`plan_export`) is ids only; each shard is then read from the store and written on its own
(`write_shard`), so memory is bounded by one shard (Parquet: by one row group). `write_manifest` writes
`manifest.json` last: its presence means the export is complete. Every object goes through `ObjectStore.put`.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.numpy

from elite.data.part_index import embeddings_from_arrays
from elite.data.storage import AnyEmbeddingStore, check_key, embedding_store, open_store
from elite.data.store import EmbeddingStore
from elite.data.store_format import CORE_COLUMNS, TENSOR_COLUMNS, MetadataValue, StoredArrays
from elite.errors import InputError, StorageError
from elite.fileio import sha256_bytes, sha256_file
from elite.model.concepts import save_embeddings

__all__ = [
    "DEFAULT_TOKEN_TEMPLATE",
    "FORMATS",
    "MANIFEST_KEY",
    "ExportJob",
    "ExportPlan",
    "ExportedFile",
    "plan_export",
    "write_manifest",
    "write_shard",
]

FORMATS = ("parquet", "safetensors", "numpy", "textual-inversion")
TEXTUAL_INVERSION = "textual-inversion"
DEFAULT_TOKEN_TEMPLATE = "<{concept_id}>"
MANIFEST_KEY = "manifest.json"
MANIFEST_VERSION = 1
PARQUET_FORMAT = b"elite.model.onnx_export"  # footer key of each exported Parquet file: JSON with the format and shapes
# Concepts per Parquet row group, and per store read while writing one: 64 x 768 KiB of float32 local tokens
PARQUET_ROW_GROUP_ROWS = 64
_SUFFIX = {"parquet": "parquet", "safetensors": "safetensors", "numpy": "npz"}


@dataclass(frozen=True)
class ExportJob:
    """What every shard writer needs besides its concept ids (small: a Prefect task gets it by value)."""

    store_uri: str
    dest_uri: str
    format: str
    encoder_id: str | None = None
    token_template: str = DEFAULT_TOKEN_TEMPLATE
    metadata_types: dict[str, str] = field(default_factory=dict)  # Parquet: user column -> Arrow type name
    store_version: int | None = None  # the table version planned on: every shard reads that one snapshot


@dataclass(frozen=True)
class ExportPlan:
    job: ExportJob
    shards: list[list[str]]  # concept ids per shard, sorted, each id once
    encoder_ids: list[str]  # encoders of the selected rows
    concept_ids: list[str] | None  # the filters, as asked (normalised), for the manifest
    where: dict[str, list[MetadataValue]]
    shard_size: int


@dataclass(frozen=True)
class ExportedFile:
    key: str  # relative to the export's destination
    concepts: int
    first_concept_id: str
    last_concept_id: str
    bytes: int
    sha256: str
    token: str | None = None  # textual-inversion only


# ---- planning ------------------------------------------------------------------------------------

def plan_export(store_uri: str | os.PathLike[str], dest_uri: str | os.PathLike[str], format: str = "parquet", *,
                concept_ids: Sequence[str] | None = None, where: Mapping[str, Any] | None = None,
                encoder_id: str | None = None, shard_size: int = 1000,
                token_template: str = DEFAULT_TOKEN_TEMPLATE, version: int | None = None) -> ExportPlan:
    """Check the arguments, select the concepts (all, `concept_ids`, rows matching `where`) and cut the sorted
    ids into shards. `where` maps a metadata column to a value or a list of accepted values (Python equality;
    None matches a missing value). Selecting nothing is an InputError. The export reads one table version:
    `version`, or the newest at planning time (so an encode committing meanwhile changes nothing here)."""
    if format not in FORMATS:
        raise InputError(f"export format {format!r} is unknown; choose one of {', '.join(FORMATS)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size must be an integer of at least 1, got {shard_size!r}")
    if isinstance(concept_ids, str):
        raise InputError("concept_ids must be a sequence of ids, not one string")
    accepted = _check_where(where)
    if format == TEXTUAL_INVERSION:
        _token(token_template, "concept")
    open_store(dest_uri)  # a bad destination fails here, before anything is read
    asked = None if concept_ids is None else sorted(set(concept_ids))
    store = embedding_store(store_uri, version=version)
    info = store.read_info(asked, encoder_id)  # the current row per concept, no tensors
    pinned = store.version() if isinstance(store, EmbeddingStore) else None
    metadata_types = {f.name: str(f.type) for f in info.schema if f.name not in CORE_COLUMNS}
    unknown = [name for name in accepted if name not in metadata_types]
    if unknown:
        known = ", ".join(sorted(metadata_types)) or "none"
        raise InputError(f"where: unknown metadata column {unknown[0]!r}; the store's metadata columns are: {known}")
    keep = np.ones(info.num_rows, dtype=bool)
    for name, values in accepted.items():
        keep &= np.array([value in values for value in info.column(name).to_pylist()], dtype=bool)
    ids = [cid for cid, kept in zip(info.column("concept_id").to_pylist(), keep, strict=True) if kept]
    encoders = sorted({enc for enc, kept in zip(info.column("encoder_id").to_pylist(), keep, strict=True) if kept})
    if not ids:
        under = f" under encoder {encoder_id!r}" if encoder_id is not None else ""
        asked_text = "all" if asked is None else f"{len(asked)} asked"
        raise InputError(f"nothing to export: no concept of the embedding store at {os.fspath(store_uri)}{under} "
                         f"matches the filters (concept_ids: {asked_text}, where: {accepted or 'none'})")
    ids.sort()
    if format == TEXTUAL_INVERSION:
        for cid in ids:
            _textual_inversion_key(cid)
    job = ExportJob(os.fspath(store_uri), os.fspath(dest_uri), format, encoder_id, token_template, metadata_types,
                    pinned)
    shards = [ids[start:start + shard_size] for start in range(0, len(ids), shard_size)]
    return ExportPlan(job, shards, encoders, asked, accepted, shard_size)


def _check_where(where: Mapping[str, Any] | None) -> dict[str, list[MetadataValue]]:
    """`where` with every value as a list of accepted values; refuses what can never match a stored value."""
    if where is None:
        return {}
    if not isinstance(where, Mapping):
        raise InputError(f"where must be a mapping of metadata column -> value(s), got a {type(where).__name__}")
    accepted: dict[str, list[MetadataValue]] = {}
    for name, value in where.items():
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        if not isinstance(name, str) or not name:
            raise InputError(f"where: column names must be non-empty strings, got {name!r}")
        if not values:
            raise InputError(f"where: {name!r} accepts no value (an empty list matches nothing)")
        for item in values:
            if item is not None and not isinstance(item, str | int | float | bool):
                raise InputError(f"where: {name!r} value {item!r} is a {type(item).__name__}; metadata values "
                                 "are str, int, float, bool or None")
        accepted[name] = values
    return accepted


def _token(template: str, concept_id: str) -> str:
    """The textual-inversion token of a concept: `template` with {concept_id} filled in."""
    if "{concept_id}" not in template:
        raise InputError(f"token_template {template!r} must contain {{concept_id}}, so each concept gets its token")
    try:
        token = template.format(concept_id=concept_id)
    except (KeyError, IndexError, ValueError) as err:
        raise InputError(f"token_template {template!r} is not a format string with only {{concept_id}}: "
                         f"{err}") from err
    if not token.strip() or token != token.strip():
        raise InputError(f"token {token!r} of concept {concept_id!r} is blank or has surrounding spaces")
    return token


def _textual_inversion_key(concept_id: str) -> str:
    """`<concept_id>.safetensors`, refused when the id cannot be one file name."""
    key = f"{concept_id}.safetensors"
    if "/" in concept_id:
        raise InputError(f"concept id {concept_id!r} cannot name a textual-inversion file ('/' in it)")
    try:
        return check_key(key)
    except InputError as err:
        raise InputError(f"concept id {concept_id!r} cannot name a textual-inversion file: {err}") from err


# ---- writing -------------------------------------------------------------------------------------

def write_shard(job: ExportJob, shard: int, concept_ids: Sequence[str]) -> list[ExportedFile]:
    """Read one shard's concepts from the store and put its file(s) under `job.dest_uri`."""
    store = embedding_store(job.store_uri, version=job.store_version)
    dest = open_store(job.dest_uri)
    ids = list(concept_ids)
    if job.format == TEXTUAL_INVERSION:
        arrays = store.read_arrays(ids, job.encoder_id)
        files = []
        for i, cid in enumerate(arrays.concept_ids):
            token = _token(job.token_template, cid)
            w0 = np.ascontiguousarray(arrays.words[i, :1], dtype=np.float32)  # (1, text_dim): the primary word
            data = safetensors.numpy.save({token: w0}, metadata={
                "elite.concept_id": cid, "elite.encoder_id": arrays.encoder_ids[i], "elite.word": "w0"})
            key = _textual_inversion_key(cid)
            dest.put(key, data)
            files.append(ExportedFile(key, 1, cid, cid, len(data), sha256_bytes(data), token))
        return files
    key = f"embeddings-{shard:05d}.{_SUFFIX[job.format]}"
    with tempfile.TemporaryDirectory(prefix="elite-export-") as folder:
        path = Path(folder, key)
        try:
            if job.format == "parquet":
                _write_parquet(path, store, job, ids)
            elif job.format == "numpy":
                _write_numpy(path, store.read_arrays(ids, job.encoder_id))
            else:
                _write_safetensors(path, job, store.read_arrays(ids, job.encoder_id))
        except OSError as err:  # the local temporary file (pyarrow's IO errors are OSErrors too)
            raise StorageError(f"{path}: writing export shard {key} failed: {err}") from err
        dest.put(key, path)
        return [ExportedFile(key, len(ids), ids[0], ids[-1], path.stat().st_size, sha256_file(path))]


def _write_numpy(path: Path, arrays: StoredArrays) -> None:
    np.savez_compressed(path, concept_ids=np.array(arrays.concept_ids, dtype=str),
                        encoder_ids=np.array(arrays.encoder_ids, dtype=str), words=arrays.words,
                        local_tokens=arrays.local_tokens, mask_grid=arrays.mask_grid)


def _write_safetensors(path: Path, job: ExportJob, arrays: StoredArrays) -> None:
    concepts = embeddings_from_arrays(arrays)
    encoders = sorted(set(arrays.encoder_ids))
    header = {"encoder_ids": json.dumps(encoders), "exported_from": job.store_uri}
    if len(encoders) == 1:
        header["encoder_id"] = encoders[0]  # as `elite encode` writes it
    save_embeddings(path, concepts, header)


def _write_parquet(path: Path, store: AnyEmbeddingStore, job: ExportJob, ids: list[str]) -> None:
    """One row group per PARQUET_ROW_GROUP_ROWS concepts, each read from the store just before it is written."""
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, len(ids), PARQUET_ROW_GROUP_ROWS):
            batch = _parquet_batch(store.read_arrays(ids[start:start + PARQUET_ROW_GROUP_ROWS], job.encoder_id),
                                   job.metadata_types)
            if writer is None:
                plain = [name for name in batch.schema.names if name not in TENSOR_COLUMNS]
                writer = pq.ParquetWriter(str(path), batch.schema, compression="zstd", use_dictionary=plain,
                                          write_statistics=plain, use_byte_stream_split=False, store_schema=True)
            elif not batch.schema.equals(writer.schema):
                raise InputError(f"concepts {ids[start]!r}... have other array shapes than {ids[0]!r} "
                                 f"({batch.schema.field('words').type} vs {writer.schema.field('words').type}); "
                                 "export one encoder_id at a time")
            writer.write_batch(batch, row_group_size=PARQUET_ROW_GROUP_ROWS)
    finally:
        if writer is not None:
            writer.close()


def _fixed_lists(array: np.ndarray, value_type: Any) -> pa.Array:
    """(rows, a, b) numpy -> fixed_size_list<fixed_size_list<value, b>, a>, without copying."""
    _, a, b = array.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), value_type), b)
    return pa.FixedSizeListArray.from_arrays(inner, a)


def _parquet_batch(arrays: StoredArrays, metadata_types: dict[str, str]) -> pa.RecordBatch:
    n, words, patches = len(arrays), arrays.words.shape[1], arrays.local_tokens.shape[1]
    grid, dim = arrays.mask_grid.shape[1], arrays.words.shape[2]
    layout = {"format": "elite-embeddings-parquet", "version": 1, "words": [words, dim],
              "local_tokens": [patches, dim], "mask_grid": [grid, grid], "primary_word": "words[0]"}
    columns: dict[str, tuple[pa.Array, bool]] = {  # name -> (values, nullable)
        "concept_id": (pa.array(arrays.concept_ids, pa.string()), False),
        "encoder_id": (pa.array(arrays.encoder_ids, pa.string()), False),
        "source_uri": (pa.array(arrays.source_uris, pa.string()), False),
        "image_sha256": (pa.array(arrays.image_sha256, pa.string()), False),
        "mask_sha256": (pa.array(arrays.mask_sha256, pa.string()), True),
        "created_at": (pa.array(arrays.created_at, pa.timestamp("us", tz="UTC")), False),
    }
    for name, type_name in sorted(metadata_types.items()):
        values = arrays.metadata.get(name, [None] * n)
        columns[name] = (pa.array(values, pa.type_for_alias(type_name)), True)
    columns["words"] = (_fixed_lists(arrays.words, pa.float32()), False)  # (n, 5, text_dim)
    # float16 -> float32 is exact; float32 is what DuckDB and most readers decode
    columns["local_tokens"] = (_fixed_lists(arrays.local_tokens.astype(np.float32), pa.float32()), False)
    columns["mask_grid"] = (_fixed_lists(arrays.mask_grid, pa.uint8()), False)  # (n, grid, grid)
    schema = pa.schema([pa.field(name, values.type, nullable=nullable) for name, (values, nullable) in columns.items()],
                       metadata={PARQUET_FORMAT: json.dumps(layout).encode()})
    return pa.RecordBatch.from_arrays([values for values, _ in columns.values()], schema=schema)


def write_manifest(plan: ExportPlan, files: Sequence[ExportedFile]) -> dict[str, Any]:
    """Put `manifest.json` (what was exported, how, and every file) at the destination, after every file;
    returns the manifest as written, with `manifest_uri` added."""
    job, dest = plan.job, open_store(plan.job.dest_uri)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": job.format,
        "store_uri": job.store_uri,
        "store_version": job.store_version,  # the table version read (None: a store of the earlier format)
        "dest_uri": dest.uri(),
        "encoder_id": job.encoder_id,
        "encoder_ids": plan.encoder_ids,
        "concept_ids": plan.concept_ids,
        "where": plan.where,
        "shard_size": plan.shard_size,
        "shards": len(plan.shards),
        "exported": sum(f.concepts for f in files),
        "token_template": job.token_template if job.format == TEXTUAL_INVERSION else None,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "files": [{k: v for k, v in asdict(f).items() if v is not None} for f in files],
    }
    dest.put(MANIFEST_KEY, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {**manifest, "manifest_uri": dest.uri(MANIFEST_KEY)}

