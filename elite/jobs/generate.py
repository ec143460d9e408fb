"""The generate job: stored concepts x prompts -> PNGs on a store, a results manifest and a failures table.

    generate_catalog(embedding_store("s3://shop/embeddings"), load_prompts("s3://shop/prompts.txt")[0],
                     open_store("s3://shop/images"), GenerationSettings(pretrained_model=..., ...))

    plan (concept, prompt, index, seed) -> drop images already written -> batches -> generate -> put PNG + row

Both front doors run this one job: `elite generate` runs its batches one after the other, the `generate_images`
flow as Prefect tasks over the worker's device slots. Layout under the output store:

- `<concept_id>/<sha1(prompt)[:10]>-i<index>-s<seed>.png`: the images (a rerun skips those present);
- `_runs/generate-<stamp>.parquet`: the results manifest, one row per image written by the run (what was asked,
  every generation parameter, model ids and hashes, output URI, sha256, timings);
- `_runs/generate-<stamp>-failures.parquet`: what could not be done (bad prompt-file lines, concepts not in the
  store, prompts the pipeline refuses, batches that failed after their retries).
Report files are written only when they have rows.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import elite
from elite.data.objects import ObjectStore
from elite.data.prompts import PromptSpec, WorkItem, batch_work, plan_work
from elite.data.sources import ConceptRef, check_concept_id
from elite.data.storage import AnyEmbeddingStore
from elite.errors import Failure, InputError, check_integer
from elite.fileio import sha256_bytes
from elite.jobs.common import (
    IO_THREADS,
    BatchRunner,
    PerProcess,
    Stopwatch,
    put_failures,
    put_table,
    run_isolated,
    run_sequentially,
    run_stamp,
)
from elite.model.concepts import ConceptEmbedding
from elite.model.devices import cuda_devices, resolve_dtype
from elite.model.encoder import state_digest
from elite.model.pipeline import ElitePipeline
from elite.model.sampling import check_sampler

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class GenerationSettings:
    """Models and sampler settings, as they go into every manifest row."""

    pretrained_model: str
    global_mapper: str
    local_mapper: str
    encoder_id: str | None = None  # which stored embeddings (needed when the store holds several encoders')
    steps: int = 100  # paper / reference: 100 LMS steps
    guidance_scale: float = 5.0  # paper: guidance 5
    lambda_local: float = 0.8  # paper: lambda 0.8
    height: int = 512  # paper: 512x512
    width: int = 512
    dtype: str = "auto"  # float16 on CUDA, float32 on the CPU; or float32 / float16 / bfloat16
    channels_last: bool | None = None  # UNet and VAE in channels-last memory format; None: on CUDA (docs/gpu.md)
    compile_backend: str | None = None  # torch.compile the UNet with this backend ("inductor"); None: not compiled

    def __post_init__(self) -> None:
        """Refuse what would generate something else than asked, silently: NaN lambda gave black images, NaN
        guidance turned guidance off, -3 steps saved undenoised noise."""
        check_sampler(self.steps, self.guidance_scale, self.lambda_local, self.height, self.width)
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InputError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.compile_backend is not None:  # listing the backends imports torch._dynamo: ~2 s, only when asked
            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise InputError(f"compile_backend must be one of torch.compile's backends {backends}, got "
                                 f"{self.compile_backend!r}")


MANIFEST_SCHEMA = pa.schema([
    pa.field("concept_id", pa.string()), pa.field("prompt", pa.string()), pa.field("index", pa.int64()),
    pa.field("seed", pa.int64()), pa.field("output_key", pa.string()), pa.field("output_uri", pa.string()),
    pa.field("sha256", pa.string()), pa.field("seconds", pa.float64()),  # generation time per image (batch / size)
    pa.field("batch_size", pa.int64()), pa.field("device", pa.string()), pa.field("slot", pa.int64()),
    pa.field("pretrained_model", pa.string()), pa.field("global_mapper", pa.string()),
    pa.field("local_mapper", pa.string()), pa.field("encoder_id", pa.string()), pa.field("steps", pa.int64()),
    pa.field("guidance_scale", pa.float64()), pa.field("lambda_local", pa.float64()),
    pa.field("height", pa.int64()), pa.field("width", pa.int64()), pa.field("dtype", pa.string()),
    pa.field("scheduler", pa.string()), pa.field("unet_sha256", pa.string()),
    pa.field("text_encoder_sha256", pa.string()), pa.field("global_mapper_sha256", pa.string()),
    pa.field("local_mapper_sha256", pa.string()), pa.field("elite_version", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("placeholder", pa.string()),  # the prompt's word bound to the concept (added after the first release)
    pa.field("store_uri", pa.string()),  # the embedding store the concept came from (idem)
])


# ---- pipelines and device slots, per process --------------------------------------------------------

@dataclass
class LoadedPipeline:
    pipe: ElitePipeline
    hashes: dict[str, str]  # model hashes for the manifest
    dtype: str
    max_batch: int | None = None  # the largest batch that fit in the device's memory, once one did not


_PIPELINES: PerProcess[tuple[str, str, str, str, str, bool | None, str | None, int], LoadedPipeline] = PerProcess()
_SLOTS: dict[tuple[str, ...], queue.Queue[int]] = {}
_SLOTS_LOCK = threading.Lock()


@contextmanager
def device_slot(devices: Sequence[str]) -> Iterator[int]:
    """Hold one slot (an index into `devices`) for a batch: a pipeline swaps attention processors per call, so
    one batch per slot at a time; callers waiting here run as soon as any slot frees up."""
    key = tuple(devices)
    with _SLOTS_LOCK:
        if key not in _SLOTS:
            _SLOTS[key] = queue.Queue()
            for slot in range(len(key)):
                _SLOTS[key].put(slot)
        slots = _SLOTS[key]
    slot = slots.get()
    try:
        yield slot
    finally:
        slots.put(slot)


def load_pipeline(settings: GenerationSettings, device: str, slot: int = 0) -> LoadedPipeline:
    """The generation-only pipeline of `settings`' models for one slot on `device`, loaded once per process."""
    dtype = resolve_dtype(settings.dtype, device)
    name = str(dtype).removeprefix("torch.")

    def load() -> LoadedPipeline:
        pipe = ElitePipeline.from_pretrained(settings.pretrained_model, None, settings.global_mapper,
                                             settings.local_mapper, torch_dtype=dtype, device=device)
        channels_last = pipe.device.type == "cuda" if settings.channels_last is None else settings.channels_last
        pipe.optimize(channels_last=channels_last, compile_backend=settings.compile_backend)
        hashes = {"unet_sha256": state_digest(pipe.unet), "text_encoder_sha256": state_digest(pipe.text_encoder),
                  "global_mapper_sha256": state_digest(pipe.global_mapper),
                  "local_mapper_sha256": state_digest(pipe.local_mapper)}
        return LoadedPipeline(pipe, hashes, name)

    return _PIPELINES.get((settings.pretrained_model, settings.global_mapper, settings.local_mapper, device, name,
                           settings.channels_last, settings.compile_backend, slot), load)


