from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elite.errors import InputError
from elite.model.preprocessing import CLIP_MEAN, CLIP_STD, ConceptPreprocessor, open_image, to_rgb

PRE = ConceptPreprocessor()


def _png(image: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_shared_concept_matches_the_release_recipe(concepts_dir: Path) -> None:
    image = Image.open(concepts_dir / "1.jpg").convert("RGB")
    mask_img = Image.open(concepts_dir / "1_bg.png")
    out = PRE(image, mask_img)
    assert out.pixel_values.shape == out.object_pixel_values.shape == (3, 224, 224)
    # release recipe, written out: mask = any channel > 0; object = image * mask; resize 224 bicubic;
    # ToTensor; normalise; mask to 128 nearest, then 16 nearest.
    mask = (np.asarray(mask_img.convert("RGB")) > 0).any(axis=2)
    obj = Image.fromarray((np.asarray(image) * mask[..., None]).astype("uint8")).resize((224, 224), Image.BICUBIC)
    obj_t = (torch.from_numpy(np.asarray(obj).copy()).permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN)[:, None, None]
             ) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(out.object_pixel_values, obj_t)
    seg = torch.from_numpy(mask.astype(np.float32))[None, None]
    seg16 = F.interpolate(F.interpolate(seg, size=(128, 128), mode="nearest"), size=(16, 16), mode="nearest")[0, 0]
    assert torch.equal(out.mask_grid, seg16)
    assert 0 < out.mask_grid.sum() < 256


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA", "RGBA", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert image.mode in ("I;16", "I")
    elif mode == "F":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255.0, mode="F")
    else:
        image = rgb.convert(mode)
    out = PRE(image)
    assert out.pixel_values.shape == (3, 224, 224)
    assert torch.isfinite(out.pixel_values).all()
    if mode in ("I;16", "F"):  # 16-bit and float scaled to 8 bits, not clipped to white
        gray = np.asarray(to_rgb(image))[..., 0].astype(int)
        assert np.abs(gray - np.asarray(rgb.convert("L")).astype(int)).max() <= 1


def test_alpha_gives_the_mask_when_none_is_given() -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 8:24] = (200, 10, 10, 255)
    out = PRE(Image.fromarray(rgba, mode="RGBA"))
    assert out.mask_grid[0, 0] == 0 and out.mask_grid[8, 8] == 1
    # no mask, no alpha: the whole image is the object
    assert PRE(Image.new("RGB", (32, 32), "blue")).mask_grid.sum() == 256


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue(), name="rotated").size == (20, 40)


def test_mask_errors_name_the_item() -> None:
    image = Image.new("RGB", (32, 32), "red")
    with pytest.raises(InputError, match=r"sku-1: mask size 16x16 differs from image size 32x32"):
        PRE(image, Image.new("L", (16, 16), 255), name="sku-1")
    with pytest.raises(InputError, match=r"sku-2: mask is empty"):
        PRE(image, Image.new("RGB", (32, 32), "black"), name="sku-2")


def test_bad_files_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="a: empty file"):
        open_image(b"", name="a")
    with pytest.raises(InputError, match="b: not an image"):
        open_image(b"this is text", name="b")
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match="c: corrupt or truncated"):
        open_image(data[: len(data) // 2], name="c")
    with pytest.raises(InputError, match="no such file"):
        open_image(tmp_path / "missing.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="d: refused as a decompression bomb"):
        open_image(data, name="d")
