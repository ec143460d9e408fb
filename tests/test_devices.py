from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from PIL import Image

from elite.errors import EliteError, InputError
from elite.model.devices import cuda_devices, resolve_device, resolve_dtype
from elite.model.encoder import TorchConceptEncoder
from elite.model.loading import load_encoder
from elite.model.onnx_encoder import OnnxConceptEncoder
from elite.model.preprocessing import open_image
from elite.model.tiny import TinyModels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")


@pytest.fixture(scope="module")
def concept(concepts_dir: Path) -> tuple[list[Image.Image], list[Image.Image | None]]:
    return [open_image(concepts_dir / "1.jpg")], [open_image(concepts_dir / "1_bg.png")]


def _torch_encoder(tiny_models: TinyModels, **kwargs: object) -> TorchConceptEncoder:
    encoder = load_encoder("torch", vision_model=tiny_models.vision_model, global_mapper=tiny_models.global_mapper,
                           local_mapper=tiny_models.local_mapper, pretrained_model=tiny_models.pretrained_model,
                           **kwargs)  # type: ignore[arg-type]
    assert isinstance(encoder, TorchConceptEncoder)
    return encoder


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "elite.model.onnx_encoder" and r.levelno >= logging.WARNING]


def test_resolve_device_rules() -> None:
    auto = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device() == auto
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == resolve_device("cpu:0") == resolve_device(cpu) == cpu
    assert str(resolve_device("cpu")) == "cpu"
    # a bare "cuda" is the first GPU for both engines; spelling only, so it resolves without a GPU too
    assert resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda", 0)
    assert str(resolve_device("cuda:1")) == "cuda:1"
    for bad in ("gpu", "cuda:x", "", "mps", "CPU0"):
        with pytest.raises(InputError, match=f"got {bad!r}"):
            resolve_device(bad)


def test_auto_means_the_first_gpu_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_dtype("auto", "auto") == resolve_dtype(None, "auto") == torch.float16
    assert cuda_devices() == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", "auto") == torch.float32
    assert cuda_devices() == ["cpu"]


def test_resolve_dtype_rules() -> None:
    assert resolve_dtype(None, "cpu") == resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype(torch.float16, "cuda:0") == torch.float16
    for half in ("float16", torch.float16):
        with pytest.raises(InputError, match="float16 needs a CUDA device; use float32 or bfloat16 on the CPU"):
            resolve_dtype(half, "cpu")
    for bad in ("half", "fp16", "int8", torch.int8, torch.float64):
        with pytest.raises(InputError, match=f"got {bad!r}"):
            resolve_dtype(bad, "cpu")
    with pytest.raises(InputError, match="got 'gpu'"):
        resolve_dtype("auto", "gpu")


def test_cuda_devices_lists_what_torch_sees() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert cuda_devices() == ([f"cuda:{i}" for i in range(count)] or ["cpu"])


def test_torch_encoder_on_cpu_in_float32_and_bfloat16(tiny_models: TinyModels, concept: tuple) -> None:
    images, masks = concept
    fp32 = _torch_encoder(tiny_models, device="cpu")
    assert fp32.device == "cpu" and fp32.dtype == torch.float32
    assert {(p.device.type, p.dtype) for p in fp32.module.parameters()} == {("cpu", torch.float32)}
    bf16 = _torch_encoder(tiny_models, device="cpu", dtype="bfloat16")
    assert bf16.device == "cpu" and bf16.dtype == torch.bfloat16
    assert {(p.device.type, p.dtype) for p in bf16.module.parameters()} == {("cpu", torch.bfloat16)}
    ref, low = fp32.encode(images, masks, ["1"])[0], bf16.encode(images, masks, ["1"])[0]
    assert low.words.dtype == torch.float32  # embeddings leave the encoder in float32 whatever it ran in
    assert torch.nn.functional.cosine_similarity(low.words, ref.words, dim=-1).min() > 0.98
    assert fp32.encoder_id != bf16.encoder_id  # another precision is another encoder
    with pytest.raises(InputError, match="float16 needs a CUDA device"):
        _torch_encoder(tiny_models, device="cpu", dtype="float16")


@needs_no_cuda
def test_torch_encoder_refuses_a_gpu_torch_cannot_see(tiny_models: TinyModels) -> None:
    with pytest.raises(InputError, match=r"device 'cuda:0' asked for, but torch sees 0 CUDA device\(s\)"):
        _torch_encoder(tiny_models, device="cuda:0")


@needs_cuda
def test_torch_encoder_auto_is_the_gpu_in_float16(tiny_models: TinyModels, concept: tuple) -> None:
    encoder = _torch_encoder(tiny_models)
    assert encoder.device == "cuda:0" and encoder.dtype == torch.float16
    assert {(p.device.type, p.dtype) for p in encoder.module.parameters()} == {("cuda", torch.float16)}
    assert encoder.encode(*concept)[0].words.isfinite().all()


def test_onnx_encoder_on_the_cpu_uses_only_the_cpu_provider(exported: Mapping[str, Path], concept: tuple,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = exported["fp32"]  # exported first: the export's own log records are not under test
    with caplog.at_level(logging.WARNING, logger="elite.model.onnx_encoder"):
        encoder = load_encoder("onnx", onnx_path=path, device="cpu")
    assert isinstance(encoder, OnnxConceptEncoder)
    assert encoder.session.get_providers() == ["CPUExecutionProvider"]
    assert encoder.device == "cpu" and not _warnings(caplog)
    assert encoder.encode(*concept)[0].words.isfinite().all()
    with pytest.raises(InputError, match="are CUDA provider options; device 'cpu' takes none"):
        OnnxConceptEncoder(exported["fp32"], device="cpu", provider_options={"gpu_mem_limit": 1 << 30})


def test_onnx_encoder_warns_when_asked_for_cuda_it_cannot_have(exported: Mapping[str, Path], concept: tuple,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA; the fallback is for CPU-only builds")
    path = exported["fp32"]
    with caplog.at_level(logging.WARNING, logger="elite.model.onnx_encoder"):
        encoder = OnnxConceptEncoder(path, device="cuda:0")
    [record] = _warnings(caplog)
    message = record.getMessage()
    assert str(path) in message and "cuda:0" in message and "CPUExecutionProvider" in message
    assert "offers no CUDA provider" in message
    assert encoder.device == "cpu" and encoder.session.get_providers() == ["CPUExecutionProvider"]
    assert encoder.encode(*concept)[0].words.isfinite().all()  # it still encodes, on the CPU
    with pytest.raises(InputError, match=r"asked to encode on cuda:0, runs on CPUExecutionProvider") as caught:
        load_encoder("onnx", onnx_path=path, device="cuda", strict_device=True)
    assert isinstance(caught.value, EliteError)


def test_onnx_encoder_auto_follows_what_is_there(exported: Mapping[str, Path],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    path = exported["fp32"]
    with caplog.at_level(logging.WARNING, logger="elite.model.onnx_encoder"):
        encoder = OnnxConceptEncoder(path)  # device="auto"
    on_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    assert encoder.device == ("cuda:0" if on_cuda else "cpu")
    if not torch.cuda.is_available():
        assert not _warnings(caplog)  # no GPU anywhere: the CPU is what was meant, not a fallback


@needs_cuda
def test_onnx_encoder_on_the_gpu(exported: Mapping[str, Path], concept: tuple) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    encoder = OnnxConceptEncoder(exported["fp32"], device="cuda:0", strict_device=True)
    assert encoder.device == "cuda:0" and encoder.session.get_providers()[0] == "CUDAExecutionProvider"
    assert encoder.encode(*concept)[0].words.isfinite().all()