# ---- prompts and planning -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratePlan:
    todo: list[WorkItem]
    planned: int
    failures: list[Failure]
    unmatched_prompts: list[str]  # scoped prompts that apply to none of the concepts (a typo in an id or class?)


def plan_generate(embeddings: AnyEmbeddingStore, prompts: Sequence[PromptSpec], out: ObjectStore, *,
                  concept_ids: Sequence[str] | None = None, encoder_id: str | None = None,
                  base_seed: int = 0) -> GeneratePlan:
    """Every (stored concept, prompt, image) that is not written yet. Asked concepts missing from the store are
    failures; an `encoder_id` under which nothing is stored is an InputError (it would generate nothing)."""
    info = embeddings.read_info(None, encoder_id)  # the newest row per concept, no tensors
    if encoder_id is not None and info.num_rows == 0 and not embeddings.is_empty():
        raise InputError(f"no concept of the embedding store at {embeddings.storage.uri()} is stored under encoder "
                         f"{encoder_id!r}")
    words = info.column("class_word").to_pylist() if "class_word" in info.column_names else [None] * info.num_rows
    stored = {cid: ConceptRef(cid, uri, class_word=None if word is None else str(word)) for cid, uri, word in
              zip(info.column("concept_id").to_pylist(), info.column("source_uri").to_pylist(), words, strict=True)}
    asked = sorted(stored) if concept_ids is None else list(dict.fromkeys(concept_ids))
    where = embeddings.storage.uri() + (f" under encoder {encoder_id!r}" if encoder_id else "")
    failures = [Failure(cid, embeddings.storage.uri(), "generate", f"concept id {cid!r} is not in the embedding "
                        f"store at {where}") for cid in asked if cid not in stored]
    usable = []
    for cid in asked:
        if cid in stored:
            try:
                usable.append(stored[check_concept_id(cid)])
            except InputError as err:  # an id that cannot name an output folder: this concept's row only
                failures.append(Failure(cid, embeddings.storage.uri(), "generate", str(err)))
    plan = plan_work(usable, prompts, base_seed)
    used = {item.prompt for item in plan}
    unmatched = [f"{spec.template} ({spec.scope})" for spec in prompts
                 if spec.template not in used and (spec.concept_id or spec.class_word)]
    for prompt in unmatched:
        logger.warning("prompt %s applies to none of the %d concepts", prompt, len(asked))
    existing = _existing(out, sorted({item.concept_id for item in plan}))
    recorded = recorded_outputs(out)
    unrecorded = [item for item in plan if item.output_key in existing and item.output_key not in recorded]
    if unrecorded:  # written by a run killed before its rows: made again (same seed, same bytes), with a row
        logger.warning("%d image(s) under %s have no results-manifest row (a run was stopped midway?); they are "
                       "generated again so that every image has its row", len(unrecorded), out.uri())
    todo = [item for item in plan if item.output_key not in existing or item.output_key not in recorded]
    return GeneratePlan(todo, len(plan), failures, unmatched)


