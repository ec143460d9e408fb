"""The bad-input corpus (tests/corpus.py) through the library and through the encode flow: every case comes out
as expected, good ones encoded, bad ones one failure row each naming the concept, the stage and the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpus import CMYK_BLOCKS, Case, H, W, corpus, disc, ramp16, write_folder, write_manifest
from PIL import Image

from elite.errors import InputError
from elite.model.preprocessing import CLIP_MEAN, CLIP_STD, ConceptPreprocessor, PreparedConcept, open_image, to_rgb
from elite.model.tiny import TinyModels

# before Prefect is imported (by the fixture below): no telemetry from tests
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]
PRE = ConceptPreprocessor()
CASES = {case.concept_id: case for case in corpus()}
SHARED = ("10", "11")  # two of the shared concepts, each an image and a mask


def _open(case: Case, name: str) -> Image.Image:
    return open_image(case.objects[name], name=name)


def _prepare(case: Case) -> PreparedConcept:
    """The flow's path for one concept: open_image on the image and mask, then the encoder's preprocessor."""
    return PRE(_open(case, case.image), _open(case, case.mask) if case.mask else None, name=case.concept_id)


def _outcome(case: Case) -> tuple[str, str] | None:
    """None when the case encodes, else (stage, reason) as the flow would report them."""
    try:
        image = _open(case, case.image)
        mask = _open(case, case.mask) if case.mask else None
    except InputError as err:
        return "read", str(err)
    try:
        PRE(image, mask, name=case.concept_id)
    except InputError as err:
        return "preprocess", str(err)
    return None


def _grid(mask: np.ndarray) -> torch.Tensor:
    return F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(16, 16), mode="nearest")[0, 0]


def _pixels(values: torch.Tensor) -> np.ndarray:
    """CLIP-normalised (3, S, S) back to (S, S, 3) values in 0..255."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((values * std + mean) * 255).permute(1, 2, 0).numpy()


# ---- the library -----------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_well_formed() -> None:
    again = corpus()
    assert [(c.concept_id, c.objects) for c in again] == [(c.concept_id, c.objects) for c in CASES.values()]
    assert len(CASES) == len(again)  # ids are unique
    for case in again:
        assert case.image in case.objects and case.concept_id.startswith("ok-" if case.good else "bad-")
        assert case.good == (case.stage is None) and case.stage in (None, "read", "preprocess")
        assert case.reason is None or case.reason == case.reason.lower()
    assert [c.concept_id for c in again if not c.in_folder] == ["bad-mask-missing"]


@pytest.mark.parametrize("case", [c for c in CASES.values() if c.in_folder], ids=lambda c: c.concept_id)
def test_every_case_has_its_outcome(case: Case) -> None:
    got = _outcome(case)
    if case.good:
        assert got is None, f"{case.note}: {got}"
    else:
        assert got is not None, f"{case.note}: encoded, expected a failure"
        assert got[0] == case.stage and case.reason is not None and case.reason in got[1].lower(), got
        assert got[1].startswith(case.concept_id), "the reason names the concept or its file"


def test_sixteen_bit_gray_is_scaled_from_its_depth() -> None:
    ramp = np.asarray(to_rgb(_open(CASES["ok-gray16-png"], "ok-gray16-png.png")))
    assert ramp.shape == (H, W, 3) and (ramp == ramp[..., :1]).all()
    expected = np.rint(ramp16() / 257.0)
    assert np.abs(ramp[..., 0] - expected).max() <= 1  # scaled, not clipped to white above 255
    assert (ramp[:, 0, 0].max(), ramp[:, -1, 0].min()) == (0, 255) and 120 < ramp.mean() < 136
    # 16 bits whose values happen to stay below 256 are a dark image, not an 8-bit one
    dark = np.asarray(to_rgb(_open(CASES["ok-gray16-dark-png"], "ok-gray16-dark-png.png")))
    assert dark.max() <= 1


