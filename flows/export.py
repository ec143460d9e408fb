"""Flow: export selected concepts of the embedding store to sharded files and a manifest on a folder or S3.

    export_embeddings("s3://bucket/embeddings", "s3://bucket/exports/dogs", format="parquet",
                      where={"class_word": "dog"})

The flow plans with `elite.embedding_export.plan_export` (ids only; a bad format, filter or destination fails
here, before any task), runs one task per shard (the task reads its concepts from the store and puts its
file(s)), then writes `manifest.json` and a summary artifact. Formats and layouts: docs/export.md.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from elite.embedding_export import (
    DEFAULT_TOKEN_TEMPLATE,
    ExportedFile,
    ExportJob,
    plan_export,
    write_manifest,
    write_shard,
)
from elite.errors import InputError
from flows._common import RETRIES, publish_summary, retry_storage_errors, run_bounded


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_condition_fn=retry_storage_errors)  # retries: storage only
def export_shard(job: ExportJob, shard: int, concept_ids: list[str]) -> list[ExportedFile]:
    """Write one shard's file(s); returns what was written."""
    return write_shard(job, shard, concept_ids)


@flow(name="export-embeddings", log_prints=True)
def export_embeddings(store_uri: str, dest_uri: str, format: str = "parquet", concept_ids: list[str] | None = None,
                      where: dict[str, Any] | None = None, encoder_id: str | None = None, shard_size: int = 1000,
                      token_template: str = DEFAULT_TOKEN_TEMPLATE, max_concurrency: int = 4) -> dict[str, Any]:
    """Every selected concept of the store at `store_uri` -> `format` files and `manifest.json` under `dest_uri`.
    At most `max_concurrency` shards are in memory at once."""
    if max_concurrency < 1:
        raise InputError(f"max_concurrency must be at least 1, got {max_concurrency}")
    started = time.perf_counter()
    plan = plan_export(store_uri, dest_uri, format, concept_ids=concept_ids, where=where, encoder_id=encoder_id,
                       shard_size=shard_size, token_template=token_template)
    files: list[ExportedFile] = []
    parameters = [{"job": plan.job, "shard": n, "concept_ids": ids} for n, ids in enumerate(plan.shards)]
    for result in run_bounded(export_shard, parameters, max_concurrency):  # max_concurrency shards in flight
        if isinstance(result, Exception):
            raise result  # an export is whole or not at all: no manifest without every shard
        files += result
    manifest = write_manifest(plan, files)
    seconds = time.perf_counter() - started
    publish_summary("export-embeddings", "Export embeddings", {
        "exported": manifest["exported"], "shards": len(plan.shards), "files": len(files), "format": format,
        "where": plan.where or "none", "encoders": ", ".join(plan.encoder_ids),
        "throughput": f"{manifest['exported'] / seconds:.2f} concepts/s"},
        {"export": manifest["dest_uri"], "manifest": manifest["manifest_uri"]})
    return {"exported": manifest["exported"], "shards": len(plan.shards), "files": len(files), "format": format,
            "encoder_ids": plan.encoder_ids, "where": plan.where, "dest_uri": manifest["dest_uri"],
            "manifest_uri": manifest["manifest_uri"], "seconds": seconds}
