"""The encode job: concept images on a store -> the embedding store, doing only what is not stored yet.

    encode_catalog(open_store("s3://shop/catalog"), embedding_table("s3://shop/embeddings"), encoder)

    list -> hash -> skip -> read -> encode -> append

Both front doors run this one job: `elite encode` runs its batches one after the other, the `encode_concepts` flow
as Prefect tasks. Concept identity (docs/inputs.md):
- every listed concept id gets its own row, whatever other ids share its bytes: concepts whose image and mask bytes
  are equal are encoded once and stored under each id;
- an id whose image or mask bytes changed is encoded again, and its new row replaces the old one (a table version
  keeps the old one readable);
- an id already stored from another source (`00.jpg` of two folders encoded into one store) is a failure naming
  both, never a silent replacement, unless `replace_sources`.
Whatever one item does (missing, unreadable, unusable), it becomes a failures-table row and the rest goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from elite.data.objects import ObjectStore, is_uri
from elite.data.sources import ConceptRef, list_concepts, read_manifest, uri_of
from elite.data.store import COMPACT_MIN_FILES, EmbeddingStore
from elite.data.store_format import EmbeddingRecord
from elite.errors import EliteError, Failure, InputError, StorageError, TransientStorageError, check_integer
from elite.jobs.common import (
    IO_THREADS,
    BatchRunner,
    Locations,
    PerProcess,
    Stopwatch,
    check_readable,
    put_failures,
    run_isolated,
    run_sequentially,
    run_stamp,
)
from elite.model.concepts import ConceptEmbedding
from elite.model.encoder import ConceptEncoder
from elite.model.loading import load_encoder
from elite.model.preprocessing import open_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSettings:
    """Which encoder to load, and where it runs; also the key of the per-process encoder cache."""

    engine: str = "torch"  # "torch" or "onnx"
    onnx_path: str | None = None
    vision_model: str | None = None
    global_mapper: str | None = None
    local_mapper: str | None = None
    pretrained_model: str | None = None  # its UNet names the mappers' cross-attention layers
    device: str = "auto"  # the worker's GPU when it has one, else the CPU
    dtype: str = "auto"  # float16 on CUDA, float32 on the CPU (as generation)


_ENCODERS: PerProcess[EncoderSettings, ConceptEncoder] = PerProcess()


def cached_encoder(settings: EncoderSettings) -> ConceptEncoder:
    """The encoder for `settings`, loaded once per process (threads of one worker share it)."""
    return _ENCODERS.get(settings, lambda: load_encoder(
        settings.engine, onnx_path=settings.onnx_path, vision_model=settings.vision_model,
        global_mapper=settings.global_mapper, local_mapper=settings.local_mapper,
        pretrained_model=settings.pretrained_model, device=settings.device, dtype=settings.dtype))


@dataclass(frozen=True)
class EncodeItem:
    """Concepts whose image and mask bytes are equal: encoded once, stored under each id."""

    image_sha256: str
    mask_sha256: str | None
    refs: tuple[ConceptRef, ...]

    @property
    def concept_ids(self) -> list[str]:
        return [ref.concept_id for ref in self.refs]


@dataclass(frozen=True)
class EncodePlan:
    items: list[EncodeItem]  # to encode
    ready: list[str]  # listed concept ids stored already with these very bytes
    failures: list[Failure]
    listed: int


@dataclass(frozen=True)
class EncodeBatchResult:
    done_ids: list[str]
    failures: list[Failure]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodeReport:
    done: int  # concept ids stored by this run
    skipped: int  # concept ids stored already with the same bytes
    failures: list[Failure]
    concept_ids: list[str]  # every listed concept now stored for this encoder, new or not
    encoder_id: str
    failures_uri: str | None  # the failures table; None when nothing failed
    seconds: dict[str, float]
    compacted: dict[str, int] | None = None  # files the compaction steps removed and added; None: none ran


def list_refs(source: ObjectStore, manifest: str | None = None) -> tuple[list[ConceptRef], list[Failure]]:
    """The concepts of a folder listing, or of a manifest (a CSV/JSONL key in `source`); bad manifest rows are
    failures. A location that does not exist is an InputError/StorageError, before anything is done."""
    check_readable(source, "concepts")
    if manifest is not None:
        return read_manifest(source, manifest, strict=False)
    refs, failures = list_concepts(source, "", strict=False)
    if not refs and not failures:
        logger.warning("no concept images (<name>.jpg/.jpeg/.png/.webp) directly under %s; sub-folders are not "
                       "listed (use a manifest for nested catalogs)", source.uri())
    return refs, failures


def plan_encode(locations: Locations, refs: Sequence[ConceptRef], embeddings: EmbeddingStore, encoder_id: str,
                replace_sources: bool = False) -> EncodePlan:
    """Hash every concept's image and mask (in threads: storage-bound) and decide what to encode."""
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="elite-hash") as pool:
        hashed = list(pool.map(lambda ref: _hash(locations, ref), refs))
    failures = [h for h in hashed if isinstance(h, Failure)]
    stored = embeddings.current(encoder_id)  # the newest row per stored concept, from the cached key columns
    ready: list[str] = []
    groups: dict[tuple[str, str | None], list[ConceptRef]] = {}
    for entry in hashed:
        if isinstance(entry, Failure):
            continue
        ref, image_sha, mask_sha, uri = entry
        before = stored.get(ref.concept_id)
        if before is not None and before[2] != uri and not replace_sources:
            failures.append(Failure(ref.concept_id, uri, "encode", (
                f"concept id {ref.concept_id!r} is already stored from {before[2]}; {uri} would replace it. "
                "Rename one of them, encode into another store, or pass replace_sources to replace it")))
        elif before is not None and before[:2] == (image_sha, mask_sha):
            ready.append(ref.concept_id)
        else:
            groups.setdefault((image_sha, mask_sha), []).append(ref)
    items = [EncodeItem(image, mask, tuple(group)) for (image, mask), group in groups.items()]
    return EncodePlan(items, ready, failures, len(refs))


