"""A bad-input corpus, generated in code: concept images and masks, good and bad, each with its expected outcome.

    cases = corpus()                          # list[Case], the same bytes on every call (seeded, no files read)
    write_folder(tmp_path / "f", cases)       # the folder convention: <id>.<ext> and <id>_bg.png
    write_manifest(tmp_path / "m", cases)     # the same objects and m/concepts.jsonl (manifest_jsonl(cases))

A `Case` is one concept: its objects (file name -> bytes), which is the image and which the mask, and what
must happen to it: `reason is None` means it must be encoded; else it must fail once, at `stage` ("read":
the image or mask cannot be read or decoded; "preprocess": decoded but unusable), with a reason containing
`reason` (lowercase). A case whose manifest names a mask it does not have (`in_folder` False) cannot be laid
out as a folder, where it would be an image without a mask, so `write_folder` leaves it out.
Images are small (at most 96 px a side, but for the 4000x8 one) so the whole corpus encodes in seconds.
docs/inputs.md ("What counts as bad input") lists the cases.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

W, H = 96, 64  # size of most images: not square, so a mask turned 90° cannot fit


@dataclass(frozen=True)
class Case:
    concept_id: str
    objects: dict[str, bytes]  # file name -> bytes: the image and, if any, its mask
    image: str  # file name of the image
    mask: str | None  # file name a manifest gives as mask; may be absent from `objects` (a missing mask)
    reason: str | None  # None: must be encoded; else a lowercase substring of the failure reason
    stage: str | None  # "read" or "preprocess" when it must fail
    note: str  # what the case is, in a few words

    @property
    def good(self) -> bool:
        return self.reason is None

    @property
    def in_folder(self) -> bool:
        """Whether the folder convention can express the case (a folder cannot name a missing mask)."""
        return self.mask is None or self.mask in self.objects


# ---- pictures and encoders -----------------------------------------------------------------------

def picture(concept_id: str, width: int = W, height: int = H) -> np.ndarray:
    """(height, width, 3) uint8: gradients plus noise seeded by the concept id."""
    rng = np.random.default_rng(zlib.crc32(concept_id.encode()))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def disc(width: int = W, height: int = H) -> np.ndarray:
    """(height, width) bool: a centred disc, the object of the masked cases."""
    y, x = np.mgrid[0:height, 0:width]
    return (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) * 0.35) ** 2


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"",
            chunks: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A PNG written by hand: IHDR as given (even a lying one), `chunks`, then IDAT of `rows` (filter bytes
    included) and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = b"".join(chunk(kind, data) for kind, data in chunks)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def gray16_png(values: np.ndarray) -> bytes:
    """16-bit grayscale PNG (PIL opens it as mode I;16) of a (height, width) array of 0..65535."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return raw_png(values.shape[1], values.shape[0], 16, 0, rows)


def ramp16(width: int = W, height: int = H) -> np.ndarray:
    """(height, width) uint16: 0 at the left edge to 65535 at the right."""
    return np.tile(np.rint(np.linspace(0, 65535, width)), (height, 1)).astype(np.uint16)


def exif_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif)


def damaged_exif_jpeg(rgb: np.ndarray) -> bytes:
    """A JPEG whose EXIF orientation entry points past the end of its segment: PIL warns and skips it."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + struct.pack(">HHII", 0x0112, 3, 1000, 0x1000) + b"\0" * 4
    app1 = b"Exif\x00\x00" + tiff
    data = encode(Image.fromarray(rgb), "JPEG", quality=95)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def halves(width: int, height: int, first: tuple[int, int, int], second: tuple[int, int, int]) -> np.ndarray:
    """(height, width, 3): left half `first`, right half `second`."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:, : width // 2] = first
    out[:, width // 2:] = second
    return out


CMYK_BLOCKS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))  # top-left, top-right, bottom-left, -right


