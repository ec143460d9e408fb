from __future__ import annotations

import os

# Before anything imports Prefect (its settings are read from the environment at import): telemetry off, and a long
# start-up timeout for ephemeral API servers (Prefect's default, 20 s, is too short on a busy 2-core machine, where
# starting one took 13-32 s). The environment carries them to subprocesses (the CLI) too; a user's own values win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx
import pytest
import torch

from elite.model.encoder import TorchConceptEncoder
from elite.model.loading import unet_cross_attention_layers
from elite.model.onnx_export import (
    Precision,
    _quantize_int8,
    encoder_metadata,
    export_concept_encoder,
)
from elite.model.pipeline import ElitePipeline
from elite.model.tiny import TinyEvalModels, TinyModels, make_tiny_eval_models, make_tiny_models

REPO = Path(__file__).resolve().parents[1]
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8", "fp16")


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
def tiny_eval_models(tmp_path_factory: pytest.TempPathFactory) -> TinyEvalModels:
    """Tiny CLIP and DINO in the hub layouts, for the metrics (elite.evaluation)."""
    return make_tiny_eval_models(tmp_path_factory.mktemp("tiny-eval-models"))


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


# ---- the tiny encoder in ONNX: one session fixture per precision, each built only when a test asks for it ----------

@pytest.fixture(scope="session")
def onnx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def onnx_fp32(torch_encoder: TorchConceptEncoder, onnx_folder: Path) -> Path:
    """The one export of the torch graph in fp32 (the slow step: about 10 s, minutes on a busy machine)."""
    return export_concept_encoder(torch_encoder.module, onnx_folder / "encoder-fp32.onnx", "fp32")


@pytest.fixture(scope="session")
def onnx_int8(torch_encoder: TorchConceptEncoder, onnx_fp32: Path, onnx_folder: Path) -> Path:
    """int8 from the fp32 file, as `export_concept_encoder(..., "int8")` does after its own fp32 export (the same
    quantisation and metadata), without exporting the torch graph again (under a second)."""
    scratch = onnx_folder / "int8-scratch"
    scratch.mkdir()
    graph = scratch / "encoder.onnx"
    shutil.copyfile(onnx_fp32, graph)
    model = onnx.load(str(_quantize_int8(graph)))
    del model.metadata_props[:]
    for key, value in encoder_metadata(torch_encoder.module, "int8").items():
        model.metadata_props.add(key=key, value=value)
    out = onnx_folder / "encoder-int8.onnx"
    onnx.save(model, str(out))
    shutil.rmtree(scratch)
    return out


@pytest.fixture(scope="session")
def onnx_fp16(torch_encoder: TorchConceptEncoder, onnx_folder: Path) -> Path:
    """fp16 is a half-precision export of the torch graph in `export_concept_encoder`, so it is exported here too."""
    return export_concept_encoder(torch_encoder.module, onnx_folder / "encoder-fp16.onnx", "fp16")


class _LazyExports(Mapping[str, Path]):
    """`exported[precision]` builds (once per session) only the precision a test reads."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    def __getitem__(self, precision: str) -> Path:
        if precision not in PRECISIONS:
            raise KeyError(precision)
        path: Path = self._request.getfixturevalue(f"onnx_{precision}")
        return path

    def __iter__(self) -> Iterator[str]:
        return iter(PRECISIONS)

    def __len__(self) -> int:
        return len(PRECISIONS)


@pytest.fixture
def exported(request: pytest.FixtureRequest) -> Mapping[str, Path]:
    """The exported encoder by precision; prefer the `onnx_<precision>` fixtures where the precision is fixed."""
    return _LazyExports(request)


# ---- Prefect ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary database and an API server subprocess), one per session for every test
    that runs a flow. It waits for the server as long as the ephemeral start-up timeout set above (180 s unless the
    environment says otherwise), not its own 30 s default."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def warm_up() -> int:
        return 1

    startup_timeout = int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    with prefect_test_harness(server_startup_timeout=startup_timeout):
        # The first flow run reconfigures Prefect's logging, binding its console handler to sys.stderr as it is
        # then: run one here, outside any test's capsys, whose stream is closed after its test (a later flow's
        # log line would then fail, and with log_prints its error report recurses).
        assert warm_up() == 1
        yield
