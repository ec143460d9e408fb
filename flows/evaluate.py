"""Flow: evaluate a generation run (CLIP-T, CLIP-I, DINO-I), write its tables and report, publish them.

    evaluate_run("s3://shop/personalized/images/_runs/generate-20261203T101010123456Z.parquet")

A thin shell over `elite.jobs.evaluate.evaluate_run` (the job `elite evaluate` runs; same tables, report and
layout): each batch of images is a Prefect task on this worker, retried only on transient storage errors. Then
artifacts: a link to the HTML report (a presigned HTTPS link, valid 7 days, for a report on S3), a table of the
aggregates (overall and per concept), and the failures table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from elite.data.objects import ObjectStore
from elite.data.s3 import S3Store
from elite.data.storage import open_object
from elite.errors import EliteError
from elite.evaluation import METRIC_LABELS, METRICS, PAPER_TABLE1
from elite.jobs.evaluate import EvalBatch, EvalBatchResult, EvaluateReport, EvaluationSettings, evaluate_batch
from elite.jobs.evaluate import evaluate_run as evaluate_job
from elite.jobs.models import resolve_evaluation_models
from flows._common import (
    RETRIES,
    RETRY_DELAYS,
    batch_label,
    capture_library_logs,
    publish,
    retry_transient,
    run_bounded,
    store_at,
)

AGGREGATE_ROWS = 200  # rows of the aggregates table artifact (overall first, then concepts): the UI shows a page


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      task_run_name="evaluate {label}")
def evaluate_batch_task(root_uri: str, settings: EvaluationSettings, batch: EvalBatch, label: str) -> EvalBatchResult:
    """Score one batch of a run's images (retried only on transient storage errors)."""
    capture_library_logs()
    return evaluate_batch(store_at(root_uri), settings, batch)


def report_link(uri: str) -> str:
    """A link a browser opens: a file:// URI as it is, an object on S3 as a presigned HTTPS URL (7 days), or the
    s3:// URI where it cannot be signed (no credentials)."""
    try:
        store, key = open_object(uri)
        return store.presigned_url(key) if isinstance(store, S3Store) else uri
    except EliteError:
        return uri


def _table_value(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def publish_evaluation(report: EvaluateReport) -> None:
    """The report as a link artifact, the aggregates (overall, per concept, then per prompt; the paper's values in
    the first row) as a table artifact, and the counts, outputs and failures (flows._common.publish)."""
    create_link_artifact(report_link(report.report_uri), link_text=f"Evaluation report {report.name}",
                         key="evaluation-report", description=f"{report.evaluated} images of {report.run_uri}")
    paper = {"level": "paper (ELITE, Table 1)", "key": "", "images": None} | dict(PAPER_TABLE1)
    rows = [paper, *report.aggregates[:AGGREGATE_ROWS]]
    create_table_artifact([{name: _table_value(row.get(name)) for name in ("level", "key", "images", *METRICS)}
                           for row in rows], key="evaluation-aggregates",
                          description=f"Metrics of {report.name} (means; {len(report.aggregates)} rows in "
                                      f"{report.aggregates_uri})")
    counts: dict[str, Any] = {"images evaluated": report.evaluated, "images in the run": report.images,
                              "failed": len(report.failures)}
    counts |= {METRIC_LABELS[name]: "-" if report.overall[name] is None else f"{report.overall[name]:.4f} "
               f"(paper {PAPER_TABLE1[name]})" for name in METRICS}
    publish("evaluate-run", f"Evaluate {report.name}", counts,
            {"report": report.report_uri, "summary": report.summary_uri, "metrics": report.metrics_uri,
             "aggregates": report.aggregates_uri, "failures": report.failures_uri}, report.failures)


def as_dict(report: EvaluateReport) -> dict[str, Any]:
    """The job's report as flow-run output (JSON-friendly; no thumbnails)."""
    return {"name": report.name, "run_uri": report.run_uri, "evaluated": report.evaluated, "images": report.images,
            "failed": len(report.failures), "failures": [f.row() for f in report.failures], "overall": report.overall,
            "metrics_uri": report.metrics_uri, "aggregates_uri": report.aggregates_uri,
            "failures_uri": report.failures_uri, "report_uri": report.report_uri, "summary_uri": report.summary_uri,
            "compare": None if report.compare is None else as_dict(report.compare), "seconds": report.seconds}


@flow(name="evaluate-run", flow_run_name="evaluate {run_uri}", log_prints=True)
def evaluate_run(run_uri: str, store_uri: str | None = None, compare_uri: str | None = None,
                 clip_model: str | None = None, dino_model: str | None = None, batch_size: int = 32,
                 device: str = "auto", dtype: str = "auto", class_word: str = "object",
                 report_concepts: int = 100) -> dict[str, Any]:
    """Evaluate the images of `run_uri` (a results manifest, `<images>/_runs/generate-<time>.parquet`, or an images
    folder) against their concepts' source images (from the embedding store the run read, or `store_uri`), and
    `compare_uri` the same way, shown side by side in the report. Metric models: `clip_model` / `dino_model`, else
    $ELITE_CLIP_MODEL / $ELITE_DINO_MODEL, else the paper's (openai/clip-vit-base-patch32, facebook/dino-vits16).
    `class_word`: CLIP-T's word for concepts stored without one. Returns the job's report as a dict."""
    capture_library_logs()
    models = resolve_evaluation_models(clip_model=clip_model, dino_model=dino_model)
    settings = EvaluationSettings(models["clip_model"], models["dino_model"], device, dtype, class_word)

    def run_batches(root: ObjectStore) -> Any:
        def run(batches: Sequence[EvalBatch]) -> Any:
            parameters = [{"root_uri": root.uri(), "settings": settings, "batch": batch,
                           "label": batch_label(batch.items[0].concept_id, batch.items[-1].concept_id,
                                                len(batch.items))} for batch in batches]
            return run_bounded(evaluate_batch_task, parameters, 1)  # one device: batches one after the other
        return run

    report = evaluate_job(run_uri, settings, store_uri=store_uri, compare=compare_uri, batch_size=batch_size,
                          report_concepts=report_concepts, run_batches=run_batches)
    publish_evaluation(report)
    return as_dict(report)
