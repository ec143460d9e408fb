"""Flow: encode the concept images on a store into the embedding store, skipping what is stored.

    encode_concepts("s3://bucket/concepts", "s3://bucket/embeddings", vision_model=..., global_mapper=...,
                    local_mapper=..., pretrained_model=...)

A thin shell over `elite.jobs.encode.encode_catalog` (the same job `elite encode` runs): the flow lists and
hashes the catalog, and each batch of concepts to encode is a Prefect task that reads its images itself, encodes
and appends to the store, retried only on transient storage errors. `runner="threads"` runs `concurrency` batches
at a time in this process; `runner="ray"` runs them on the Ray cluster at `ray_address` (flows/_ray.py), each Ray
worker loading the encoder once and appending its rows to the table itself (Delta commits retry on conflicts).
Failures become rows of the returned report, of the failures table `_runs/encode-<stamp>-failures.parquet` inside
the store's folder, and of a table artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from PIL import Image
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
from elite.model.concepts import ConceptEmbedding
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
from flows._ray import RayOptions, check_runner, ray_device, ray_session


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      task_run_name="encode {label}")
def encode_batch_task(concepts_uri: str, store_uri: str, settings: EncoderSettings, batch: list[EncodeItem],
                      label: str) -> EncodeBatchResult:
    """Read, encode and store one batch (retried only on transient storage errors)."""
    capture_library_logs()  # a Ray worker is a process of its own
    return encode_batch(locations_at(concepts_uri), table_at(store_uri), cached_encoder(settings), batch)


@task(cache_policy=NO_CACHE, task_run_name="load encoder")
def encoder_identity_task(settings: EncoderSettings) -> tuple[str, str]:
    """(encoder id, device) of the encoder `settings` load where the batches run (a Ray worker: its GPU and dtype
    may differ from the flow's host, and the id includes the dtype). The worker keeps the encoder loaded."""
    encoder = cached_encoder(settings)
    return encoder.encoder_id, encoder.device


@dataclasses.dataclass(frozen=True)
class RemoteEncoder:
    """The encoder the Ray workers load, as the job's planning sees it: its id and device; it encodes nothing here."""

    encoder_id: str
    device: str

    def encode(self, images: Sequence[Image.Image], masks: Sequence[Image.Image | None] | None = None,
               concept_ids: Sequence[str] | None = None) -> list[ConceptEmbedding]:
        raise RuntimeError("RemoteEncoder encodes on the Ray workers, not in the flow")


@flow(name="encode-concepts", flow_run_name="encode {concepts_uri}", log_prints=True)
def encode_concepts(concepts_uri: str, store_uri: str, engine: str = "torch", onnx_path: str | None = None,
                    vision_model: str | None = None, global_mapper: str | None = None,
                    local_mapper: str | None = None, pretrained_model: str | None = None,
                    manifest: str | None = None, batch_size: int = 8, concurrency: int = 2, device: str = "auto",
                    dtype: str = "auto", replace_sources: bool = False,
                    compact_min_files: int | None = COMPACT_MIN_FILES, runner: str = "threads",
                    ray_address: str | None = None, ray_stall_timeout: float = 900.0) -> dict[str, Any]:
    """Encode every concept under `concepts_uri` (or listed in the `manifest` key there) into `store_uri`.

    Models left out come from ELITE_* variables (elite.jobs.models). `device`: "auto" (the worker's GPU when it
    has one, else the CPU), "cpu" or "cuda:N"; `dtype` "auto" is float16 on CUDA. `concurrency` batches run at once
    (threads sharing one encoder: torch and ONNX Runtime release the GIL, so one batch's reads overlap another's
    encoding). `replace_sources`: let a concept id stored from another source be replaced instead of failing.
    `compact_min_files`: compact the table's small files at the end once this many have piled up (None or 0:
    never; `elite store optimize` does it on demand). `runner`: "threads" or "ray" (batches on the Ray cluster at
    `ray_address`, default RAY_ADDRESS, else a local Ray; `device` "cpu" asks Ray for a CPU, "auto" for a GPU when
    the cluster has one; `ray_stall_timeout`: seconds with no batch finished before the rest become failures).
    Returns the job's report (elite.jobs.encode.EncodeReport) as a dict, with `store_uri`.
    """
    if concurrency < 1:
        raise InputError(f"concurrency must be at least 1, got {concurrency}")
    capture_library_logs()
    check_runner(runner)
    ray_options = RayOptions(ray_address, ray_stall_timeout) if runner == "ray" else None
    models = resolve_models(encoder_needs(engine), onnx_path=onnx_path, vision_model=vision_model,
                            global_mapper=global_mapper, local_mapper=local_mapper, pretrained_model=pretrained_model)
    with ExitStack() as stack:
        want = ray_device([device]) if ray_options is not None else device
        # on a Ray worker, the GPU it was given is its only one: cuda:0
        settings = EncoderSettings(engine, models["onnx_path"], models["vision_model"], models["global_mapper"],
                                   models["local_mapper"], models["pretrained_model"],
                                   "cuda:0" if want == "cuda" else device, dtype)
        if ray_options is not None:
            # one Ray job for the encoder's id and the batches: the worker that loaded the encoder keeps it
            session = stack.enter_context(ray_session(ray_options))
            [found] = list(session.run(encoder_identity_task, [{"settings": settings}], want))
            if isinstance(found, Exception):
                raise found
            encoder: Any = RemoteEncoder(*found)
        else:
            encoder = cached_encoder(settings)

        def run_batches(batches: Sequence[list[EncodeItem]]) -> Any:
            parameters = [{"concepts_uri": concepts_uri, "store_uri": store_uri, "settings": settings,
                           "batch": batch, "label": batch_label(batch[0].refs[0].concept_id,
                                                                batch[-1].refs[-1].concept_id,
                                                                sum(len(item.refs) for item in batch))}
                          for batch in batches]
            if ray_options is not None:
                return session.run(encode_batch_task, parameters, want)
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
