"""Image and mask preprocessing for the concept encoder (method doc: CLIP input, object image, mask).

Every PIL mode is accepted: palette, grayscale, CMYK, 16-bit and float images become 8-bit RGB,
EXIF orientation is applied, and images with transparency are composited on white. Without a mask
the object is taken from the alpha channel when there is one, else the whole image is the object.
Images and masks are used as displayed (EXIF rotation applied); a mask must have its image's size.
Bad input, case by case: docs/inputs.md.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from elite.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # method doc: CLIP pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Formats of photos and masks; other formats PIL knows are refused (EPS, for one, would run Ghostscript).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (many camera JPEGs)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(source: str | os.PathLike[str] | bytes, name: str | None = None) -> Image.Image:
    """Open and fully decode an image, EXIF orientation applied; InputError names `name` and the reason."""
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    if isinstance(source, bytes) and not source:
        raise InputError(f"{label}: empty file (0 bytes)")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")
        with handle:
            with _pil_warnings():  # reads the header only
                image = Image.open(handle, formats=FORMATS)
            with image:
                _check_pixels(image.size)  # before any pixel is decoded
                image.load()  # the decoding, outside the lock: threads decode in parallel
                with _pil_warnings():
                    oriented = ImageOps.exif_transpose(image)
                return oriented if oriented is not image else image.copy()
    except FileNotFoundError as err:
        raise InputError(f"{label}: no such file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(f"{label}: refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{label}: not an image PIL can read as {', '.join(FORMATS)}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{label}: corrupt or truncated image: {err}") from err


_WARNINGS_LOCK = threading.Lock()


@contextmanager
def _pil_warnings() -> Iterator[None]:
    """PIL's warnings as we want them: damaged EXIF or TIFF tags skipped silently (PIL skips the tags, as do we),
    a decompression bomb an error. Warning filters are process-wide and `catch_warnings` is not thread-safe,
    so the flows' threads take turns here (header parsing and EXIF only, both fast)."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _check_pixels(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise Image.DecompressionBombError(f"Image size ({size[0] * size[1]} pixels) exceeds limit of {limit} "
                                           "pixels (PIL.Image.MAX_IMAGE_PIXELS)")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency (alpha or a tRNS colour key) is composited on white."""
    if image.mode in (*SIXTEEN_BIT, "I", "F"):
        image = _to_8bit(image)
    rgba = _with_alpha(image)
    if rgba is not None:
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Mode L from 16-bit, 32-bit integer or float gray (PIL's own convert saturates at 255)."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode in SIXTEEN_BIT:  # depth from the mode, not the values: a dark 16-bit image stays dark
        scale = 255.0 / 65535.0
    else:  # "I" and "F" do not say their range: 0..1 floats, else 8-bit values, else 16-bit ones
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 if peak <= 1.0 else (255.0 / 65535.0 if peak > 255.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))


def _with_alpha(image: Image.Image) -> Image.Image | None:
    """`image` as RGBA when it has transparency (an alpha channel or a tRNS colour key), else None."""
    if image.mode in ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return image.convert("RGBA")
    return None


def alpha_mask(image: Image.Image) -> np.ndarray | None:
    """The object as given by transparency (alpha > 0), or None for opaque images."""
    rgba = _with_alpha(image)
    if rgba is None:
        return None
    alpha = np.asarray(rgba.getchannel("A"))
    return None if alpha.min() == 255 else alpha > 0


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """Binary object mask: any non-zero channel is object (the release's `_bg.png` are RGB); a transparent
    pixel is background whatever its colour (the mask as seen on black)."""
    rgba = _with_alpha(mask)
    if rgba is not None:
        values = np.asarray(rgba)
        return (values[..., :3].max(axis=2) > 0) & (values[..., 3] > 0)
    if mask.mode in (*SIXTEEN_BIT, "I", "F", "1", "L"):
        return np.asarray(mask) != 0
    return np.asarray(mask.convert("RGB")).max(axis=2) > 0


def find_object(image: Image.Image, mask: Image.Image | None = None, name: str = "image") -> np.ndarray:
    """The object's pixels (height, width) bool: the mask's non-zero pixels, else the image's alpha, else all of it.
    A mask of another size than the image, or with no object pixel, is an InputError naming `name`."""
    if mask is not None:
        if mask.size != image.size:  # not resized: same aspect does not make a mask line up (crops)
            turned = " (turned 90°: masks refer to the image as displayed, EXIF rotation applied)"
            raise InputError(f"{name}: mask size {mask.size[0]}x{mask.size[1]} differs from image size "
                             f"{image.size[0]}x{image.size[1]}{turned if mask.size == image.size[::-1] else ''}")
        object_mask = mask_to_array(mask)
        if not object_mask.any():
            raise InputError(f"{name}: mask is empty (no object pixel)")
        return object_mask
    found = alpha_mask(image)
    if found is not None and not found.any():
        raise InputError(f"{name}: image is fully transparent and has no mask (no object pixel)")
    return found if found is not None else np.ones((image.height, image.width), dtype=bool)


@dataclass(frozen=True)
class PreparedConcept:
    pixel_values: torch.Tensor  # (3, size, size), CLIP-normalised whole image
    object_pixel_values: torch.Tensor  # (3, size, size), CLIP-normalised image x mask
    mask_grid: torch.Tensor  # (grid, grid), 1 = object patch


@dataclass(frozen=True)
class ConceptPreprocessor:
    image_size: int = 224  # CLIP ViT-L/14 input
    mask_grid: int = 16  # 224 / patch 14: one cell per patch token

    def __call__(self, image: Image.Image, mask: Image.Image | None = None, name: str = "image") -> PreparedConcept:
        rgb = np.asarray(to_rgb(image))  # (height, width, 3) uint8
        object_mask = find_object(image, mask, name)
        object_rgb = rgb * object_mask[..., None].astype(np.uint8)  # background set to black, as the release
        grid = F.interpolate(  # nearest from full resolution equals the release's two nearest steps via 128
            torch.from_numpy(object_mask.astype(np.float32))[None, None], size=(self.mask_grid, self.mask_grid),
            mode="nearest",
        )[0, 0]
        return PreparedConcept(self._clip_tensor(rgb), self._clip_tensor(object_rgb), grid)

    def _clip_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        resized = Image.fromarray(rgb).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0  # (3, S, S)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (pixels - mean) / std
