"""Open Images V6 instance segmentations, the layout the paper's mappers were trained on, as training concepts.

    refs, failures = open_images_concepts(open_store("/data/open-images"), split="test", stage="global")

The dataset as its downloads unpack (https://storage.googleapis.com/openimages/web/download_v6.html), in one
folder or S3 prefix:

    <split>-annotations-object-segmentation.csv   MaskPath, ImageID, LabelName, BoxID, BoxXMin .. BoxYMax, ...
    oidv6-class-descriptions.csv                  LabelName, DisplayName (optional: the class words)
    <split>/<ImageID>.jpg                         the images
    <split>-masks/**/<MaskPath>                   the mask PNGs (each zip unpacked here, in subfolders or not)

Each annotation row is one concept (`<ImageID>_<BoxID>`): its image, its instance mask and the class's display name
as class word. The mask PNGs are not stored at their image's size: training resizes them to the image, nearest
neighbour (ConceptDataset `masks_any_size`), as the authors' data scripts do. Stage 1 keeps boxes of 2-80% of the
image's area (method doc); stage 2's at-least-100-pixels rule needs the image's size and is applied when a sample is
read (ConceptDataset `min_box`). A row that cannot be used (bad numbers, mask or image not in the listing) is a
Failure; the rest train.
"""

from __future__ import annotations

import logging
import posixpath

from elite.data.objects import ObjectStore
from elite.data.sources import ConceptRef, csv_rows
from elite.errors import Failure, InputError
from elite.training.data import Stage

logger = logging.getLogger(__name__)

REQUIRED = ("MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")
CLASS_FILES = ("oidv6-class-descriptions.csv", "class-descriptions-boxable.csv", "class-descriptions.csv")
BOX_AREA = (0.02, 0.8)  # stage 1: fraction of the image's area (method doc)
MIN_BOX_PIXELS = 100  # stage 2: the box's shorter side, in the image's pixels (method doc)


def open_images_concepts(store: ObjectStore, split: str = "test", stage: Stage = "global",
                         limit: int | None = None) -> tuple[list[ConceptRef], list[Failure]]:
    """The split's instance segmentations as concepts (at most `limit`, in file order) and the rows left out."""
    if split not in ("train", "validation", "test"):
        raise InputError(f"split must be train, validation or test, got {split!r}")
    annotations = f"{split}-annotations-object-segmentation.csv"
    if not store.exists(annotations):
        raise InputError(f"{store.uri(annotations)}: not found (an Open Images V6 folder has the split's "
                         f"segmentation annotations there)")
    images = {posixpath.basename(info.key): info.key for info in store.list(f"{split}/")}
    masks = {posixpath.basename(info.key): info.key for info in store.list(f"{split}-masks/")}
    if not images or not masks:
        raise InputError(f"{store.uri()}: no {'images' if not images else 'masks'} under "
                         f"{split + '/' if not images else split + '-masks/'}")
    names = class_names(store)
    refs: list[ConceptRef] = []
    failures: list[Failure] = []
    text = store.get(annotations).decode("utf-8-sig")
    for line, row in csv_rows(text, store.uri(annotations), "annotation file", REQUIRED):
        where = f"{store.uri(annotations)}:{line}"
        if isinstance(row, str):
            failures.append(Failure("", where, "manifest", row))
            continue
        concept_id = f"{row['ImageID']}_{row['BoxID']}"
        reason, area = _unusable(row, images, masks)
        if reason:
            failures.append(Failure(concept_id, where, "manifest", reason))
            continue
        if stage == "global" and not BOX_AREA[0] <= area <= BOX_AREA[1]:  # out of stage 1's range: not a failure
            continue
        refs.append(ConceptRef(concept_id, images[f"{row['ImageID']}.jpg"], masks[row["MaskPath"]],
                               names.get(row["LabelName"]), {"label": row["LabelName"]}))
        if limit is not None and len(refs) >= limit:
            break
    logger.info("Open Images %s: %d concepts, %d rows left out", split, len(refs), len(failures))
    return refs, failures


def _unusable(row: dict[str, str], images: dict[str, str], masks: dict[str, str]) -> tuple[str | None, float]:
    """(why the row cannot be used, or None; its box's fraction of the image's area)."""
    try:
        left, right, top, bottom = (float(row[name]) for name in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"))
    except ValueError:
        return "box coordinates are not numbers", 0.0
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        return f"box ({left}, {top}, {right}, {bottom}) is not inside the image (normalised coordinates)", 0.0
    if f"{row['ImageID']}.jpg" not in images:
        return f"image {row['ImageID']}.jpg is not in the images folder", 0.0
    if row["MaskPath"] not in masks:
        return f"mask {row['MaskPath']} is not in the masks folder", 0.0
    return None, (right - left) * (bottom - top)


def class_names(store: ObjectStore) -> dict[str, str]:
    """LabelName (MID) -> lower-case display name, from the first class-description file there ({} if none)."""
    for name in CLASS_FILES:
        if store.exists(name):
            lines = store.get(name).decode("utf-8-sig").splitlines()
            rows = [line.split(",", 1) for line in lines if "," in line]
            return {mid: display.strip().strip('"').lower() for mid, display in rows if mid.startswith("/")}
    return {}