MANIFESTS = "_runs/"
_RUN_FILE = re.compile(r"generate-([0-9TZ]+)\.parquet")
_BATCH_FILE = re.compile(r"generate-([0-9TZ]+)/batch-\d+\.parquet")


def manifest_keys(out: ObjectStore, *, tidy: bool = False) -> list[str]:
    """The results-manifest files under `out`: every run's file, then the batch files of runs that did not finish
    (a run killed midway). Batch files of a run whose own file exists (it was stopped while dropping them) are
    left out, and deleted when `tidy`."""
    runs, batches = set(), []
    for info in out.list(MANIFESTS):
        name = info.key[len(MANIFESTS):]
        if match := _RUN_FILE.fullmatch(name):
            runs.add(match.group(1))
        elif match := _BATCH_FILE.fullmatch(name):
            batches.append((match.group(1), info.key))
    if tidy:
        for stamp in {stamp for stamp, _ in batches if stamp in runs}:
            _drop_batch_files(out, stamp)
    keys = [f"{MANIFESTS}generate-{stamp}.parquet" for stamp in sorted(runs)]
    return keys + sorted(key for stamp, key in batches if stamp not in runs)


def recorded_outputs(out: ObjectStore) -> set[str]:
    """Output keys with a results-manifest row (`manifest_keys`, tidying stale batch files)."""
    keys = manifest_keys(out, tidy=True)

    def output_keys(key: str) -> list[str]:
        table = pq.read_table(io.BytesIO(out.get(key)), columns=["output_key"])
        return [str(k) for k in table.column("output_key").to_pylist()]

    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="elite-manifests") as pool:
        return {k for found in pool.map(output_keys, keys) for k in found}


def _drop_batch_files(out: ObjectStore, stamp: str) -> None:
    for info in list(out.list(f"{MANIFESTS}generate-{stamp}/")):
        out.delete(info.key)


def _existing(out: ObjectStore, concept_ids: list[str]) -> set[str]:
    """Keys of the images already written, one listing per concept folder (in threads: storage-bound)."""
    def listed(concept_id: str) -> list[str]:
        return [info.key for info in out.list(f"{concept_id}/")]

    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="elite-list") as pool:
        return {key for keys in pool.map(listed, concept_ids) for key in keys}


# ---- generating -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateBatch:
    """One batch of a run: its rows go to `_runs/generate-<run>/batch-<number>.parquet` as soon as its PNGs are
    written, so a run killed midway leaves a manifest row for every image it wrote."""

    run: str  # the run's stamp
    number: int
    items: list[WorkItem]

    @property
    def manifest_key(self) -> str:
        return f"{MANIFESTS}generate-{self.run}/batch-{self.number:06d}.parquet"


@dataclass(frozen=True)
class GenerateBatchResult:
    rows: list[dict[str, Any]]  # results-manifest rows (MANIFEST_SCHEMA)
    failures: list[Failure]
    seconds: dict[str, float] = field(default_factory=dict)


