"""Flow: generate images for stored concepts from a prompt file, skipping images already written.

    generate_images("s3://bucket/embeddings", "s3://bucket/prompts.txt", "s3://bucket/images",
                    pretrained_model=..., global_mapper=..., local_mapper=..., encoder_id=...)

The flow plans (concept, prompt, index, seed) items with `elite.prompts.plan_work`, drops those whose PNG exists
(one listing per concept folder), batches the rest and fans the batches out over the worker's generation slots:
`devices`, default every CUDA GPU, else the CPU; a device named twice is two slots. Each slot has its own
pipeline, loaded once per process. A task gets work items (keys, ids, seeds), reads its concepts' embeddings
from the store, generates and puts each PNG. Per run, in the output store:

- `_runs/generate-<stamp>.parquet`: the results manifest, one row per image written by this run (what was asked,
  every generation parameter, model ids and hashes, output URI, sha256, timings);
- `_runs/generate-<stamp>-failures.parquet`: bad prompt-file lines, prompts the pipeline refuses (no
  placeholder, too long), and items of batches that failed even after their storage retries.

`prefect concurrency-limit create elite-gpu N` caps generation batches across every worker and flow run of a
Prefect server: while that limit exists, tasks carry the tag `elite-gpu` (docs in infra/README.md). Without it
they carry no tag: Prefect asks its API for a slot before every tagged task, limit or not, which cost 15-90 ms
per batch in benchmarks/bench_orchestration.py.
"""

from __future__ import annotations

import datetime
import io
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import elite
from elite.errors import InputError
from elite.fileio import sha256_bytes
from elite.pipeline import ElitePipeline
from elite.prompts import WorkItem, batch_work, plan_work, read_prompts
from elite.sources import ConceptRef
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

LIST_THREADS = 16  # concurrent listings of concept folders while planning (S3 requests)
GPU_TAG = "elite-gpu"


@dataclass(frozen=True)
class GenerationSettings:
    """Models and sampler settings, as they go into every manifest row."""

    pretrained_model: str
    global_mapper: str
    local_mapper: str
    encoder_id: str | None = None
    steps: int = 100  # paper / reference: 100 LMS steps
    guidance_scale: float = 5.0  # paper: guidance 5
    lambda_local: float = 0.8  # paper: lambda 0.8
    height: int = 512
    width: int = 512
    dtype: str = "auto"  # float16 on CUDA, float32 on the CPU; or float32 / float16 / bfloat16


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
])


# ---- pipelines and device slots, per process --------------------------------------------------------

@dataclass
class _Loaded:
    pipe: ElitePipeline
    hashes: dict[str, str | None]  # model hashes for the manifest
    dtype: str


_PIPELINES: dict[tuple[str, str, str, str, str, int], _Loaded] = {}
_PIPELINES_LOCK = threading.Lock()
_SLOTS: dict[tuple[str, ...], queue.Queue[int]] = {}
_SLOTS_LOCK = threading.Lock()


def default_devices() -> list[str]:
    """Every CUDA device of this machine, else the CPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{n}" for n in range(count)] or ["cpu"]


@contextmanager
def device_slot(devices: Sequence[str]) -> Iterator[int]:
    """Hold one slot (an index into `devices`) for a batch: a pipeline swaps attention processors per call, so
    one batch per slot at a time; tasks waiting here run as soon as any slot frees up."""
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


def load_pipeline(settings: GenerationSettings, device: str, slot: int = 0) -> _Loaded:
    """The generation-only pipeline of `settings`' models for one slot on `device`, loaded once per process."""
    import torch

    from elite.encoder import state_digest

    dtype = settings.dtype if settings.dtype != "auto" else ("float32" if device == "cpu" else "float16")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"dtype must be auto, float32, float16 or bfloat16, got {settings.dtype!r}")
    key = (settings.pretrained_model, settings.global_mapper, settings.local_mapper, device, dtype, slot)
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            pipe = ElitePipeline.from_pretrained(settings.pretrained_model, None, settings.global_mapper,
                                                 settings.local_mapper, torch_dtype=getattr(torch, dtype),
                                                 device=device)
            hashes: dict[str, str | None] = {
                "unet_sha256": state_digest(pipe.unet), "text_encoder_sha256": state_digest(pipe.text_encoder),
                "global_mapper_sha256": state_digest(pipe.global_mapper),
                "local_mapper_sha256": state_digest(pipe.local_mapper)}
            _PIPELINES[key] = _Loaded(pipe, hashes, dtype)
        return _PIPELINES[key]


