"""Flow: generate images for stored concepts from a prompt file, skipping images already written.

    generate_images("s3://bucket/embeddings", "s3://bucket/prompts.txt", "s3://bucket/images",
                    pretrained_model=..., global_mapper=..., local_mapper=..., encoder_id=...)

A thin shell over `elite.jobs.generate.generate_catalog` (the same job `elite generate` runs, same layout and
manifests): each batch is a Prefect task, retried only on transient storage errors, run by one of two runners:

- `runner="threads"` (default): over this worker's generation slots (`devices`, default every CUDA GPU, else the
  CPU; a device named twice is two slots);
- `runner="ray"`: on the Ray cluster at `ray_address` (flows/_ray.py), one GPU per batch, each Ray worker process
  loading the pipeline once and writing its PNGs and manifest rows straight to `out_uri`.

`prefect concurrency-limit create elite-gpu N` caps generation batches across every worker and flow run of a
Prefect server: while that limit exists, tasks carry the tag `elite-gpu` (docs in infra/README.md). Without it
they carry no tag: Prefect asks its API for a slot before every tagged task, limit or not, which cost 15-90 ms
per batch in benchmarks/bench_orchestration.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from elite.data.prompts import load_prompts
from elite.data.storage import open_object
from elite.errors import InputError
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
from flows._ray import RayOptions, check_runner, in_ray_worker, ray_device, run_on_ray, worker_devices

GPU_TAG = "elite-gpu"


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      task_run_name="generate {label}")
def generate_batch_task(store_uri: str, out_uri: str, settings: GenerationSettings, devices: list[str] | None,
                        batch: GenerateBatch, label: str) -> GenerateBatchResult:
    """Generate one batch and put its PNGs (retried only on transient storage errors). `devices` None: the device
    of the process it runs in (on a Ray worker, the GPU Ray gave it)."""
    capture_library_logs()  # a Ray worker is a process of its own
    slots = devices or (worker_devices() if in_ray_worker() else cuda_devices())
    return generate_batch(embeddings_at(store_uri), store_at(out_uri), settings, slots, batch)


def read_concept_ids(uri: str) -> list[str]:
    """Concept ids from an object: a JSON array of strings (`.json`), else text with one id per line (blank lines
    ignored). How a caller hands over a long list without making it a flow-run parameter."""
    store, key = open_object(uri)
    try:
        text = store.get(key).decode("utf-8")
        if not key.endswith(".json"):
            return [line.strip() for line in text.splitlines() if line.strip()]
        ids = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"concept id list {uri}: not UTF-8 text or not JSON ({err})") from err
    if not isinstance(ids, list) or not all(isinstance(cid, str) for cid in ids):
        raise InputError(f"concept id list {uri}: expected a JSON array of strings")
    return ids


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
                    base_seed: int = 0, devices: list[str] | None = None, dtype: str = "auto",
                    concept_ids_uri: str | None = None, runner: str = "threads", ray_address: str | None = None,
                    ray_stall_timeout: float = 900.0, images_per_prompt: int | None = None,
                    channels_last: bool | None = None, compile_backend: str | None = None) -> dict[str, Any]:
    """Every (stored concept, prompt, image) of the prompt file at `prompts_uri` (None: two default prompts) ->
    a PNG under `out_uri`. `concept_ids`: only these stored concepts (default: all; an asked id missing from the
    store is a failure row); `concept_ids_uri`: the same, read from an object (a JSON array, or one id per line; for
    long lists: a flow-run parameter is stored by the Prefect API). `devices`: the generation slots of this worker,
    e.g. ["cuda:0", "cuda:1"]; with `runner="ray"`, "cpu" or "cuda" for what each batch asks Ray for.
    `runner`: "threads" (this worker's devices) or "ray" (the cluster at `ray_address`, default RAY_ADDRESS, else
    a local Ray; `ray_stall_timeout`: seconds with no batch finished before the unfinished ones become failures).
    `images_per_prompt`: images per concept for every prompt (default: each prompt line's `images`, else 1).
    `channels_last` (None: on CUDA) and `compile_backend` (torch.compile the UNet): docs/gpu.md.
    Models left out come from ELITE_* variables. Returns the job's report (GenerateReport) as a dict."""
    capture_library_logs()
    check_runner(runner)
    ray_options = RayOptions(ray_address, ray_stall_timeout) if runner == "ray" else None
    if concept_ids_uri is not None:
        if concept_ids is not None:
            raise InputError("give concept_ids or concept_ids_uri, not both")
        concept_ids = read_concept_ids(concept_ids_uri)
    models = resolve_models(GENERATOR_NEEDS, pretrained_model=pretrained_model, global_mapper=global_mapper,
                            local_mapper=local_mapper)
    settings = GenerationSettings(str(models["pretrained_model"]), str(models["global_mapper"]),
                                  str(models["local_mapper"]), encoder_id, steps, guidance_scale, lambda_local,
                                  height, width, dtype, channels_last=channels_last,
                                  compile_backend=compile_backend)
    prompts, prompt_failures = load_prompts(prompts_uri, images_per_prompt)
    if ray_options is not None:
        want = ray_device(devices or ["auto"])
        slots = [f"ray:{want}"]  # for the report; each manifest row names the device its image was made on
    else:
        slots = list(devices) if devices else cuda_devices()
    tags = gpu_tags()
    batch_task = generate_batch_task.with_options(tags=tags) if tags else generate_batch_task

    def run_batches(batches: Sequence[GenerateBatch]) -> Any:
        parameters = [{"store_uri": store_uri, "out_uri": out_uri, "settings": settings,
                       "devices": None if ray_options else slots,
                       "batch": batch, "label": batch_label(batch.items[0].concept_id, batch.items[-1].concept_id,
                                                            len(batch.items))} for batch in batches]
        if ray_options is not None:
            return run_on_ray(batch_task, parameters, want, ray_options)
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
