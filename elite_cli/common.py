"""What the commands share: models from options and environment, and how failed items are printed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