def test_exif_rotation_is_applied_and_the_mask_refers_to_the_displayed_image() -> None:
    case = CASES["ok-exif-rotated-jpeg"]
    image = _open(case, case.image)
    assert image.size == (H, W)  # stored W x H, orientation 6: displayed H wide, W high
    rgb = np.asarray(to_rgb(image)).astype(int)
    assert np.abs(rgb[: W // 2 - 4] - (255, 0, 0)).max() < 40  # the stored left half (red) is now on top
    assert np.abs(rgb[W // 2 + 4:] - (0, 0, 255)).max() < 40
    out = _prepare(case)  # its mask marks the top half of the displayed image: the red half
    assert out.mask_grid[:8].all() and not out.mask_grid[8:].any()
    obj = _pixels(out.object_pixel_values)
    assert np.abs(obj[:100] - (255, 0, 0)).max() < 50 and np.abs(obj[124:]).max() < 10
    # the same mask drawn on the stored pixels does not fit, and the reason says why
    with pytest.raises(InputError, match="turned 90°"):
        _prepare(CASES["bad-exif-rotated-raw-mask"])
    # unreadable EXIF: PIL's warning stays inside open_image and the image is used as stored
    assert _open(CASES["ok-damaged-exif-jpeg"], "ok-damaged-exif-jpeg.jpg").size == (W, H)


def test_cmyk_jpeg_colours() -> None:
    image = _open(CASES["ok-cmyk-jpeg"], "ok-cmyk-jpeg.jpg")
    assert image.mode == "CMYK" and "adobe" in image.info  # Adobe CMYK: stored inverted, as Photoshop writes
    rgb = np.asarray(to_rgb(image)).astype(int)
    for i, colour in enumerate(CMYK_BLOCKS):
        y, x = (i // 2) * H // 2 + H // 4, (i % 2) * W // 2 + W // 4
        assert np.abs(rgb[y - 4:y + 4, x - 4:x + 4] - colour).max() < 24, (colour, rgb[y, x])


@pytest.mark.parametrize("concept_id", ["ok-rgba-png", "ok-la-png", "ok-rgb-trns-png"])
def test_transparency_is_the_object_without_a_mask(concept_id: str) -> None:
    case = CASES[concept_id]
    out = _prepare(case)
    assert torch.equal(out.mask_grid, _grid(disc()))
    whole = np.asarray(to_rgb(_open(case, case.image)))
    assert (whole[~disc()] == 255).all()  # composited on white
    obj = _pixels(out.object_pixel_values)
    assert np.abs(obj[:4, :4]).max() < 2 and np.abs(obj[108:116, 108:116] - whole[H // 2, W // 2]).max() < 40


@pytest.mark.parametrize("concept_id", ["ok-mask-rgb", "ok-mask-rgba", "ok-mask-16bit",
                                        "ok-mask-palette-transparent"])
def test_masks_of_any_mode_mark_the_same_object(concept_id: str) -> None:
    # the RGBA and palette masks are white all over: only their transparency tells the object
    assert torch.equal(_prepare(CASES[concept_id]).mask_grid, _grid(disc()))


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    """In a fresh process, so that its peak memory is this open's: 10^10 pixels would take 10 GB."""
    script = ("import resource, sys\n"
              "from elite.errors import InputError\n"
              "from elite.model.preprocessing import open_image\n"
              "data = sys.stdin.buffer.read()\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    open_image(data, name='bomb')\nexcept InputError as err:\n    print(err)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    data = CASES["bad-bomb-png"].objects["bad-bomb-png.png"]
    assert len(data) < 100
    done = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, cwd=REPO, timeout=120,
                          check=True)
    message, grown_kib = done.stdout.decode().splitlines()
    assert "bomb: refused as a decompression bomb" in message
    assert int(grown_kib) < 20_000


# ---- the encode flow -------------------------------------------------------------------------------

def _failures_file(uri: str) -> list[dict[str, Any]]:
    """The rows of the run's failures table (Parquet), sorted by concept id."""
    import pyarrow.parquet as pq

    found = pq.read_table(Path(uri.removeprefix("file://"))).to_pylist()
    keys = ("concept_id", "uri", "stage", "reason")
    return sorted(({k: row[k] for k in keys} for row in found), key=lambda row: row["concept_id"])


@pytest.mark.parametrize("layout", ["folder", "manifest"])
def test_encode_flow_reports_every_bad_case_once(layout: str, prefect_harness: None, tiny_models: TinyModels,
                                                 concepts_dir: Path, tmp_path: Path) -> None:
    from elite.data.storage import embedding_store
    from flows.encode import encode_concepts

    folder = tmp_path / "concepts"
    cases = (write_folder if layout == "folder" else write_manifest)(folder, list(CASES.values()))
    for name in SHARED:
        shutil.copy(concepts_dir / f"{name}.jpg", folder)
        shutil.copy(concepts_dir / f"{name}_bg.png", folder)
    if layout == "manifest":
        with (folder / "concepts.jsonl").open("a") as manifest_file:
            manifest_file.writelines(json.dumps({"concept_id": n, "image": f"{n}.jpg", "mask": f"{n}_bg.png"}) + "\n"
                            for n in SHARED)
    store = str(tmp_path / "embeddings")
    models: dict[str, Any] = {"vision_model": str(tiny_models.vision_model),
                              "global_mapper": str(tiny_models.global_mapper),
                              "local_mapper": str(tiny_models.local_mapper),
                              "pretrained_model": str(tiny_models.pretrained_model)}
    manifest = "concepts.jsonl" if layout == "manifest" else None
    good = sorted([c.concept_id for c in cases if c.good] + list(SHARED))
    bad = {c.concept_id: c for c in cases if not c.good}
    assert ("bad-mask-missing" in bad) == (layout == "manifest")

    first = encode_concepts(str(folder), store, manifest=manifest, **models)
    assert embedding_store(store).concept_ids() == good
    assert first["done"] == len(good)
    rows = sorted(first["failures"], key=lambda row: row["concept_id"])
    assert [row["concept_id"] for row in rows] == sorted(bad)  # each bad case once, nothing else
    for row in rows:
        case = bad[row["concept_id"]]
        assert row["uri"] == (folder / case.image).as_uri()
        assert row["stage"] == case.stage and case.reason is not None and case.reason in row["reason"].lower(), row
    assert _failures_file(first["failures_uri"]) == rows

    again = encode_concepts(str(folder), store, manifest=manifest, **models)
    assert again["done"] == 0 and embedding_store(store).concept_ids() == good
    assert sorted(again["failures"], key=lambda row: row["concept_id"]) == rows
