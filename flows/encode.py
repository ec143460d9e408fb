"""Flow: encode the concept images on a store into the embedding store, skipping what is stored.

    encode_concepts("s3://bucket/concepts", "s3://bucket/embeddings", vision_model=..., global_mapper=...,
                    local_mapper=..., pretrained_model=...)

A thin shell over `elite.jobs.encode.encode_catalog` (the same job `elite encode` runs): the flow lists and
hashes the catalog, and each batch of concepts to encode is a Prefect task that reads its images itself, encodes
and appends to the store, retried only on transient storage errors. Failures become rows of the returned report,
of the failures table `_runs/encode-<stamp>-failures.parquet` inside the store's folder, and of a table artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from elite.data.store import COMPACT_MIN_FILES
from elite.errors import InputError
from elite.jobs.encode import (
    EncodeBatchResult,
    EncodeItem,
    EncoderSettings,
    cached_encoder,
    encode_batch,
    encode_catalog,
)
from elite.jobs.models import encoder_needs, resolve_models
from flows._common import (
    RETRIES,
    RETRY_DELAYS,
    batch_label,
    capture_library_logs,
    locations_at,
    publish,
    retry_transient,
    run_bounded,
    store_at,
    table_at,
)


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      task_run_name="encode {label}")
def encode_batch_task(concepts_uri: str, store_uri: str, settings: EncoderSettings, batch: list[EncodeItem],
                      label: str) -> EncodeBatchResult:
    """Read, encode and store one batch (retried only on transient storage errors)."""
    return encode_batch(locations_at(concepts_uri), table_at(store_uri), cached_encoder(settings), batch)


@flow(name="encode-concepts", flow_run_name="encode {concepts_uri}", log_prints=True)
def encode_concepts(concepts_uri: str, store_uri: str, engine: str = "torch", onnx_path: str | None = None,
                    vision_model: str | None = None, global_mapper: str | None = None,
                    local_mapper: str | None = None, pretrained_model: str | None = None,
                    manifest: str | None = None, batch_size: int = 8, concurrency: int = 2, device: str = "auto",
                    dtype: str = "auto", replace_sources: bool = False,
                    compact_min_files: int | None = COMPACT_MIN_FILES) -> dict[str, Any]:
    """Encode every concept under `concepts_uri` (or listed in the `manifest` key there) into `store_uri`.

    Models left out come from ELITE_* variables (elite.jobs.models). `device`: "auto" (the worker's GPU when it
    has one, else the CPU), "cpu" or "cuda:N"; `dtype` "auto" is float16 on CUDA. `concurrency` batches run at once
    (threads sharing one encoder: torch and ONNX Runtime release the GIL, so one batch's reads overlap another's
    encoding). `replace_sources`: let a concept id stored from another source be replaced instead of failing.
    `compact_min_files`: compact the table's small files at the end once this many have piled up (None or 0:
    never; `elite store optimize` does it on demand).
    Returns the job's report (elite.jobs.encode.EncodeReport) as a dict, with `store_uri`.
    """
    if concurrency < 1:
        raise InputError(f"concurrency must be at least 1, got {concurrency}")
    capture_library_logs()
    models = resolve_models(encoder_needs(engine), onnx_path=onnx_path, vision_model=vision_model,
                            global_mapper=global_mapper, local_mapper=local_mapper, pretrained_model=pretrained_model)
    settings = EncoderSettings(engine, models["onnx_path"], models["vision_model"], models["global_mapper"],
                               models["local_mapper"], models["pretrained_model"], device, dtype)
    encoder = cached_encoder(settings)

    def run_batches(batches: Sequence[list[EncodeItem]]) -> Any:
        parameters = [{"concepts_uri": concepts_uri, "store_uri": store_uri, "settings": settings, "batch": batch,
                       "label": batch_label(batch[0].refs[0].concept_id, batch[-1].refs[-1].concept_id,
                                            sum(len(item.refs) for item in batch))} for batch in batches]
        return run_bounded(encode_batch_task, parameters, concurrency)

    report = encode_catalog(store_at(concepts_uri), table_at(store_uri), encoder, manifest=manifest,
                            batch_size=batch_size, reports=store_at(store_uri), run_batches=run_batches,
                            replace_sources=replace_sources, compact_min_files=compact_min_files or None)
    wall = report.seconds["wall"]
    publish("encode-concepts", "Encode concepts", {
        "done": report.done, "skipped (already stored)": report.skipped, "failed": len(report.failures),
        "throughput": f"{report.done / wall:.2f} concepts/s", "encoder": report.encoder_id,
        "device": getattr(encoder, "device", "?"),
        "compacted files": report.compacted["numFilesRemoved"] if report.compacted else 0},
        {"embedding store": store_uri, "failures": report.failures_uri}, report.failures)
    return {**dataclasses.asdict(report), "failed": len(report.failures), "store_uri": store_uri}
