from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from elite.pipeline import ElitePipeline
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