# ---- the batch task -------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE, retries=RETRIES, retry_condition_fn=retry_storage_errors)
def generate_batch(store_uri: str, out_uri: str, settings: GenerationSettings, devices: list[str],
                   batch: list[WorkItem]) -> dict[str, Any]:
    """Generate one batch and put its PNGs; returns {"rows": manifest rows, "failures": rows, "seconds": ...}.

    A batch the pipeline refuses as a whole (one prompt too long, say) is run one item at a time, so only the
    bad items fail.
    """
    clock = Stopwatch()
    ids = sorted({item.concept_id for item in batch})
    with clock.time("io"):
        concepts = {c.concept_id: c for c in embeddings_at(store_uri).read_embeddings(ids, settings.encoder_id)}
    out = store_at(out_uri)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    with device_slot(devices) as slot:
        device = devices[slot]
        with clock.time("model"):
            loaded = load_pipeline(settings, device, slot)
        generating = time.perf_counter()
        try:
            with clock.time("model"):
                done = [(batch, _generate(loaded.pipe, settings, batch, concepts))]
        except InputError:  # one bad item spoils the batch: run one by one to isolate it
            done = []
            for item in batch:
                try:
                    with clock.time("model"):
                        done.append(([item], _generate(loaded.pipe, settings, [item], concepts)))
                except InputError as err:
                    failures.append(failure_row(item.concept_id, out.uri(item.output_key), "generate", str(err)))
        seconds = (time.perf_counter() - generating) / len(batch)
    now = datetime.datetime.now(datetime.UTC)
    for items, images in done:
        for item, image in zip(items, images, strict=True):
            with clock.time("model"):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
            with clock.time("io"):
                out.put(item.output_key, data)
            rows.append({**asdict(item), **asdict(settings), **loaded.hashes, "dtype": loaded.dtype,
                         "output_uri": out.uri(item.output_key), "sha256": sha256_bytes(data), "seconds": seconds,
                         "batch_size": len(items), "device": device, "slot": slot, "created_at": now,
                         "scheduler": type(loaded.pipe.scheduler).__name__, "elite_version": elite.__version__})
    return {"rows": rows, "failures": failures, "seconds": clock.seconds}


def _generate(pipe: ElitePipeline, settings: GenerationSettings, items: list[WorkItem],
              concepts: dict[str, Any]) -> list[Any]:
    return list(pipe([i.prompt for i in items], [concepts[i.concept_id] for i in items],
                     seed=[i.seed for i in items], lambda_local=settings.lambda_local,
                     guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
                     height=settings.height, width=settings.width, show_progress=False).images)


# ---- planning -------------------------------------------------------------------------------------

def _concept_refs(store_uri: str, concept_ids: list[str] | None, encoder_id: str | None) -> list[ConceptRef]:
    """Stored concepts as refs (with their class words, for class-scoped prompts); reads no tensors."""
    info = embeddings_at(store_uri).read_info(concept_ids, encoder_id)
    words = info.column("class_word").to_pylist() if "class_word" in info.column_names else [None] * info.num_rows
    return [ConceptRef(cid, uri, class_word=None if word is None else str(word)) for cid, uri, word in
            zip(info.column("concept_id").to_pylist(), info.column("source_uri").to_pylist(), words, strict=True)]