def blocks(width: int = W, height: int = H) -> np.ndarray:
    out = np.empty((height, width, 3), dtype=np.uint8)
    for i, colour in enumerate(CMYK_BLOCKS):
        top, left = (i // 2) * height // 2, (i % 2) * width // 2
        out[top:top + height // 2, left:left + width // 2] = colour
    return out


def rgba(concept_id: str, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([picture(concept_id), alpha.astype(np.uint8)]), mode="RGBA")


# ---- the cases -----------------------------------------------------------------------------------

def _case(concept_id: str, note: str, image: tuple[str, bytes], mask: bytes | None = None,
          reason: str | None = None, stage: str | None = None, mask_missing: bool = False) -> Case:
    """A case named `<id>.<ext>` (+ `<id>_bg.png`); `image` is (suffix, bytes)."""
    image_name = f"{concept_id}.{image[0]}"
    mask_name = f"{concept_id}_bg.png" if mask is not None or mask_missing else None
    objects = {image_name: image[1]}
    if mask is not None and mask_name is not None:
        objects[mask_name] = mask
    return Case(concept_id, objects, image_name, mask_name, reason, stage, note)


def _png(concept_id: str, convert: Callable[[Image.Image], Image.Image] = lambda im: im, **options: Any) -> bytes:
    return encode(convert(Image.fromarray(picture(concept_id))), "PNG", **options)


def _mask_png(array: np.ndarray) -> bytes:
    """The release's mask form: RGB, object white, background black."""
    return encode(Image.fromarray(np.repeat(array[..., None], 3, axis=2).astype(np.uint8) * 255), "PNG")


def corpus() -> list[Case]:
    """Every case, sorted by concept id (good ones start with `ok-`, bad ones with `bad-`)."""
    obj = disc()
    jpeg = encode(Image.fromarray(picture("bad-truncated-jpeg")), "JPEG", quality=90)
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 96 64\nnewpath 0 0 moveto 96 64 lineto stroke\nshowpage\n"
    ztxt = zlib.compress(b"\0" * 4_000_000)  # 4 MB of comment: over PIL's 1 MB text chunk limit
    rotated = exif_jpeg(halves(W, H, (255, 0, 0), (0, 0, 255)), 6)  # stored W x H red|blue; shown H x W red/blue
    top_half = np.zeros((W, H), dtype=bool)  # displayed: W rows of H pixels
    top_half[: W // 2] = True
    palette = Image.fromarray(np.where(obj[..., None], picture("ok-palette-transparent-png"), 0).astype(np.uint8))
    palette = palette.quantize(64)
    palette.info["transparency"] = palette.getpixel((0, 0))  # the background's index, as cut-out tools write
    trns = picture("ok-rgb-trns-png").copy()
    trns[~obj] = (0, 255, 0)
    mask_rgba = np.zeros((H, W, 4), dtype=np.uint8)
    mask_rgba[...] = (255, 255, 255, 0)  # background: transparent white, as some editors write it
    mask_rgba[obj] = (255, 255, 255, 255)
    mask_palette = Image.fromarray(obj.astype(np.uint8), mode="L").convert("P")
    mask_palette.putpalette([255, 255, 255, 255, 255, 255])  # both entries white: only transparency marks
    rgb16 = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in
                     (picture("ok-rgb16-png").astype(np.uint16) * 257).reshape(H, W * 3))
    cases = [
        # ---- unreadable files: stage "read"
        _case("bad-truncated-jpeg", "JPEG cut in half", ("jpg", jpeg[: len(jpeg) // 2]), reason="truncated",
              stage="read"),
        _case("bad-zero-bytes", "empty file", ("png", b""), reason="empty file", stage="read"),
        _case("bad-text-as-jpg", "plain text named .jpg", ("jpg", b"this is not an image\n" * 4),
              reason="not an image", stage="read"),
        _case("bad-html-as-png", "an HTML error page named .png", ("png", html), reason="not an image",
              stage="read"),
        _case("bad-eps-as-png", "PostScript named .png (PIL would run Ghostscript)", ("png", eps),
              reason="not an image", stage="read"),
        _case("bad-bomb-png", "PNG whose header claims 100000x100000", ("png", raw_png(100_000, 100_000, 8, 0)),
              reason="decompression bomb", stage="read"),
        _case("bad-text-bomb-png", "PNG with a 4 MB compressed comment",
              ("png", raw_png(W, H, 8, 0, b"\x00" * (W + 1) * H, [(b"zTXt", b"Comment\x00\x00" + ztxt)])),
              reason="decompressed data too large", stage="read"),
        _case("bad-zero-size-png", "PNG of 0x0 pixels", ("png", raw_png(0, 0, 8, 0)), reason="not an image",
              stage="read"),
        # ---- decoded but unusable: stage "preprocess"
        _case("bad-transparent-png", "RGBA, alpha 0 everywhere, no mask",
              ("png", encode(rgba("bad-transparent-png", np.zeros((H, W))), "PNG")), reason="fully transparent",
              stage="preprocess"),
        # ---- images that must be encoded
        _case("ok-cmyk-jpeg", "CMYK JPEG (Adobe, stored inverted)",
              ("jpg", encode(Image.fromarray(blocks()).convert("CMYK"), "JPEG", quality=95))),
        _case("ok-gray16-png", "16-bit gray, values 0..65535", ("png", gray16_png(ramp16()))),
        _case("ok-gray16-dark-png", "16-bit gray, values 0..255 only (a dark image)",
              ("png", gray16_png(ramp16() // 257))),
        _case("ok-rgb16-png", "16-bit RGB", ("png", raw_png(W, H, 16, 2, rgb16))),
        _case("ok-palette-png", "palette", ("png", _png("ok-palette-png", lambda im: im.quantize(32)))),
        _case("ok-palette-transparent-png", "palette with a transparent index: the object",
              ("png", encode(palette, "PNG"))),
        _case("ok-rgba-png", "RGBA without mask: alpha is the object",
              ("png", encode(rgba("ok-rgba-png", obj * 255), "PNG"))),
        _case("ok-la-png", "gray + alpha", ("png", encode(rgba("ok-la-png", obj * 255).convert("LA"), "PNG"))),
        _case("ok-rgb-trns-png", "RGB with a tRNS colour key: the other colours are the object",
              ("png", encode(Image.fromarray(trns), "PNG", transparency=(0, 255, 0)))),
        _case("ok-gray-png", "8-bit gray", ("png", _png("ok-gray-png", lambda im: im.convert("L")))),
        _case("ok-bilevel-png", "1-bit", ("png", _png("ok-bilevel-png", lambda im: im.convert("1")))),
        _case("ok-exif-rotated-jpeg", "EXIF orientation 6, mask drawn on the displayed image",
              ("jpg", rotated), mask=_mask_png(top_half)),
        _case("bad-exif-rotated-raw-mask", "EXIF orientation 6, mask drawn on the stored pixels",
              ("jpg", rotated), mask=_mask_png(np.rot90(top_half)), reason="turned 90°", stage="preprocess"),
        _case("ok-damaged-exif-jpeg", "EXIF orientation unreadable: used as stored",
              ("jpg", damaged_exif_jpeg(picture("ok-damaged-exif-jpeg")))),
        _case("ok-webp", "WebP", ("webp", encode(Image.fromarray(picture("ok-webp")), "WEBP", quality=90))),
        _case("ok-jpeg-named-png", "JPEG bytes named .png: the content decides",
              ("png", encode(Image.fromarray(picture("ok-jpeg-named-png")), "JPEG"))),
        _case("ok-wide-4000x8", "4000x8 pixels", ("png", encode(Image.fromarray(picture("ok-wide", 4000, 8)), "PNG"))),
        _case("ok-one-pixel", "1x1 pixel", ("png", encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"))),
        # ---- masks
        _case("ok-mask-rgb", "RGB mask, as the release's _bg.png", ("png", _png("ok-mask-rgb")), mask=_mask_png(obj)),
        _case("ok-mask-rgba", "RGBA mask, transparent white background",
              ("png", _png("ok-mask-rgba")), mask=encode(Image.fromarray(mask_rgba, mode="RGBA"), "PNG")),
        _case("ok-mask-16bit", "16-bit gray mask", ("png", _png("ok-mask-16bit")),
              mask=gray16_png(obj.astype(np.uint16) * 65535)),
        _case("ok-mask-palette-transparent", "palette mask, object = opaque index",
              ("png", _png("ok-mask-palette-transparent")), mask=encode(mask_palette, "PNG", transparency=0)),
        _case("bad-mask-empty", "all-black mask", ("png", _png("bad-mask-empty")),
              mask=_mask_png(np.zeros((H, W), dtype=bool)), reason="mask is empty", stage="preprocess"),
        _case("bad-mask-size", "mask of half the size (same aspect ratio)", ("png", _png("bad-mask-size")),
              mask=_mask_png(disc(W // 2, H // 2)), reason=f"mask size {W // 2}x{H // 2} differs from image size "
              f"{W}x{H}", stage="preprocess"),
        _case("bad-mask-not-image", "mask file holding text", ("png", _png("bad-mask-not-image")),
              mask=b"mask goes here\n", reason="not an image", stage="read"),
        _case("bad-mask-missing", "manifest names a mask that does not exist", ("png", _png("bad-mask-missing")),
              mask_missing=True, reason="not found", stage="read"),
    ]
    return sorted(cases, key=lambda c: c.concept_id)


# ---- layouts -------------------------------------------------------------------------------------

def write_folder(root: str | Path, cases: Sequence[Case]) -> list[Case]:
    """Write the objects of the cases a folder can express under `root`; returns those cases."""
    written = [c for c in cases if c.in_folder]
    _write_objects(Path(root), written)
    return written


def write_manifest(root: str | Path, cases: Sequence[Case], key: str = "concepts.jsonl") -> list[Case]:
    """Write every case's objects under `root` and a JSONL manifest of them at `key`; returns the cases."""
    _write_objects(Path(root), cases)
    (Path(root) / key).write_bytes(manifest_jsonl(cases))
    return list(cases)


def manifest_jsonl(cases: Sequence[Case]) -> bytes:
    """A JSONL manifest row per case (paths relative to the manifest's folder; `note` passes as metadata)."""
    rows = [{"concept_id": c.concept_id, "image": c.image, **({"mask": c.mask} if c.mask else {}),
             "note": c.note} for c in cases]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _write_objects(folder: Path, cases: Sequence[Case]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for name, data in case.objects.items():
            (folder / name).write_bytes(data)
