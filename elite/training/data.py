"""Training examples from a catalog: object crops with their masks, the paper's augmentations and prompt templates.

    refs = list_concepts(open_store("s3://shop/catalog"))          # N.jpg + N_bg.png, or a manifest
    data = ConceptDataset(refs, Locations(store), stage="global", resolution=512)
    batch = collate([data[i] for i in range(4)])                  # bad samples are None and dropped here

Each example crops the object's box (from its mask; the whole image without one) with padding, then augments
(method doc, "Reference training settings"): stage 1 ("global") flips, rotates within 20 degrees, blurs and
elastically warps the CLIP input only (the UNet reconstructs the crop as it is: the mapper learns to see through
the augmentations); stage 2 ("local") scales the object down on black, for the UNet and CLIP alike, and says so in
its prompt ("a far away S"). `masks_any_size` (Open Images, whose mask PNGs are not stored at the image's size)
resizes a mask of the image's aspect to the image, nearest neighbour, as the authors' data scripts do; `min_box`
skips objects whose box has a side under that many pixels (stage 2 on Open Images: 100). The CLIP
inputs are made by the encoder's own preprocessing (elite.model.preprocessing), so training sees what inference sees.
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
import torch.nn.functional as F
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
CLIP_SIZE = 224  # stage 1 augments the CLIP input at the size CLIP sees
ELASTIC = (0.25, 30.0, 5.0)  # probability, displacement scale and smoothness (pixels at CLIP_SIZE)
ASPECT_TOLERANCE = 0.02  # masks_any_size: a mask's aspect ratio may differ from the image's by this much


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
    """Catalog concepts as training examples; `stage` "local" keeps only concepts with a mask. Index with an int
    (epoch 0) or an (epoch, index) pair: each epoch augments differently, reproducibly, in any worker process."""

    def __init__(self, refs: Sequence[ConceptRef], locations: Locations, stage: Stage = "global",
                 resolution: int = 512, seed: int = 0, augment: bool = True, masks_any_size: bool = False,
                 min_box: int = 0) -> None:
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
        self.seed, self.augment, self.masks_any_size, self.min_box = seed, augment, masks_any_size, min_box
        self.preprocessor = ConceptPreprocessor()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: int | tuple[int, int]) -> TrainingExample | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        ref = self.refs[index]
        try:
            return self._example(ref, random.Random(f"{self.seed}:{epoch}:{index}"))
        except EliteError as err:
            logger.warning("skipped training sample %s: %s", ref.concept_id, err)
            return None

    def read_mask(self, ref: ConceptRef, photo: Image.Image) -> Image.Image:
        """`ref`'s mask image (it has one); with `masks_any_size`, resized to `photo` when only its scale differs."""
        assert ref.mask is not None
        uri = self.locations.uri(ref.mask)
        mask = open_image(self.locations.get(ref.mask), uri)
        if not self.masks_any_size or mask.size == photo.size:
            return mask  # find_object refuses another size, naming the mask
        if abs(mask.width / mask.height - photo.width / photo.height) > ASPECT_TOLERANCE * photo.width / photo.height:
            raise InputError(f"{uri}: mask {mask.width}x{mask.height} does not have the aspect ratio of its image "
                             f"{photo.width}x{photo.height}")
        return mask.resize(photo.size, Image.Resampling.NEAREST)

    def _example(self, ref: ConceptRef, rng: random.Random) -> TrainingExample:
        photo = open_image(self.locations.get(ref.image), self.locations.uri(ref.image))
        mask_image = None if ref.mask is None else self.read_mask(ref, photo)
        mask = find_object(photo, mask_image, self.locations.uri(ref.mask or ref.image))  # the encoder's rule
        top, bottom, left, right = _box(mask)
        if min(bottom - top, right - left) < self.min_box:
            raise InputError(f"object box {right - left}x{bottom - top} px is under {self.min_box} px")
        image, mask = _crop(to_rgb(photo), mask, (top, bottom, left, right))
        clip_image, clip_mask = image, mask
        template = rng.choice(TEMPLATES).format(PLACEHOLDER)
        if self.augment and self.stage == "global":
            clip_image, clip_mask = _augment_global(image, mask, rng)
        elif self.augment:
            scale = rng.uniform(0.5, 1.0)
            image, mask = _scale_down(image, mask, scale)
            prefix = rng.choice(FAR_PREFIXES) if scale < 0.7 else rng.choice(NEAR_PREFIXES) if scale > 0.9 else ""
            template = f"{prefix} {template}" if prefix else template
            clip_image, clip_mask = image, mask
        mask_picture = Image.fromarray(mask.astype(np.uint8) * 255)
        prepared = self.preprocessor(clip_image, Image.fromarray(clip_mask.astype(np.uint8) * 255),
                                     name=ref.concept_id)
        size = (self.resolution, self.resolution)
        vae = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        latent = self.resolution // 8
        latent_mask = torch.from_numpy(np.asarray(mask_picture.resize((latent, latent), Image.Resampling.NEAREST))
                                       > 0).float()
        return TrainingExample(ref.concept_id, prepared.pixel_values, prepared.object_pixel_values,
                               prepared.mask_grid, torch.from_numpy(vae).permute(2, 0, 1).contiguous(), latent_mask,
                               template)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the object's pixels, bottom and right exclusive."""
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _crop(image: Image.Image, mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[Image.Image, np.ndarray]:
    """The object's `box` with PADDING around it, made square (the UNet and CLIP take squares)."""
    top, bottom, left, right = box
    side = int(max(bottom - top, right - left) * (1 + 2 * PADDING))
    centre_y, centre_x = (top + bottom) // 2, (left + right) // 2
    square = (centre_x - side // 2, centre_y - side // 2, centre_x - side // 2 + side, centre_y - side // 2 + side)
    cropped = image.crop(square)  # outside the image: black
    mask_crop = Image.fromarray(mask.astype(np.uint8) * 255).crop(square)
    return cropped, np.asarray(mask_crop) > 0


def _augment_global(image: Image.Image, mask: np.ndarray, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """Stage 1's CLIP input: at CLIP's size, horizontal flip, rotation within 20 degrees, blur, elastic warp (the
    reference's CLIP-side augmentations)."""
    size = (CLIP_SIZE, CLIP_SIZE)
    image = image.resize(size, Image.Resampling.BICUBIC)
    resized = picture = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    if rng.random() < 0.5:
        image, picture = (p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in (image, picture))
    angle = rng.uniform(-20.0, 20.0)
    image = image.rotate(angle, Image.Resampling.BILINEAR)
    picture = picture.rotate(angle, Image.Resampling.NEAREST)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    if rng.random() < ELASTIC[0]:
        image, picture = _elastic(image, picture, rng)
    moved = np.asarray(picture) > 0
    return image, moved if moved.any() else np.asarray(resized) > 0  # a sliver moved out of frame keeps its mask


def _elastic(image: Image.Image, mask: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """A smooth random displacement (uniform noise, Gaussian-smoothed, scaled) applied to the image (bilinear) and
    its mask (nearest)."""
    _, scale, sigma = ELASTIC
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    field = torch.rand((2, 1, image.height, image.width), generator=generator) * 2 - 1
    radius = int(3 * sigma)
    kernel = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    field = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    field = field / field.abs().amax().clamp_min(1e-6) * scale  # pixels
    ys, xs = torch.meshgrid(torch.arange(image.height, dtype=torch.float32),
                            torch.arange(image.width, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + field[0, 0]) / (image.width - 1), (ys + field[1, 0]) / (image.height - 1)], -1)
    grid = (grid * 2 - 1)[None]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    marks = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    warped_mask = F.grid_sample(marks, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return (Image.fromarray(warped[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()),
            Image.fromarray(warped_mask[0, 0].round().byte().numpy()))


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
