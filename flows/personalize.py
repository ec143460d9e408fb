"""Flow: the scheduled catalog job. Encode what is new in a catalog, then generate what is missing for it.

    personalize_catalog("s3://shop/catalog", "s3://shop/prompts.txt", "s3://shop/personalized")

Layout under `out_uri`: `embeddings/` (the embedding store, unless `store_uri` puts it elsewhere),
`images/<concept_id>/*.png` with `images/_runs/` (results manifests and failures tables of the generation runs),
`embeddings/_runs/` (failures tables of the encode runs), `_runs/personalize-<stamp>-concepts.json` (the catalog's
concept ids handed to the generate step) and `_runs/personalize-<stamp>-failures.parquet` (every failure of this
run in one table; written only when something failed). Both steps skip finished work, so a rerun
does only what is missing: concepts whose image and mask bytes are stored for this encoder are not encoded again,
images already written are not generated again, and a concept added to the catalog gets its images on the next run.

Models come from the parameters or, where a parameter is left out, from ELITE_PRETRAINED_MODEL,
ELITE_VISION_MODEL, ELITE_GLOBAL_MAPPER, ELITE_LOCAL_MAPPER and ELITE_ONNX_ENCODER in the worker's environment,
so a deployment can keep model locations in its work pool. Deployment: infra/README.md.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow

from elite.data.store import COMPACT_MIN_FILES
from elite.errors import Failure
from elite.jobs.common import put_failures, run_stamp
from elite.jobs.models import GENERATOR_NEEDS, encoder_needs, resolve_evaluation_models, resolve_models
from flows._common import capture_library_logs, publish, store_at
from flows._ray import check_runner
from flows.encode import encode_concepts
from flows.evaluate import evaluate_run
from flows.generate import generate_images


def join_uri(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


@flow(name="personalize-catalog", flow_run_name="personalize {concepts_uri}", log_prints=True)
def personalize_catalog(concepts_uri: str, prompts_uri: str | None, out_uri: str, store_uri: str | None = None,
                        manifest: str | None = None, pretrained_model: str | None = None,
                        vision_model: str | None = None, global_mapper: str | None = None,
                        local_mapper: str | None = None, engine: str = "torch", onnx_path: str | None = None,
                        steps: int = 100, guidance_scale: float = 5.0, lambda_local: float = 0.8, height: int = 512,
                        width: int = 512, encode_batch_size: int = 8, encode_concurrency: int = 2,
                        generate_batch_size: int = 4, base_seed: int = 0, devices: list[str] | None = None,
                        dtype: str = "auto", encode_device: str = "auto",
                        replace_sources: bool = False,
                        compact_min_files: int | None = COMPACT_MIN_FILES, runner: str = "threads",
                        ray_address: str | None = None, ray_stall_timeout: float = 900.0,
                        images_per_prompt: int | None = None, evaluate: bool = False,
                        clip_model: str | None = None, dino_model: str | None = None,
                        channels_last: bool | None = None, compile_backend: str | None = None) -> dict[str, Any]:
    """Encode the new concepts of `concepts_uri` (a folder, or the `manifest` key in it), then generate every
    image of the prompt file at `prompts_uri` (None: two default prompts) that the catalog's concepts lack, under
    `out_uri`/images. The encode step compacts the embedding table once `compact_min_files` small files have
    piled up (None or 0: never). `images_per_prompt`: images per concept for every prompt (default: each prompt
    line's `images`, else 1). `runner` "ray" runs both steps' batches on the Ray cluster at `ray_address`
    (default RAY_ADDRESS, else a local Ray; flows/_ray.py), "threads" on this worker. `evaluate`: then score the
    images this run generated (the evaluate-run flow: CLIP-T, CLIP-I, DINO-I with `clip_model` / `dino_model`, else
    $ELITE_CLIP_MODEL / $ELITE_DINO_MODEL, else the paper's) and publish its report as artifacts."""
    started = time.perf_counter()
    capture_library_logs()
    check_runner(runner)
    models = resolve_models(GENERATOR_NEEDS + encoder_needs(engine), pretrained_model=pretrained_model,
                            vision_model=vision_model, global_mapper=global_mapper, local_mapper=local_mapper,
                            onnx_path=onnx_path)
    if evaluate:  # the metric models are checked before any work, as the others
        models |= resolve_evaluation_models(clip_model=clip_model, dino_model=dino_model)
    store_uri = store_uri or join_uri(out_uri, "embeddings")
    images_uri = join_uri(out_uri, "images")
    encoded = encode_concepts(concepts_uri, store_uri, engine=engine, onnx_path=models["onnx_path"],
                              vision_model=models["vision_model"], global_mapper=models["global_mapper"],
                              local_mapper=models["local_mapper"], pretrained_model=models["pretrained_model"],
                              manifest=manifest, batch_size=encode_batch_size, concurrency=encode_concurrency,
                              device=encode_device, dtype=dtype, replace_sources=replace_sources,
                              compact_min_files=compact_min_files, runner=runner, ray_address=ray_address,
                              ray_stall_timeout=ray_stall_timeout)
    stamp = run_stamp()
    if encoded["concept_ids"]:
        # the catalog's ids go to the generate run as an object, not as a parameter the Prefect API stores
        ids_key = f"_runs/personalize-{stamp}-concepts.json"
        store_at(out_uri).put(ids_key, json.dumps(encoded["concept_ids"]).encode())
        generated = generate_images(store_uri, prompts_uri, images_uri, models["pretrained_model"],
                                    models["global_mapper"], models["local_mapper"],
                                    encoder_id=encoded["encoder_id"], concept_ids_uri=store_at(out_uri).uri(ids_key),
                                    runner=runner, ray_address=ray_address, ray_stall_timeout=ray_stall_timeout,
                                    steps=steps,
                                    guidance_scale=guidance_scale, lambda_local=lambda_local, height=height,
                                    width=width, batch_size=generate_batch_size, base_seed=base_seed,
                                    devices=devices, dtype=dtype, images_per_prompt=images_per_prompt,
                                    channels_last=channels_last, compile_backend=compile_backend)
    else:  # no concept of the catalog is stored (all failed, or none listed): nothing to generate, no flow run
        generated = {"generated": 0, "skipped": 0, "failures": [], "manifest_uri": None,
                     "seconds": {"model": 0.0, "io": 0.0}}
    evaluation = None
    if evaluate and generated["manifest_uri"]:
        evaluation = evaluate_run(generated["manifest_uri"], store_uri=store_uri, clip_model=models["clip_model"],
                                  dino_model=models["dino_model"], device=encode_device, dtype=dtype)
    failures = [Failure(**row) for row in encoded["failures"] + generated["failures"]]
    failures += [Failure(**row) for row in evaluation["failures"]] if evaluation else []
    failures_uri = put_failures(store_at(out_uri), f"_runs/personalize-{stamp}-failures.parquet", failures)
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {
        "encoded": encoded["done"], "encode_skipped": encoded["skipped"], "concepts": len(encoded["concept_ids"]),
        "generated": generated["generated"], "generate_skipped": generated["skipped"], "failed": len(failures),
        "failures": [f.row() for f in failures], "failures_uri": failures_uri, "store_uri": store_uri,
        "images_uri": images_uri, "manifest_uri": generated["manifest_uri"], "encoder_id": encoded["encoder_id"],
        "seconds": {kind: encoded["seconds"].get(kind, 0.0) + generated["seconds"].get(kind, 0.0)
                    for kind in ("model", "io")} | {"wall": seconds}, "evaluation": evaluation}
    publish("personalize-catalog", "Personalize catalog", {
        "concepts encoded": encoded["done"], "concepts already stored": encoded["skipped"],
        "images generated": generated["generated"], "images already written": generated["skipped"],
        "failed": len(failures), "wall time": f"{seconds:.1f} s",
        "throughput": f"{generated['generated'] / seconds:.2f} images/s"},
        {"images": images_uri, "embedding store": store_uri, "results manifest": generated["manifest_uri"],
         "evaluation report": evaluation["report_uri"] if evaluation else None, "failures": failures_uri},
        [])  # the subflows published their failures already
    return report
