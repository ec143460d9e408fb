"""The train job: a catalog (folder, S3 prefix or manifest) -> a trained mapping network, behind `elite train` and
the train-mapper flow (docs/training.md)."""

from __future__ import annotations

from dataclasses import dataclass

from elite.data.sources import list_concepts, read_manifest
from elite.data.storage import open_store
from elite.errors import Failure
from elite.jobs.common import Locations, check_readable
from elite.training.data import ConceptDataset
from elite.training.settings import TrainSettings
from elite.training.trainer import TrainResult, train


@dataclass(frozen=True)
class TrainReport:
    result: TrainResult
    failures: list[Failure]  # bad manifest rows and listing problems (bad samples are skipped during training)


def train_catalog(concepts_uri: str, settings: TrainSettings, *, manifest: str | None = None, augment: bool = True,
                  progress: bool = True) -> TrainReport:
    """Train `settings.stage`'s mapper on the concepts of `concepts_uri` (its folder listing, or `manifest`)."""
    source = open_store(concepts_uri)
    check_readable(source, "concepts")
    refs, failures = (read_manifest(source, manifest, strict=False) if manifest
                      else list_concepts(source, "", strict=False))
    dataset = ConceptDataset(refs, Locations(source), settings.stage, settings.resolution, settings.seed,
                             augment=augment)
    return TrainReport(train(settings, dataset, progress=progress), failures)
