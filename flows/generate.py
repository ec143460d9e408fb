"""Flow: generate images for stored concepts from a prompt file, skipping images already written.

    generate_images("s3://bucket/embeddings", "s3://bucket/prompts.txt", "s3://bucket/images",
                    pretrained_model=..., global_mapper=..., local_mapper=..., encoder_id=...)

A thin shell over `elite.jobs.generate.generate_catalog` (the same job `elite generate` runs, same layout and
manifests): each batch is a Prefect task, fanned out over the worker's generation slots (`devices`, default every
CUDA GPU, else the CPU; a device named twice is two slots), retried only on transient storage errors.

`prefect concurrency-limit create elite-gpu N` caps generation batches across every worker and flow run of a
Prefect server: while that limit exists, tasks carry the tag `elite-gpu` (docs in infra/README.md). Without it
they carry no tag: Prefect asks its API for a slot before every tagged task, limit or not, which cost 15-90 ms
per batch in benchmarks/bench_orchestration.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from elite.data.prompts import load_prompts
from elite.jobs.generate import GenerateBatch, GenerateBatchResult, GenerationSettings, generate_batch, generate_catalog
from elite.jobs.models import GENERATOR_NEEDS, resolve_models
from elite.model.devices import cuda_devices
from flows._common import (
    RETRIES,
    RETRY_DELAYS,
    batch_label,
    capture_library_logs,
    embeddings_at,
    publish,
    retry_transient,
    run_bounded,
    store_at,
)

GPU_TAG = "elite-gpu"


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      task_run_name="generate {label}")
def generate_batch_task(store_uri: str, out_uri: str, settings: GenerationSettings, devices: list[str],
                        batch: GenerateBatch, label: str) -> GenerateBatchResult:
    """Generate one batch and put its PNGs (retried only on transient storage errors)."""
    return generate_batch(embeddings_at(store_uri), store_at(out_uri), settings, devices, batch)


def gpu_tags() -> list[str]:
    """[GPU_TAG] when the Prefect API holds a concurrency limit for it, else []. Checked once per run."""
    try:
        with get_client(sync_client=True) as client:
            client.read_concurrency_limit_by_tag(GPU_TAG)
    except ObjectNotFound:
        return []
    return [GPU_TAG]


@flow(name="generate-images", flow_run_name="generate {out_uri}", log_prints=True)
def generate_images(store_uri: str, prompts_uri: str | None, out_uri: str, pretrained_model: str | None = None,
                    global_mapper: str | None = None, local_mapper: str | None = None, encoder_id: str | None = None,
                    concept_ids: list[str] | None = None, steps: int = 100, guidance_scale: float = 5.0,
                    lambda_local: float = 0.8, height: int = 512, width: int = 512, batch_size: int = 4,
                    base_seed: int = 0, devices: list[str] | None = None, dtype: str = "auto") -> dict[str, Any]:
    """Every (stored concept, prompt, image) of the prompt file at `prompts_uri` (None: two default prompts) ->
    a PNG under `out_uri`. `concept_ids`: only these stored concepts (default: all; an asked id missing from the
    store is a failure row). `devices`: the generation slots of this worker, e.g. ["cuda:0", "cuda:1"]. Models
    left out come from ELITE_* variables. Returns the job's report (GenerateReport) as a dict."""
    capture_library_logs()
    models = resolve_models(GENERATOR_NEEDS, pretrained_model=pretrained_model, global_mapper=global_mapper,
                            local_mapper=local_mapper)
    settings = GenerationSettings(str(models["pretrained_model"]), str(models["global_mapper"]),
                                  str(models["local_mapper"]), encoder_id, steps, guidance_scale, lambda_local,
                                  height, width, dtype)
    prompts, prompt_failures = load_prompts(prompts_uri)
    slots = list(devices) if devices else cuda_devices()
    tags = gpu_tags()
    batch_task = generate_batch_task.with_options(tags=tags) if tags else generate_batch_task

    def run_batches(batches: Sequence[GenerateBatch]) -> Any:
        parameters = [{"store_uri": store_uri, "out_uri": out_uri, "settings": settings, "devices": slots,
                       "batch": batch, "label": batch_label(batch.items[0].concept_id, batch.items[-1].concept_id,
                                                            len(batch.items))} for batch in batches]
        return run_bounded(batch_task, parameters, len(slots))  # one thread per slot: never more in flight

    report = generate_catalog(embeddings_at(store_uri), prompts, store_at(out_uri), settings,
                              concept_ids=concept_ids, batch_size=batch_size, base_seed=base_seed, devices=slots,
                              prompt_failures=prompt_failures, run_batches=run_batches)
    wall = report.seconds["wall"]
    publish("generate-images", "Generate images", {
        "generated": report.generated, "skipped (already written)": report.skipped,
        "failed": len(report.failures), "planned": report.planned,
        "throughput": f"{report.generated / wall:.2f} images/s", "devices": ", ".join(slots)},
        {"images": out_uri, "manifest": report.manifest_uri, "failures": report.failures_uri}, report.failures)
    return {**dataclasses.asdict(report), "failed": len(report.failures)}
