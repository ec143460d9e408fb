"""Training examples from a catalog: object crops with their masks, the paper's augmentations and prompt templates.

    refs = list_concepts(open_store("s3://shop/catalog"))          # N.jpg + N_bg.png, or a manifest
    data = ConceptDataset(refs, Locations(store), stage="global", resolution=512)
    batch = collate([data[i] for i in range(4)])                  # bad samples are None and dropped here

Each example crops the object's box (from its mask; the whole image without one) with padding, then augments
(method doc, "Reference training settings"): stage 1 ("global") flips, rotates within 20 degrees and blurs;
stage 2 ("local") scales the object down on black and says so in its prompt ("a far away S"). The CLIP inputs are
made by the encoder's own preprocessing (elite.model.preprocessing), so training sees what inference sees.
Images without a mask train stage 1 only. A sample that cannot be used (corrupt image, mask missing in stage 2,
empty mask) is logged with its reason and skipped; the epoch goes on.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from elite.data.sources import ConceptRef
from elite.errors import EliteError, InputError
from elite.jobs.common import Locations
from elite.model.preprocessing import ConceptPreprocessor, find_object, open_image, to_rgb

logger = logging.getLogger(__name__)

Stage = Literal["global", "local"]
PLACEHOLDER = "S"
# textual inversion's small ImageNet templates, as the reference trains with
TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
             "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
             "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
             "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
             "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
             "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
             "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}", "a photo of a cool {}",
             "a photo of a small {}")
FAR_PREFIXES = ("a far away", "very small")  # stage 2: the object scaled down
NEAR_PREFIXES = ("zoomed in", "close up")  # stage 2: the object filling the frame
PADDING = 0.1  # of the box's size on each side, around the object's box


@dataclass(frozen=True)
class TrainingExample:
    concept_id: str
    pixel_values: torch.Tensor  # (3, 224, 224) CLIP-normalised crop
    object_pixel_values: torch.Tensor  # (3, 224, 224) CLIP-normalised crop x mask
    mask_grid: torch.Tensor  # (16, 16) object patches
    vae_pixels: torch.Tensor  # (3, resolution, resolution) in [-1, 1]
    latent_mask: torch.Tensor  # (resolution / 8, resolution / 8) object at latent resolution
    prompt: str  # a template with the placeholder


class ConceptDataset(torch.utils.data.Dataset[TrainingExample | None]):
    """Catalog concepts as training examples; `stage` "local" keeps only concepts with a mask."""

    def __init__(self, refs: Sequence[ConceptRef], locations: Locations, stage: Stage = "global",
                 resolution: int = 512, seed: int = 0, augment: bool = True) -> None:
        if stage not in ("global", "local"):
            raise InputError(f"stage must be 'global' or 'local', got {stage!r}")
        if resolution % 8 or resolution < 64:
            raise InputError(f"resolution must be a multiple of 8 of at least 64, got {resolution}")
        unmasked = [ref.concept_id for ref in refs if ref.mask is None]
        if stage == "local" and unmasked:
            logger.warning("%d concept(s) have no mask and train stage 1 only: %s", len(unmasked),
                           ", ".join(unmasked[:5]) + (" ..." if len(unmasked) > 5 else ""))
        self.refs = [ref for ref in refs if stage == "global" or ref.mask is not None]
        if not self.refs:
            raise InputError(f"no concepts to train stage {stage!r} on" + (" (it needs masks)" if unmasked else ""))
        self.locations, self.stage, self.resolution = locations, stage, resolution
        self.seed, self.augment = seed, augment
        self.preprocessor = ConceptPreprocessor()
        self.epoch = 0  # set by the trainer: each epoch augments differently, reproducibly

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> TrainingExample | None:
        ref = self.refs[index]
        try:
            return self._example(ref, random.Random(f"{self.seed}:{self.epoch}:{index}"))
        except EliteError as err:
            logger.warning("skipped training sample %s: %s", ref.concept_id, err)
            return None

    def _example(self, ref: ConceptRef, rng: random.Random) -> TrainingExample:
        photo = open_image(self.locations.get(ref.image), self.locations.uri(ref.image))
        mask_image = None if ref.mask is None else open_image(self.locations.get(ref.mask),
                                                              self.locations.uri(ref.mask))
        mask = find_object(photo, mask_image, self.locations.uri(ref.mask or ref.image))  # the encoder's rule
        image = to_rgb(photo)
        image, mask = _crop(image, mask)
        template = rng.choice(TEMPLATES).format(PLACEHOLDER)
        if self.augment and self.stage == "global":
            image, mask = _augment_global(image, mask, rng)
        elif self.augment:
            scale = rng.uniform(0.5, 1.0)
            image, mask = _scale_down(image, mask, scale)
            prefix = rng.choice(FAR_PREFIXES) if scale < 0.7 else rng.choice(NEAR_PREFIXES) if scale > 0.9 else ""
            template = f"{prefix} {template}" if prefix else template
        mask_picture = Image.fromarray(mask.astype(np.uint8) * 255)
        prepared = self.preprocessor(image, mask_picture, name=ref.concept_id)
        size = (self.resolution, self.resolution)
        vae = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        latent = self.resolution // 8
        latent_mask = torch.from_numpy(np.asarray(mask_picture.resize((latent, latent), Image.Resampling.NEAREST))
                                       > 0).float()
        return TrainingExample(ref.concept_id, prepared.pixel_values, prepared.object_pixel_values,
                               prepared.mask_grid, torch.from_numpy(vae).permute(2, 0, 1).contiguous(), latent_mask,
                               template)


def _crop(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The object's box with PADDING around it, made square (the UNet and CLIP take squares)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = int(max(bottom - top, right - left) * (1 + 2 * PADDING))
    centre_y, centre_x = (top + bottom) // 2, (left + right) // 2
    box = (centre_x - side // 2, centre_y - side // 2, centre_x - side // 2 + side, centre_y - side // 2 + side)
    cropped = image.crop(box)  # outside the image: black
    mask_crop = Image.fromarray(mask.astype(np.uint8) * 255).crop(box)
    return cropped, np.asarray(mask_crop) > 0


def _augment_global(image: Image.Image, mask: np.ndarray, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """Stage 1: horizontal flip, rotation within 20 degrees, blur (the reference's CLIP-side augmentations)."""
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    if rng.random() < 0.5:
        image, picture = (p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in (image, picture))
    angle = rng.uniform(-20.0, 20.0)
    image = image.rotate(angle, Image.Resampling.BILINEAR)
    picture = picture.rotate(angle, Image.Resampling.NEAREST)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    rotated = np.asarray(picture) > 0
    return image, rotated if rotated.any() else mask  # a sliver rotated out of frame keeps its mask


def _scale_down(image: Image.Image, mask: np.ndarray, scale: float) -> tuple[Image.Image, np.ndarray]:
    """Stage 2: the crop shrunk by `scale` in the middle of a black square of its size."""
    side = image.width
    small = max(8, int(side * scale))
    canvas, picture = Image.new("RGB", (side, side)), Image.new("L", (side, side))
    offset = ((side - small) // 2, (side - small) // 2)
    canvas.paste(image.resize((small, small), Image.Resampling.BICUBIC), offset)
    picture.paste(Image.fromarray(mask.astype(np.uint8) * 255).resize((small, small), Image.Resampling.NEAREST),
                  offset)
    return canvas, np.asarray(picture) > 0


def collate(examples: Sequence[TrainingExample | None]) -> dict[str, torch.Tensor | list[str]] | None:
    """A batch of the usable examples (None: every one was skipped)."""
    usable = [e for e in examples if e is not None]
    if not usable:
        return None
    return {"concept_ids": [e.concept_id for e in usable], "prompts": [e.prompt for e in usable],
            "pixel_values": torch.stack([e.pixel_values for e in usable]),
            "object_pixel_values": torch.stack([e.object_pixel_values for e in usable]),
            "mask_grid": torch.stack([e.mask_grid for e in usable]),
            "vae_pixels": torch.stack([e.vae_pixels for e in usable]),
            "latent_mask": torch.stack([e.latent_mask for e in usable])}