def generate_batch(embeddings: AnyEmbeddingStore, out: ObjectStore, settings: GenerationSettings,
                   devices: Sequence[str], work: GenerateBatch) -> GenerateBatchResult:
    """Generate one batch on a free device slot, put its PNGs, then its manifest rows. A batch the pipeline refuses
    as a whole (one prompt too long, say) is run one item at a time, so only the bad items fail."""
    batch = work.items
    clock = Stopwatch()
    with clock.time("io"):
        concepts = {c.concept_id: c for c in embeddings.read_embeddings(
            sorted({item.concept_id for item in batch}), settings.encoder_id)}
    with device_slot(devices) as slot:
        device = devices[slot]
        with clock.time("model"):
            loaded = load_pipeline(settings, device, slot)
        generating = time.perf_counter()
        with clock.time("model"):
            done, bad = run_isolated(batch, lambda items: _generate(loaded, settings, items, concepts))
        seconds = (time.perf_counter() - generating) / len(batch)
    failures = [Failure(item.concept_id, out.uri(item.output_key), "generate", str(err)) for item, err in bad]
    now = datetime.datetime.now(datetime.UTC)
    common = {**asdict(settings), **loaded.hashes, "dtype": loaded.dtype, "seconds": seconds, "device": device,
              "slot": slot, "batch_size": len(batch) if not bad else 1, "created_at": now,
              "scheduler": type(loaded.pipe.scheduler).__name__, "elite_version": elite.__version__,
              "store_uri": embeddings.storage.uri()}
    rows = []
    for item, image in done:
        with clock.time("model"):
            data = png_bytes(image, png_text(item, settings, loaded, common["scheduler"]))
        with clock.time("io"):
            out.put(item.output_key, data)
        rows.append({**asdict(item), **common, "output_uri": out.uri(item.output_key), "sha256": sha256_bytes(data)})
    with clock.time("io"):
        put_table(out, work.manifest_key, rows, MANIFEST_SCHEMA)
    return GenerateBatchResult(rows, failures, clock.seconds)


def _batch_rows(out: ObjectStore, batch: GenerateBatch) -> list[dict[str, Any]]:
    """The manifest rows a batch put before its result was lost (a worker or host died after the put), or []."""
    if not out.exists(batch.manifest_key):
        return []
    return pq.read_table(io.BytesIO(out.get(batch.manifest_key))).to_pylist()


def _generate(loaded: LoadedPipeline, settings: GenerationSettings, items: Sequence[WorkItem],
              concepts: dict[str, ConceptEmbedding]) -> list[Image.Image]:
    """The items' images, in pieces of at most the batch size that last fit in the device's memory."""
    limit = loaded.max_batch or len(items)
    images: list[Image.Image] = []
    for start in range(0, len(items), limit):
        images += _fitted(loaded, settings, items[start:start + limit], concepts)
    return images


def _fitted(loaded: LoadedPipeline, settings: GenerationSettings, items: Sequence[WorkItem],
            concepts: dict[str, ConceptEmbedding]) -> list[Image.Image]:
    """One pipeline call; a batch that runs out of GPU memory is split in halves (each image has its own seed and
    normalisation: the same images) and the smaller size is kept for the batches after it."""
    try:
        images = loaded.pipe([i.prompt for i in items], [{i.placeholder: concepts[i.concept_id]} for i in items],
                             seed=[i.seed for i in items], lambda_local=settings.lambda_local,
                             guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
                             height=settings.height, width=settings.width, show_progress=False).images
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
        half = (len(items) + 1) // 2
        loaded.max_batch = min(loaded.max_batch or half, half)
        logger.warning("a batch of %d images did not fit in the memory of %s: generating %d at a time from now on",
                       len(items), loaded.pipe.device, loaded.max_batch)
        torch.cuda.empty_cache()  # a no-op unless CUDA is in use
        return (_fitted(loaded, settings, items[:half], concepts)
                + _fitted(loaded, settings, items[half:], concepts))
    return list(images)  # output_type "pil": a list of images


PNG_SETTINGS = ("pretrained_model", "global_mapper", "local_mapper", "encoder_id", "steps", "guidance_scale",
                "lambda_local", "height", "width")


