"""Flow: export selected concepts of the embedding store to sharded files and a manifest on a folder or S3.

    export_embeddings("s3://bucket/embeddings", "s3://bucket/exports/dogs", format="parquet",
                      where={"class_word": "dog"})

A thin shell over `elite.jobs.export.export_embeddings` (the job `elite export` runs): one task per shard (the
task reads its concepts from the store and puts its file(s)), retried only on transient storage errors; then
`manifest.json` and a summary artifact. Formats and layouts: docs/export.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from elite.data.export import DEFAULT_TOKEN_TEMPLATE, ExportedFile, ExportJob, write_shard
from elite.errors import InputError
from elite.jobs.export import Shard
from elite.jobs.export import export_embeddings as export_job
from flows._common import RETRIES, RETRY_DELAYS, capture_library_logs, publish, retry_transient, run_bounded


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      task_run_name="export shard {shard}")
def export_shard(job: ExportJob, shard: int, concept_ids: list[str]) -> list[ExportedFile]:
    """Write one shard's file(s); returns what was written."""
    return write_shard(job, shard, concept_ids)


@flow(name="export-embeddings", flow_run_name="export {store_uri} to {dest_uri}", log_prints=True)
def export_embeddings(store_uri: str, dest_uri: str, format: str = "parquet", concept_ids: list[str] | None = None,
                      where: dict[str, Any] | None = None, encoder_id: str | None = None, shard_size: int = 1000,
                      token_template: str = DEFAULT_TOKEN_TEMPLATE, max_concurrency: int = 4,
                      version: int | None = None) -> dict[str, Any]:
    """Every selected concept of the store at `store_uri` -> `format` files and `manifest.json` under `dest_uri`.
    At most `max_concurrency` shards are in memory at once. One table version is read: `version`, or the newest
    when the export starts."""
    if max_concurrency < 1:
        raise InputError(f"max_concurrency must be at least 1, got {max_concurrency}")
    capture_library_logs()
    started = time.perf_counter()

    def run_shards(shards: Sequence[Shard]) -> Any:
        return run_bounded(export_shard, [{"job": job, "shard": n, "concept_ids": ids} for job, n, ids in shards],
                           max_concurrency)

    manifest = export_job(store_uri, dest_uri, format, concept_ids=concept_ids, where=where, encoder_id=encoder_id,
                          shard_size=shard_size, token_template=token_template, version=version,
                          run_shards=run_shards)
    seconds = time.perf_counter() - started
    publish("export-embeddings", "Export embeddings", {
        "exported": manifest["exported"], "shards": manifest["shard_count"], "files": manifest["file_count"],
        "format": format, "where": manifest["where"] or "none", "encoders": ", ".join(manifest["encoder_ids"]),
        "table version": manifest["store_version"],
        "throughput": f"{manifest['exported'] / seconds:.2f} concepts/s"},
        {"export": manifest["dest_uri"], "manifest": manifest["manifest_uri"]}, [])
    return {"exported": manifest["exported"], "shards": manifest["shard_count"], "files": manifest["file_count"],
            "format": format, "encoder_ids": manifest["encoder_ids"], "where": manifest["where"],
            "dest_uri": manifest["dest_uri"], "manifest_uri": manifest["manifest_uri"],
            "store_version": manifest["store_version"], "seconds": seconds}
