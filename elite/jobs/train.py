"""The train job: a catalog (folder, S3 prefix or manifest) or an Open Images V6 folder -> a trained mapping network,
behind `elite train` and the train-mapper flow (docs/training.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from elite.data.sources import list_concepts, read_manifest
from elite.data.storage import open_store
from elite.errors import Failure, InputError, check_integer
from elite.jobs.common import Locations, check_readable
from elite.training.data import ConceptDataset
from elite.training.openimages import MIN_BOX_PIXELS, open_images_concepts
from elite.training.settings import TrainSettings
from elite.training.trainer import TrainResult, train

Layout = Literal["catalog", "openimages"]


@dataclass(frozen=True)
class TrainReport:
    result: TrainResult
    failures: list[Failure]  # bad manifest/annotation rows (bad samples are skipped during training)


def train_catalog(concepts_uri: str, settings: TrainSettings, *, manifest: str | None = None, augment: bool = True,
                  layout: Layout = "catalog", split: str = "test", limit: int | None = None,
                  progress: bool = True) -> TrainReport:
    """Train `settings.stage`'s mapper on the concepts of `concepts_uri`: its folder listing or `manifest`
    (layout "catalog"), or the Open Images V6 `split` there (layout "openimages"), at most `limit` concepts."""
    if layout not in ("catalog", "openimages"):
        raise InputError(f"layout must be catalog or openimages, got {layout!r}")
    if layout == "openimages" and manifest:
        raise InputError("an Open Images folder is read from its annotation file: no manifest")
    if limit is not None:
        check_integer("limit", limit, 1)
    source = open_store(concepts_uri)
    check_readable(source, "concepts")
    if layout == "openimages":
        refs, failures = open_images_concepts(source, split, settings.stage, limit)
    else:
        refs, failures = (read_manifest(source, manifest, strict=False) if manifest
                          else list_concepts(source, "", strict=False))
        refs = refs[:limit] if limit is not None else refs
    openimages = layout == "openimages"
    dataset = ConceptDataset(refs, Locations(source), settings.stage, settings.resolution, settings.seed,
                             augment=augment, masks_any_size=openimages,
                             min_box=MIN_BOX_PIXELS if openimages and settings.stage == "local" else 0)
    return TrainReport(train(settings, dataset, progress=progress), failures)
