from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from elite.encoder import TorchConceptEncoder
from elite.export import export_concept_encoder
from elite.pipeline import ElitePipeline, unet_cross_attention_layers
from elite.tiny import TinyModels, make_tiny_models

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def concepts_dir() -> Path:
    """The shared concept images (N.jpg + N_bg.png) of the authors' release."""
    folder = Path(os.environ.get("ELITE_TEST_CONCEPTS", REPO.parent / "shared" / "data" / "elite-test-concepts"))
    if not folder.is_dir():
        pytest.fail(f"shared concept images not found at {folder}; set ELITE_TEST_CONCEPTS")
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def pipe(tiny_models: TinyModels) -> ElitePipeline:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return ElitePipeline.from_pretrained(tiny_models.pretrained_model, tiny_models.vision_model,
                                         tiny_models.global_mapper, tiny_models.local_mapper)


@pytest.fixture(scope="session")
def torch_encoder(tiny_models: TinyModels) -> TorchConceptEncoder:
    return TorchConceptEncoder.from_pretrained(tiny_models.vision_model, tiny_models.global_mapper,
                                               tiny_models.local_mapper,
                                               unet_cross_attention_layers(tiny_models.pretrained_model))


@pytest.fixture(scope="session")
def exported(torch_encoder: TorchConceptEncoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny encoder exported once per session in every precision (about 10 s each)."""
    folder = tmp_path_factory.mktemp("onnx")
    return {p: export_concept_encoder(torch_encoder.module, folder / f"encoder-{p}.onnx", p)  # type: ignore[arg-type]
            for p in ("fp32", "int8", "fp16")}


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary database and API in this process), one per session for every test
    that runs a flow. Telemetry is off before Prefect is first imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
