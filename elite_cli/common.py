"""What the commands share: models from options and environment, and how failed items are printed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from elite.errors import Failure
from elite.jobs.models import MODEL_ENV, resolve_models


def models_of(args: argparse.Namespace, needed: tuple[str, ...], **overrides: str | None) -> dict[str, str | None]:
    """The model locations of a command: its options (or `overrides`), else the ELITE_* variables; `needed` ones
    must be there (elite.jobs.models.resolve_models)."""
    given = {name: getattr(args, name, None) for name in MODEL_ENV} | overrides
    return resolve_models(needed, **given)


def print_failures(failures: Sequence[Failure]) -> None:
    for failure in failures:
        print(f"FAILED {failure.concept_id or '-'} ({failure.stage}) {failure.uri}: {failure.reason}", file=sys.stderr)


def evaluation_summary(report: Any) -> str:
    """Lines about an evaluation (elite.jobs.evaluate.EvaluateReport): its means beside the paper's, and where the
    tables and the report are."""
    from elite.evaluation import METRIC_LABELS, METRICS, PAPER_TABLE1  # no model code

    means = ", ".join(f"{METRIC_LABELS[name]} " + ("-" if report.overall[name] is None else
                                                   f"{report.overall[name]:.3f}") for name in METRICS)
    paper = ", ".join(f"{PAPER_TABLE1[name]}" for name in METRICS)
    return (f"evaluated {report.evaluated} of {report.images} images of {report.name} ({len(report.failures)} "
            f"failed): {means} (paper: {paper})\n  report: {report.report_uri}\n  summary: {report.summary_uri}"
            + (f"\n  metrics: {report.metrics_uri}" if report.metrics_uri else "")
            + (f"\n  failures: {report.failures_uri}" if report.failures_uri else ""))
