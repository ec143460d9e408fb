"""Flow: generate images for stored concepts from a prompt file, skipping images already written.

    generate_images("s3://bucket/embeddings", "s3://bucket/prompts.txt", "s3://bucket/images",
                    pretrained_model=..., global_mapper=..., local_mapper=..., encoder_id=...)

The flow plans (concept, prompt, index, seed) items with `elite.prompts.plan_work`, drops those whose PNG
exists, batches the rest and runs one task per batch. A task gets work items (keys, ids, seeds), reads its
concepts' embeddings from the store, generates and puts each PNG. A results manifest of every image of the
plan lands at `_runs/generate-<stamp>.jsonl` in the output store.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from elite.errors import InputError
from elite.fileio import sha256_bytes
from elite.pipeline import ElitePipeline
from elite.prompts import WorkItem, batch_work, plan_work, read_prompts
from elite.sources import ConceptRef
from elite.storage import embedding_store, open_object, open_store
from flows._common import RETRIES, publish_summary, put_jsonl, retry_storage_errors, run_stamp


@dataclass(frozen=True)
class GenerationSettings:
    """Models and sampler settings; the models part is also the key of the per-process pipeline cache."""

    pretrained_model: str
    global_mapper: str
    local_mapper: str
    encoder_id: str | None = None
    steps: int = 100  # paper / reference: 100 LMS steps
    guidance_scale: float = 5.0  # paper: guidance 5
    lambda_local: float = 0.8  # paper: lambda 0.8
    height: int = 512
    width: int = 512


_PIPELINES: dict[tuple[str, str, str], ElitePipeline] = {}
_PIPELINES_LOCK = threading.Lock()  # also serialises calls: a pipeline swaps attention processors per call


def load_pipeline(settings: GenerationSettings) -> ElitePipeline:
    """The generation-only pipeline for `settings`' models, loaded once per process."""
    key = (settings.pretrained_model, settings.global_mapper, settings.local_mapper)
    if key not in _PIPELINES:
        _PIPELINES[key] = ElitePipeline.from_pretrained(settings.pretrained_model, None, settings.global_mapper,
                                                        settings.local_mapper)
    return _PIPELINES[key]


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_condition_fn=retry_storage_errors)  # retries: storage only
def generate_batch(store_uri: str, out_uri: str, settings: GenerationSettings,
                   batch: list[WorkItem]) -> list[dict[str, Any]]:
    """Generate one batch and put its PNGs; returns one results row per image."""
    ids = sorted({item.concept_id for item in batch})
    concepts = {c.concept_id: c for c in embedding_store(store_uri).read_embeddings(ids, settings.encoder_id)}
    out = open_store(out_uri)
    started = time.perf_counter()
    with _PIPELINES_LOCK:
        pipe = load_pipeline(settings)
        images = pipe([i.prompt for i in batch], [concepts[i.concept_id] for i in batch],
                      seed=[i.seed for i in batch], lambda_local=settings.lambda_local,
                      guidance_scale=settings.guidance_scale, num_inference_steps=settings.steps,
                      height=settings.height, width=settings.width, show_progress=False).images
    seconds = (time.perf_counter() - started) / len(batch)
    rows = []
    for item, image in zip(batch, images, strict=True):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        out.put(item.output_key, data)
        rows.append(result_row(item, settings, out.uri(item.output_key), sha256_bytes(data), seconds))
    return rows


def result_row(item: WorkItem, settings: GenerationSettings, uri: str, sha256: str | None,
               seconds: float | None) -> dict[str, Any]:
    """One manifest row: what was asked, with which models and settings, and where the image is."""
    return {**asdict(item), **asdict(settings), "output_uri": uri, "sha256": sha256, "seconds": seconds}


def _concept_refs(store_uri: str, concept_ids: list[str] | None, encoder_id: str | None) -> list[ConceptRef]:
    """Stored concepts as refs (with their class words, for class-scoped prompts)."""
    arrays = embedding_store(store_uri).read_arrays(concept_ids, encoder_id)
    class_words = arrays.metadata.get("class_word", [None] * len(arrays))
    return [ConceptRef(cid, uri, class_word=None if word is None else str(word))
            for cid, uri, word in zip(arrays.concept_ids, arrays.source_uris, class_words, strict=True)]


@flow(name="generate-images", log_prints=True)
def generate_images(store_uri: str, prompts_uri: str, out_uri: str, pretrained_model: str, global_mapper: str,
                    local_mapper: str, encoder_id: str | None = None, concept_ids: list[str] | None = None,
                    steps: int = 100, guidance_scale: float = 5.0, lambda_local: float = 0.8, height: int = 512,
                    width: int = 512, batch_size: int = 4, base_seed: int = 0,
                    max_concurrency: int = 1) -> dict[str, Any]:
    """Every (stored concept, prompt, image) of the prompt file at `prompts_uri` -> a PNG under `out_uri`."""
    if batch_size < 1 or max_concurrency < 1:
        raise InputError(f"batch_size and max_concurrency must be at least 1, got {batch_size}, {max_concurrency}")
    started = time.perf_counter()
    settings = GenerationSettings(pretrained_model, global_mapper, local_mapper, encoder_id, steps,
                                  guidance_scale, lambda_local, height, width)
    prompts_store, name = open_object(prompts_uri)
    prompts = read_prompts(prompts_store.get(name), name)
    plan = plan_work(_concept_refs(store_uri, concept_ids, encoder_id), prompts, base_seed)
    out = open_store(out_uri)
    todo = [item for item in plan if not out.exists(item.output_key)]
    rows: dict[str, dict[str, Any]] = {}
    batches = batch_work(todo, batch_size)
    for start in range(0, len(batches), max_concurrency):  # at most max_concurrency batches in flight
        futures = [generate_batch.submit(store_uri, out_uri, settings, b)
                   for b in batches[start:start + max_concurrency]]
        for future in futures:
            rows.update((row["output_key"], row) for row in future.result())
    for item in plan:  # images of earlier runs: listed too, so the manifest covers the whole plan
        if item.output_key not in rows:
            rows[item.output_key] = result_row(item, settings, out.uri(item.output_key),
                                               out.sha256(item.output_key), None)
    manifest_uri = put_jsonl(out, f"_runs/generate-{run_stamp()}.jsonl", [rows[i.output_key] for i in plan])
    seconds = time.perf_counter() - started
    new = len(todo)
    publish_summary("generate-images", "Generate images", {
        "generated": new, "skipped (already written)": len(plan) - new, "planned": len(plan),
        "throughput": f"{new / seconds:.2f} images/s"}, {"images": out_uri, "manifest": manifest_uri})
    return {"generated": new, "skipped": len(plan) - new, "planned": len(plan), "manifest_uri": manifest_uri,
            "out_uri": out_uri}
