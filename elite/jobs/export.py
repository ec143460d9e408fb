"""The export job: the embedding store (whole or filtered) -> sharded files and a manifest on a folder or S3.

    export_embeddings("embeddings/", "s3://bucket/exports/dogs", "parquet", where={"class_word": "dog"})

Formats and layouts: elite.data.export and docs/export.md. `elite export` runs the shards one after the other, the
`export_embeddings` flow as Prefect tasks; either way the manifest is written last, only when every shard is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from elite.data.export import (
    DEFAULT_TOKEN_TEMPLATE,
    ExportedFile,
    ExportJob,
    ExportPlan,
    plan_export,
    write_manifest,
    write_shard,
)
from elite.jobs.common import BatchRunner, run_sequentially

Shard = tuple[ExportJob, int, list[str]]  # (what to write, shard number, its concept ids)


def export_embeddings(store_uri: str | os.PathLike[str], dest_uri: str | os.PathLike[str],
                      format: str = "parquet", *, concept_ids: Sequence[str] | None = None,
                      where: Mapping[str, Any] | None = None, encoder_id: str | None = None,
                      shard_size: int = 1000, token_template: str = DEFAULT_TOKEN_TEMPLATE,
                      version: int | None = None,
                      run_shards: BatchRunner[Shard, list[ExportedFile]] | None = None) -> dict[str, Any]:
    """Plan (a bad format, filter or destination fails here, before any file), write every shard, then the
    manifest; returns the manifest with `manifest_uri` and the plan's shard count added. A shard that fails (after
    the runner's retries) fails the export: no manifest without every shard."""
    plan: ExportPlan = plan_export(store_uri, dest_uri, format, concept_ids=concept_ids, where=where,
                                   encoder_id=encoder_id, shard_size=shard_size, token_template=token_template,
                                   version=version)
    runner = run_shards or run_sequentially(lambda shard: write_shard(*shard))
    files: list[ExportedFile] = []
    for result in runner([(plan.job, n, ids) for n, ids in enumerate(plan.shards)]):
        if isinstance(result, Exception):
            raise result
        files += result
    return {**write_manifest(plan, files), "shard_count": len(plan.shards), "file_count": len(files)}