def _hash(locations: Locations, ref: ConceptRef) -> tuple[ConceptRef, str, str | None, str] | Failure:
    uri = uri_of(locations.store, ref.image) if not is_uri(ref.image) else ref.image
    try:
        uri = locations.uri(ref.image)
        image_sha = locations.sha256(ref.image)
        mask_sha = locations.sha256(ref.mask) if ref.mask else None
    except EliteError as err:  # missing, unreadable, an unsupported URI: this concept's row, the rest goes on
        return Failure(ref.concept_id, uri, "read", str(err))
    return ref, image_sha, mask_sha, uri


def encode_batch(locations: Locations, embeddings: EmbeddingStore, encoder: ConceptEncoder,
                 batch: Sequence[EncodeItem]) -> EncodeBatchResult:
    """Read, encode and store one batch. A TransientStorageError propagates (the caller may retry the batch);
    every other fault of an item is that item's failure row."""
    clock = Stopwatch()
    failures: list[Failure] = []
    loaded: list[tuple[EncodeItem, Image.Image, Image.Image | None]] = []
    for item in batch:
        first = item.refs[0]  # equal bytes: any of them will do
        try:
            with clock.time("io"):
                image_bytes = locations.get(first.image)
                mask_bytes = locations.get(first.mask) if first.mask else None
            with clock.time("model"):
                image = open_image(image_bytes, name=locations.uri(first.image))
                mask = None if mask_bytes is None else open_image(mask_bytes, name=locations.uri(first.mask or ""))
            loaded.append((item, image, mask))
        except TransientStorageError:
            raise
        except (InputError, StorageError) as err:
            failures += _item_failures(locations, item, "read", err)

    def encode(chunk: Sequence[tuple[EncodeItem, Image.Image, Image.Image | None]]) -> list[ConceptEmbedding]:
        return list(encoder.encode([x[1] for x in chunk], [x[2] for x in chunk],
                                   [x[0].refs[0].concept_id for x in chunk]))

    with clock.time("model"):
        done, bad = run_isolated(loaded, encode)
    for (item, _, _), error in bad:
        failures += _item_failures(locations, item, "preprocess", error)
    records = [EmbeddingRecord.from_embedding(
        dataclasses.replace(embedding, concept_id=ref.concept_id), source_uri=locations.uri(ref.image),
        image_sha256=item.image_sha256, mask_sha256=item.mask_sha256, encoder_id=encoder.encoder_id,
        metadata={**ref.metadata, "class_word": ref.class_word})
        for (item, _, _), embedding in done for ref in item.refs]  # one row per id, however many share the bytes
    if records:
        with clock.time("io"):
            embeddings.append(records)
    return EncodeBatchResult([r.concept_id for r in records], failures, clock.seconds)