def png_text(item: WorkItem, settings: GenerationSettings, loaded: LoadedPipeline, scheduler: str) -> dict[str, str]:
    """What a PNG carries about itself (tEXt chunks, shown by image viewers and `PIL.Image.open(f).text`): the
    prompt, seed and the settings that made it. Nothing that differs between two runs of the same plan (time,
    device), so a rerun writes the same bytes."""
    settings_json = {name: getattr(settings, name) for name in PNG_SETTINGS}
    settings_json |= {"dtype": loaded.dtype, "scheduler": scheduler, **loaded.hashes}
    return {"prompt": item.prompt, "placeholder": item.placeholder, "concept_id": item.concept_id,
            "index": str(item.index), "seed": str(item.seed),
            "elite": json.dumps(settings_json, sort_keys=True), "Software": f"elite {elite.__version__}"}


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """`image` as PNG, with `text` as tEXt chunks (iTXt where a value is not Latin-1)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        if value.isascii():
            info.add_text(key, value)
        else:  # tEXt is Latin-1 only: a prompt or concept id in another script goes in UTF-8 iTXt
            info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@dataclass(frozen=True)
class GenerateReport:
    generated: int
    skipped: int  # images already written
    planned: int
    failures: list[Failure]
    manifest_uri: str | None  # None when this run wrote no image
    failures_uri: str | None  # None when nothing failed
    out_uri: str
    devices: list[str]
    unmatched_prompts: list[str]
    seconds: dict[str, float]


def generate_catalog(embeddings: AnyEmbeddingStore, prompts: Sequence[PromptSpec], out: ObjectStore,
                     settings: GenerationSettings, *, concept_ids: Sequence[str] | None = None, batch_size: int = 4,
                     base_seed: int = 0, devices: Sequence[str] | None = None, prompt_failures: Sequence[Failure] = (),
                     run_batches: BatchRunner[GenerateBatch, GenerateBatchResult] | None = None,
                     progress: Callable[[int], None] | None = None) -> GenerateReport:
    """Every image of `prompts` for the stored concepts (`concept_ids`, default all) that `out` lacks.

    `devices`: generation slots, e.g. ["cuda:0", "cuda:1"] (default: every CUDA GPU, else ["cpu"]; a device named
    twice is two pipelines). `prompt_failures`: bad prompt-file lines, reported with the run's failures.
    `run_batches`: how batches run (default: one after the other, here); a batch that ends in an exception
    becomes failure rows for its images. `progress(n)`: called with the images of each finished batch.
    """
    check_integer("batch_size", batch_size, 1)
    started = time.perf_counter()
    clock = Stopwatch()
    slots = list(devices) if devices else cuda_devices()
    with clock.time("io"):
        plan = plan_generate(embeddings, prompts, out, concept_ids=concept_ids, encoder_id=settings.encoder_id,
                             base_seed=base_seed)
    failures = [*prompt_failures, *plan.failures]
    stamp = run_stamp()
    batches = [GenerateBatch(stamp, n, items) for n, items in enumerate(batch_work(plan.todo, batch_size))]
    runner = run_batches or run_sequentially(lambda b: generate_batch(embeddings, out, settings, slots, b))
    rows: list[dict[str, Any]] = []
    for batch, result in zip(batches, runner(batches), strict=True):
        if isinstance(result, Exception):  # failed after its retries: its images are failures, not lost
            # a worker lost after putting its batch's rows (its result never came back): those images are made
            recorded = _batch_rows(out, batch)
            rows += recorded
            made = {row["output_key"] for row in recorded}
            failures += [Failure(i.concept_id, out.uri(i.output_key), "generate", f"{type(result).__name__}: "
                                 f"{result}") for i in batch.items if i.output_key not in made]
        else:
            rows += result.rows
            failures += result.failures
            clock.add(result.seconds)
        if progress is not None:
            progress(len(batch.items))
    with clock.time("io"):
        # the run's rows in one file, then its batch files go: one file per run to read, not one per batch
        manifest_uri = put_table(out, f"{MANIFESTS}generate-{stamp}.parquet", rows, MANIFEST_SCHEMA)
        _drop_batch_files(out, stamp)
        failures_uri = put_failures(out, f"{MANIFESTS}generate-{stamp}-failures.parquet", failures)
    return GenerateReport(len(rows), plan.planned - len(plan.todo), plan.planned, failures, manifest_uri,
                          failures_uri, out.uri(), slots, plan.unmatched_prompts,
                          {**clock.seconds, "wall": time.perf_counter() - started})

