"""The Prefect flows end to end on tiny models, under Prefect's test harness, into a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elite.tiny import TinyModels

# before Prefect is imported (by the fixture below): no telemetry from tests
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

CONCEPTS = ("10", "11", "15")  # three of the shared concepts, each an image and a mask


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture()
def concept_folder(concepts_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "concepts"
    folder.mkdir()
    for name in CONCEPTS:
        shutil.copy(concepts_dir / f"{name}.jpg", folder)
        shutil.copy(concepts_dir / f"{name}_bg.png", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_encode_then_generate(prefect_harness: None, tiny_models: TinyModels, concept_folder: Path,
                              tmp_path: Path) -> None:
    from flows.encode import encode_concepts
    from flows.generate import generate_images

    store = str(tmp_path / "embeddings")
    models: dict[str, Any] = {"vision_model": str(tiny_models.vision_model),
                              "global_mapper": str(tiny_models.global_mapper),
                              "local_mapper": str(tiny_models.local_mapper),
                              "pretrained_model": str(tiny_models.pretrained_model)}
    first = encode_concepts(str(concept_folder), store, batch_size=2, **models)
    assert (first["done"], first["skipped"], first["failed"]) == (3, 0, 1)
    [failure] = first["failures"]
    assert failure["concept_id"] == "broken" and failure["stage"] == "read"
    assert failure["uri"].endswith("broken.jpg") and "not an image" in failure["reason"]
    written = Path(first["failures_uri"].removeprefix("file://")).read_text().splitlines()
    assert [json.loads(line) for line in written] == [failure]

    again = encode_concepts(str(concept_folder), store, batch_size=2, **models)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 3, 1)

    prompts = tmp_path / "prompts" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a photo of a S on the beach\n")
    out = tmp_path / "images"
    settings: dict[str, Any] = {k: models[k] for k in ("pretrained_model", "global_mapper", "local_mapper")}
    run = generate_images(store, str(prompts), str(out), **settings, encoder_id=first["encoder_id"], steps=2,
                          height=64, width=64, batch_size=2)
    assert (run["generated"], run["skipped"]) == (3, 0)
    pngs = sorted(out.glob("*/*.png"))
    assert [p.parent.name for p in pngs] == list(CONCEPTS)
    rows = [json.loads(line) for line in Path(run["manifest_uri"].removeprefix("file://")).read_text().splitlines()]
    assert {row["concept_id"] for row in rows} == set(CONCEPTS)
    assert all(row["steps"] == 2 and row["height"] == 64 and row["sha256"] and row["seconds"] for row in rows)

    rerun = generate_images(store, str(prompts), str(out), **settings, encoder_id=first["encoder_id"], steps=2,
                            height=64, width=64, batch_size=2)
    assert (rerun["generated"], rerun["skipped"]) == (0, 3)
    assert sorted(out.glob("*/*.png")) == pngs