def _item_failures(locations: Locations, item: EncodeItem, stage: str, err: Exception) -> list[Failure]:
    return [Failure(ref.concept_id, locations.uri(ref.image), stage, str(err)) for ref in item.refs]


def encode_catalog(source: ObjectStore, embeddings: EmbeddingStore, encoder: ConceptEncoder, *,
                   manifest: str | None = None, batch_size: int = 8, reports: ObjectStore | None = None,
                   run_batches: BatchRunner[list[EncodeItem], EncodeBatchResult] | None = None,
                   replace_sources: bool = False, progress: Callable[[int], None] | None = None,
                   compact_min_files: int | None = COMPACT_MIN_FILES) -> EncodeReport:
    """Encode every concept of `source` (its listing, or the `manifest` key in it) not yet in `embeddings`.

    `reports`: where `_runs/encode-<stamp>-failures.parquet` goes when something failed (None: nowhere).
    `run_batches`: how batches run (default: one after the other, here); a batch that ends in an exception
    (after the runner's retries) becomes failure rows for its concepts. `progress(n)`: called with the number of
    concept ids of each finished batch. Every `compact_min_files` batches and at the end, once at least that many
    small data files (one per batch) have piled up, they are compacted (`EmbeddingStore.compact_small_files`;
    None: never); a failed compaction is logged, not a failure of the run, since every row is stored already.
    """
    check_integer("batch_size", batch_size, 1)
    started = time.perf_counter()
    clock = Stopwatch()
    locations = Locations(source)
    with clock.time("io"):
        refs, failures = list_refs(source, manifest)
        plan = plan_encode(locations, refs, embeddings, encoder.encoder_id, replace_sources)
    failures += plan.failures
    batches = [plan.items[i:i + batch_size] for i in range(0, len(plan.items), batch_size)]
    runner = run_batches or run_sequentially(lambda b: encode_batch(locations, embeddings, encoder, b))
    done: list[str] = []
    compacted: dict[str, int] = {}
    for n, (batch, result) in enumerate(zip(batches, runner(batches), strict=True), 1):
        if isinstance(result, Exception):  # failed after its retries: its concepts are failures, not lost
            failures += [f for item in batch for f in _item_failures(locations, item, "encode", result)]
        else:
            done += result.done_ids
            failures += result.failures
            clock.add(result.seconds)
        if progress is not None:
            progress(sum(len(item.refs) for item in batch))
        if compact_min_files is not None and (n % compact_min_files == 0 or n == len(batches)):
            with clock.time("io"):  # during the run too: a MERGE slows down with every small file in the table
                _compact(embeddings, compact_min_files, compacted)
    failures_uri = None
    if reports is not None:
        with clock.time("io"):
            failures_uri = put_failures(reports, f"_runs/encode-{run_stamp()}-failures.parquet", failures)
    return EncodeReport(len(done), len(plan.ready), failures, sorted(plan.ready + done), encoder.encoder_id,
                        failures_uri, {**clock.seconds, "wall": time.perf_counter() - started}, compacted or None)


def _compact(embeddings: EmbeddingStore, min_files: int, totals: dict[str, int]) -> None:
    """The compaction step: once `min_files` small files piled up, compact them; counts add up in `totals`. A
    failure is logged, not a failure of the run: every row is stored already."""
    try:
        metrics = embeddings.compact_small_files(min_files)
    except StorageError as err:
        logger.warning("compacting the embedding table failed (every row is stored; a later batch, the next run "
                       "or `elite store optimize` compacts it): %s", err)
        return
    for key in ("numFilesAdded", "numFilesRemoved"):
        totals[key] = totals.get(key, 0) + int((metrics or {}).get(key, 0))
