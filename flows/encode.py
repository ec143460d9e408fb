"""Flow: encode the concept images on a store into the Parquet embedding store, skipping what is stored.

    encode_concepts("s3://bucket/concepts", "s3://bucket/embeddings", vision_model=..., global_mapper=...,
                    local_mapper=..., pretrained_model=...)

The flow lists concepts (a folder, or a manifest), hashes each image and mask object (in threads: it is
storage-bound), skips those already stored for this encoder, and hands the rest to one task per batch. A task
gets concept refs, reads the images itself, encodes and appends one part to the store. Failures (unreadable,
unusable images, a batch that failed even after its storage retries) become rows of the returned report and of
the failures table `_runs/encode-<stamp>-failures.parquet` inside the store's folder; the run carries on.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from elite.encoder import ConceptEncoder, encode_isolated
from elite.encoder import load_encoder as elite_load_encoder
from elite.errors import EliteError, Failure, InputError
from elite.preprocessing import open_image
from elite.sources import ConceptRef, list_concepts, read_manifest
from elite.storage import LocalStore, ObjectStore, is_uri
from elite.store import EmbeddingRecord
from flows._common import (
    FAILURE_SCHEMA,
    RETRIES,
    Stopwatch,
    embeddings_at,
    failure_row,
    object_at,
    publish_summary,
    put_table,
    retry_storage_errors,
    run_bounded,
    run_stamp,
    store_at,
)

HASH_THREADS = 16  # concurrent hash requests while listing a catalog (S3 HEADs, or reads of objects without one)


@dataclass(frozen=True)
class EncoderSettings:
    """Which encoder to load; also the key of the per-process encoder cache."""

    engine: str = "torch"  # "torch" or "onnx"
    onnx_path: str | None = None
    vision_model: str | None = None
    global_mapper: str | None = None
    local_mapper: str | None = None
    pretrained_model: str | None = None  # its UNet names the mappers' cross-attention layers


_ENCODERS: dict[EncoderSettings, ConceptEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_encoder(settings: EncoderSettings) -> ConceptEncoder:
    """The encoder for `settings`, loaded once per process (threads of one worker share it)."""
    with _ENCODERS_LOCK:
        if settings not in _ENCODERS:
            _ENCODERS[settings] = _build_encoder(settings)
        return _ENCODERS[settings]


def _build_encoder(settings: EncoderSettings) -> ConceptEncoder:
    return elite_load_encoder(settings.engine, onnx_path=settings.onnx_path, vision_model=settings.vision_model,
                              global_mapper=settings.global_mapper, local_mapper=settings.local_mapper,
                              pretrained_model=settings.pretrained_model)


def locate(store: ObjectStore, ref: str) -> tuple[ObjectStore, str]:
    """(store, key) of a ConceptRef path: a key in `store`, or an absolute URI from a manifest."""
    return object_at(ref) if is_uri(ref) else (store, ref)


@dataclass(frozen=True)
class Hashed:
    """A concept to encode, with the content hashes that make up its store key."""

    ref: ConceptRef
    image_sha256: str
    mask_sha256: str | None


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_condition_fn=retry_storage_errors)  # retries: storage only
def encode_batch(concepts_uri: str, store_uri: str, settings: EncoderSettings,
                 batch: list[Hashed]) -> dict[str, Any]:
    """Read, encode and store one batch; returns {"done": n, "failures": [rows], "seconds": {kind: s}}."""
    store = store_at(concepts_uri)
    clock = Stopwatch()
    with clock.time("model"):
        encoder = load_encoder(settings)
    failures: list[dict[str, str]] = []
    loaded = []
    for item in batch:
        where = _uri(store, item.ref.image)
        try:
            with clock.time("io"):
                image_bytes = _read(store, item.ref.image)
                mask_bytes = _read(store, item.ref.mask) if item.ref.mask else None
            with clock.time("model"):
                image = open_image(image_bytes, name=where)
                mask = None if mask_bytes is None else open_image(mask_bytes, name=_uri(store, item.ref.mask or ""))
            loaded.append((item, image, mask, where))
        except InputError as err:
            failures.append(failure_row(item.ref.concept_id, where, "read", str(err)))
    with clock.time("model"):
        embeddings, bad = encode_isolated(encoder, [(x[0].ref.concept_id, x[1], x[2]) for x in loaded])
    by_id = {x[0].ref.concept_id: (x[0], x[3]) for x in loaded}
    failures += [failure_row(f.item, by_id[f.item][1], f.stage, f.reason) for f in bad]
    records = []
    for embedding in embeddings:
        item, where = by_id[embedding.concept_id]
        metadata = {**item.ref.metadata, "class_word": item.ref.class_word}
        records.append(EmbeddingRecord.from_embedding(
            embedding, source_uri=where, image_sha256=item.image_sha256, mask_sha256=item.mask_sha256,
            encoder_id=encoder.encoder_id, metadata=metadata))
    if records:
        with clock.time("io"):
            embeddings_at(store_uri).append(records)
    return {"done": len(records), "done_ids": [r.concept_id for r in records], "failures": failures,
            "seconds": clock.seconds}


def _uri(store: ObjectStore, ref: str) -> str:
    where, key = locate(store, ref)
    return where.uri(key)


def _read(store: ObjectStore, ref: str) -> bytes:
    where, key = locate(store, ref)
    return where.get(key)


def _hash_one(store: ObjectStore, ref: ConceptRef) -> Hashed | dict[str, str]:
    try:
        image_sha = _sha256(store, ref.image)
        mask_sha = _sha256(store, ref.mask) if ref.mask else None
    except EliteError as err:  # a missing or unreadable object: record it, carry on
        return failure_row(ref.concept_id, _uri(store, ref.image), "read", str(err))
    return Hashed(ref, image_sha, mask_sha)


def _hash_concepts(store: ObjectStore, refs: list[ConceptRef]) -> tuple[list[Hashed], list[dict[str, str]]]:
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="elite-hash") as pool:
        results = list(pool.map(lambda ref: _hash_one(store, ref), refs))
    hashed = [r for r in results if isinstance(r, Hashed)]
    return hashed, [r for r in results if not isinstance(r, Hashed)]


def _sha256(store: ObjectStore, ref: str) -> str:
    where, key = locate(store, ref)
    return where.sha256(key)


@flow(name="encode-concepts", log_prints=True)
def encode_concepts(concepts_uri: str, store_uri: str, engine: str = "torch", onnx_path: str | None = None,
                    vision_model: str | None = None, global_mapper: str | None = None,
                    local_mapper: str | None = None, pretrained_model: str | None = None,
                    manifest: str | None = None, batch_size: int = 8, concurrency: int = 2) -> dict[str, Any]:
    """Encode every concept under `concepts_uri` (or listed in the `manifest` key there) into `store_uri`.

    `concurrency` batches run at once (threads sharing one encoder: torch and ONNX Runtime release the GIL, so
    one batch's reads overlap another's encoding). Returns counts, the failure rows, `concept_ids` (every listed
    concept now in the store for this encoder, new or not), the encoder id, where the failures table is, and
    `seconds` spent in model calls and storage.
    """
    if batch_size < 1 or concurrency < 1:
        raise InputError(f"batch_size and concurrency must be at least 1, got {batch_size}, {concurrency}")
    started = time.perf_counter()
    clock = Stopwatch()
    settings = EncoderSettings(engine, onnx_path, vision_model, global_mapper, local_mapper, pretrained_model)
    with clock.time("model"):
        encoder_id = load_encoder(settings).encoder_id
    store = store_at(concepts_uri)
    failures: list[dict[str, str]] = []
    with clock.time("io"):
        if manifest is None:
            refs = list_concepts(store)
            if not refs:
                if isinstance(store, LocalStore) and not store.root.is_dir():
                    raise InputError(f"{concepts_uri}: no such folder")
                print(f"warning: no concept images (<name>.jpg/.jpeg/.png/.webp) directly under {store.uri()}; "
                      "sub-folders are not listed (use a manifest for nested catalogs)")
        else:
            refs, bad_rows = read_manifest(store, manifest, strict=False)
            failures += [_manifest_row(store, f) for f in bad_rows]
        hashed, hash_failures = _hash_concepts(store, refs)
        stored = embeddings_at(store_uri).stored_keys()
    failures += hash_failures
    todo = [h for h in hashed if (h.image_sha256, h.mask_sha256, encoder_id) not in stored]
    ready = [h.ref.concept_id for h in hashed if (h.image_sha256, h.mask_sha256, encoder_id) in stored]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    done = 0
    # `concurrency` batches in flight: 1,000 concepts on an unbounded runner meant 125 batches decoding and
    # encoding at once, and 6 GB of memory
    parameters = [{"concepts_uri": concepts_uri, "store_uri": store_uri, "settings": settings, "batch": batch}
                  for batch in batches]
    for batch, result in zip(batches, run_bounded(encode_batch, parameters, concurrency), strict=True):
        if isinstance(result, Exception):  # its concepts are failures, not lost
            failures += [failure_row(h.ref.concept_id, _uri(store, h.ref.image), "encode",
                                     f"{type(result).__name__}: {result}") for h in batch]
            continue
        done += result["done"]
        ready += result["done_ids"]
        failures += result["failures"]
        clock.add(result["seconds"])
    with clock.time("io"):
        failures_uri = put_table(store_at(store_uri), f"_runs/encode-{run_stamp()}-failures.parquet", failures,
                                 FAILURE_SCHEMA)
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {"done": done, "skipped": len(hashed) - len(todo), "failed": len(failures),
                              "failures": failures, "concept_ids": sorted(ready), "encoder_id": encoder_id,
                              "store_uri": store_uri, "failures_uri": failures_uri,
                              "seconds": {**clock.seconds, "wall": seconds}}
    publish_summary("encode-concepts", "Encode concepts", {
        "done": done, "skipped (already stored)": report["skipped"], "failed": len(failures),
        "throughput": f"{done / seconds:.2f} concepts/s", "encoder": encoder_id},
        {"embedding store": store_uri, "failures": failures_uri})
    return report


def _manifest_row(store: ObjectStore, failure: Failure) -> dict[str, str]:
    key = failure.item.rpartition(":")[0]
    return failure_row(failure.item, store.uri(key), failure.stage, failure.reason)