def gpu_tags() -> list[str]:
    """[GPU_TAG] when the Prefect API holds a concurrency limit for it, else []. Checked once per run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_concurrency_limit_by_tag(GPU_TAG)
    except ObjectNotFound:
        return []
    return [GPU_TAG]


def _existing(out_uri: str, concept_ids: list[str]) -> set[str]:
    """Keys of the images already written, one listing per concept folder."""
    out = store_at(out_uri)

    def listed(concept_id: str) -> list[str]:
        return [info.key for info in out.list(f"{concept_id}/")]

    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="elite-list") as pool:
        return {key for keys in pool.map(listed, concept_ids) for key in keys}


@flow(name="generate-images", log_prints=True)
def generate_images(store_uri: str, prompts_uri: str, out_uri: str, pretrained_model: str, global_mapper: str,
                    local_mapper: str, encoder_id: str | None = None, concept_ids: list[str] | None = None,
                    steps: int = 100, guidance_scale: float = 5.0, lambda_local: float = 0.8, height: int = 512,
                    width: int = 512, batch_size: int = 4, base_seed: int = 0, devices: list[str] | None = None,
                    dtype: str = "auto") -> dict[str, Any]:
    """Every (stored concept, prompt, image) of the prompt file at `prompts_uri` -> a PNG under `out_uri`.

    `concept_ids`: only these stored concepts (default: all). `devices`: the generation slots of this worker,
    e.g. ["cuda:0", "cuda:1"] (default: every CUDA GPU, else ["cpu"]); batches run on them concurrently.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    clock = Stopwatch()
    devices = list(devices) if devices else default_devices()
    settings = GenerationSettings(pretrained_model, global_mapper, local_mapper, encoder_id, steps,
                                  guidance_scale, lambda_local, height, width, dtype)
    with clock.time("io"):
        prompts_store, name = object_at(prompts_uri)
        prompts, bad_lines = read_prompts(prompts_store.get(name), name, strict=False)
        refs = _concept_refs(store_uri, concept_ids, encoder_id)
    failures = [failure_row("", f"{prompts_store.uri(name)}:{f.item.rpartition(':')[2]}", f.stage, f.reason)
                for f in bad_lines]
    plan = plan_work(refs, prompts, base_seed)
    used = {item.prompt for item in plan}
    unmatched = [f"{spec.template} ({spec.scope})" for spec in prompts  # a typo in an id or class word?
                 if spec.template not in used and (spec.concept_id or spec.class_word)]
    for prompt in unmatched:
        print(f"warning: prompt {prompt} applies to none of the {len(refs)} concepts")
    with clock.time("io"):
        existing = _existing(out_uri, sorted({item.concept_id for item in plan}))
    todo = [item for item in plan if item.output_key not in existing]
    batches = batch_work(todo, batch_size)
    out = store_at(out_uri)
    rows: list[dict[str, Any]] = []
    tags = gpu_tags()
    batch_task = generate_batch.with_options(tags=tags) if tags else generate_batch
    parameters = [{"store_uri": store_uri, "out_uri": out_uri, "settings": settings, "devices": devices,
                   "batch": batch} for batch in batches]
    # one thread per slot: never more batches in flight than there are slots
    for batch, result in zip(batches, run_bounded(batch_task, parameters, len(devices)), strict=True):
        if isinstance(result, Exception):  # its items are failures, not lost
            failures += [failure_row(i.concept_id, out.uri(i.output_key), "generate",
                                     f"{type(result).__name__}: {result}") for i in batch]
            continue
        rows += result["rows"]
        failures += result["failures"]
        clock.add(result["seconds"])
    stamp = run_stamp()
    with clock.time("io"):
        manifest_uri = put_table(out, f"_runs/generate-{stamp}.parquet", rows, MANIFEST_SCHEMA)
        failures_uri = put_table(out, f"_runs/generate-{stamp}-failures.parquet", failures, FAILURE_SCHEMA)
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {
        "generated": len(rows), "skipped": len(plan) - len(todo), "failed": len(failures), "planned": len(plan),
        "failures": failures, "manifest_uri": manifest_uri, "failures_uri": failures_uri, "out_uri": out_uri,
        "devices": devices, "unmatched_prompts": unmatched, "seconds": {**clock.seconds, "wall": seconds}}
    publish_summary("generate-images", "Generate images", {
        "generated": len(rows), "skipped (already written)": report["skipped"], "failed": len(failures),
        "planned": len(plan), "throughput": f"{len(rows) / seconds:.2f} images/s", "devices": ", ".join(devices)},
        {"images": out_uri, "manifest": manifest_uri, "failures": failures_uri})
    return report
