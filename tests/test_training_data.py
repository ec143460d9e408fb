"""Training data without models: the Open Images V6 layout (annotation CSV, class names, masks stored at another
size), stage 1's CLIP-side augmentations with the elastic warp, and the stage-2 box-size rule."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elite.data.storage import open_store
from elite.errors import InputError
from elite.jobs.common import Locations
from elite.model.tiny import TinyModels
from elite.training.data import ConceptDataset, _elastic
from elite.training.openimages import open_images_concepts
from elite_cli.main import main

HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"


def _mask_box(mask: Image.Image) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(np.asarray(mask.convert("L")) > 0)
    return (cols.min() / mask.width, (cols.max() + 1) / mask.width, rows.min() / mask.height,
            (rows.max() + 1) / mask.height)


@pytest.fixture(scope="module")
def open_images(concepts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Open Images V6 test split in the download's layout: masks at half the image's size, in the
    subfolders the mask zips unpack to, a class-description file with a header."""
    root = tmp_path_factory.mktemp("open-images")
    rows = [HEADER]
    for number, (name, label) in enumerate((("1", "/m/01yrx"), ("16", "/m/0bt9lr"), ("3", "/m/01yrx"),
                                             ("2", "/m/0bt9lr"))):  # 2's box covers 93% of its image
        image_id = f"{number:x}0a1b2c3d4e5f60{number}"
        (root / "test").mkdir(exist_ok=True)
        shutil.copy(concepts_dir / f"{name}.jpg", root / "test" / f"{image_id}.jpg")
        mask_name = f"{image_id}_{label.replace('/', '')[1:]}_b{number}.png"
        folder = root / "test-masks" / f"test-masks-{image_id[0]}"
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(concepts_dir / f"{name}_bg.png") as mask:
            small = mask.convert("L").point(lambda v: 255 if v else 0).resize(
                (mask.width // 2, mask.height // 2), Image.Resampling.NEAREST)
        small.save(folder / mask_name)
        left, right, top, bottom = _mask_box(small)
        rows.append(f"{mask_name},{image_id},{label},b{number},{left},{right},{top},{bottom},0.9,")
    rows += ["missing.png,00a1b2c3d4e5f600,/m/01yrx,bx,0.1,0.5,0.1,0.5,0.9,",  # mask not downloaded
             f"{mask_name},{image_id},/m/01yrx,by,0.1,oops,0.1,0.5,0.9,",  # a bad number
             f"{mask_name},{image_id},/m/01yrx,bz,0.1,0.11,0.1,0.11,0.9,"]  # 0.01% of the image: not stage 1
    (root / "test-annotations-object-segmentation.csv").write_text("\n".join(rows) + "\n")
    (root / "oidv6-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01yrx,Cat\n/m/0bt9lr,Dog\n")
    return root


def test_open_images_rows_become_concepts(open_images: Path) -> None:
    refs, failures = open_images_concepts(open_store(open_images), "test", "global")
    assert [ref.concept_id for ref in refs] == ["00a1b2c3d4e5f600_b0", "10a1b2c3d4e5f601_b1", "20a1b2c3d4e5f602_b2"]
    assert [ref.class_word for ref in refs] == ["cat", "dog", "cat"]
    assert refs[1].image == "test/10a1b2c3d4e5f601.jpg"
    assert refs[1].mask == "test-masks/test-masks-1/10a1b2c3d4e5f601_0bt9lr_b1.png"
    assert {(f.concept_id, f.reason.split(" ")[0]) for f in failures} == {("00a1b2c3d4e5f600_bx", "mask"),
                                                                       ("30a1b2c3d4e5f603_by", "box")}
    assert sorted(f.uri.rsplit(":", 1)[1] for f in failures) == ["6", "7"]  # file:line of the row
    local, _ = open_images_concepts(open_store(open_images), "test", "local", limit=2)
    assert len(local) == 2
    every, _ = open_images_concepts(open_store(open_images), "test", "local")
    assert len(every) == 5  # no area range in stage 2 (its 100-pixel rule applies when a sample is read)
    with pytest.raises(InputError, match=r"validation-annotations-object-segmentation\.csv: not found"):
        open_images_concepts(open_store(open_images), "validation")


def test_open_images_masks_are_resized_to_their_images(open_images: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(open_images)
    refs, _ = open_images_concepts(store, "test", "local")
    strict = ConceptDataset(refs[:1], Locations(store), "local", resolution=64, augment=False)
    caplog.set_level(logging.WARNING, logger="elite")
    assert strict[0] is None and "differs from image size" in caplog.text  # a catalog's masks must match
    data = ConceptDataset(refs[:3], Locations(store), "local", resolution=64, augment=False, masks_any_size=True)
    example = data[0]
    assert example is not None and 0 < float(example.latent_mask.mean()) < 1
    assert data[1] is not None and data[2] is not None
    big = ConceptDataset(refs[:1], Locations(store), "local", resolution=64, augment=False, masks_any_size=True,
                         min_box=10_000)
    caplog.clear()
    assert big[0] is None and "px is under 10000 px" in caplog.text
    wrong = open_images / "wrong"
    shutil.copytree(open_images, wrong)
    mask_path = wrong / refs[0].mask  # type: ignore[operator]
    with Image.open(mask_path) as mask:
        mask.resize((mask.width, mask.height // 3)).save(mask_path)  # another aspect ratio: not this image's mask
    refs_wrong, _ = open_images_concepts(open_store(wrong), "test", "local")
    caplog.clear()
    assert ConceptDataset(refs_wrong[:1], Locations(open_store(wrong)), "local", resolution=64,
                          masks_any_size=True)[0] is None
    assert "does not have the aspect ratio of its image" in caplog.text


def test_stage_one_augments_the_clip_input_only(open_images: Path) -> None:
    store = open_store(open_images)
    refs, _ = open_images_concepts(store, "test", "global")
    kwargs = {"resolution": 64, "masks_any_size": True}
    plain = ConceptDataset(refs, Locations(store), "global", augment=False, **kwargs)  # type: ignore[arg-type]
    augmented = ConceptDataset(refs, Locations(store), "global", augment=True, **kwargs)  # type: ignore[arg-type]
    for epoch in range(3):
        a, b = plain[(epoch, 0)], augmented[(epoch, 0)]
        assert a is not None and b is not None
        assert torch.equal(a.vae_pixels, b.vae_pixels) and torch.equal(a.latent_mask, b.latent_mask)
        assert not torch.equal(a.pixel_values, b.pixel_values)  # a rotation at least, every time
    first, again = augmented[(1, 0)], augmented[(1, 0)]
    assert first is not None and again is not None and torch.equal(first.pixel_values, again.pixel_values)
    other = augmented[(2, 0)]
    assert other is not None and not torch.equal(first.pixel_values, other.pixel_values)


def test_the_elastic_warp_moves_image_and_mask_together() -> None:
    mask = Image.new("L", (224, 224))
    mask.paste(255, (60, 50, 170, 180))
    image = Image.merge("RGB", [mask] * 3)
    warped, warped_mask = _elastic(image, mask, random.Random(3))
    moved = np.asarray(warped)[..., 0] > 127
    marks = np.asarray(warped_mask) > 0
    assert (moved != (np.asarray(mask) > 0)).mean() > 0.005  # the edges moved
    assert (moved == marks).mean() > 0.99  # by the same field
    again, _ = _elastic(image, mask, random.Random(3))
    assert np.array_equal(np.asarray(again), np.asarray(warped))


def test_elite_train_reads_the_open_images_layout(open_images: Path, tiny_models: TinyModels, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "local", "--layout", "openimages", "--concepts", str(open_images), "--out",
                 str(tmp_path / "out"), "--pretrained-model", str(tiny_models.pretrained_model), "--vision-model",
                 str(tiny_models.vision_model), "--global-mapper", str(tiny_models.global_mapper), "--steps", "2",
                 "--batch-size", "2", "--gradient-accumulation", "1", "--resolution", "64", "--num-workers", "1"])
    out = capsys.readouterr()
    assert code == 1  # trained, and says that two annotation rows were left out
    assert "trained the local mapper to step 2 (loss" in out.out
    assert "missing.png is not in the masks folder" in out.out + out.err
    assert (tmp_path / "out" / "local_mapper.pt").is_file()
