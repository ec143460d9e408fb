from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elite.data.sources import find_concepts
from elite.errors import CheckpointError, InputError
from elite.model.encoder import TorchConceptEncoder, state_digest
from elite.model.onnx_encoder import OnnxConceptEncoder


@pytest.fixture(scope="module")
def shared(concepts_dir: Path) -> tuple[list[str], list[Image.Image], list[Image.Image | None]]:
    sources = find_concepts(concepts_dir)
    return ([s.concept_id for s in sources], [Image.open(s.image) for s in sources],
            [Image.open(s.mask) if s.mask else None for s in sources])


def _stack(embeddings: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([e.words for e in embeddings]), torch.stack([e.local_tokens for e in embeddings])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    keep = a.norm(dim=-1) > 0  # background local tokens are exactly zero in both
    return torch.nn.functional.cosine_similarity(a[keep], b[keep], dim=-1)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fp32_onnx_matches_torch_on_the_shared_concepts(torch_encoder: TorchConceptEncoder, onnx_fp32: Path,
                                                        shared: tuple, batch: int) -> None:
    ids, images, masks = shared
    onnx_encoder = OnnxConceptEncoder(onnx_fp32)
    for start in range(0, len(ids), batch):
        chunk = slice(start, start + batch)
        ref_words, ref_local = _stack(torch_encoder.encode(images[chunk], masks[chunk], ids[chunk]))
        got = onnx_encoder.encode(images[chunk], masks[chunk], ids[chunk])
        words, local = _stack(got)
        assert [e.concept_id for e in got] == ids[chunk]
        for ref, out in ((ref_words, words), (ref_local, local)):
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_int8_and_fp16_stay_close(torch_encoder: TorchConceptEncoder, onnx_int8: Path, onnx_fp16: Path,
                                  shared: tuple) -> None:
    ids, images, masks = shared
    ref_words, ref_local = _stack(torch_encoder.encode(images, masks, ids))
    for precision, path in (("int8", onnx_int8), ("fp16", onnx_fp16)):
        words, local = _stack(OnnxConceptEncoder(path).encode(images, masks, ids))
        assert _cosine(words.flatten(0, 1), ref_words.flatten(0, 1)).min() >= 0.99, precision
        assert _cosine(local.flatten(0, 1), ref_local.flatten(0, 1)).min() >= 0.99, precision
        assert torch.equal(local.norm(dim=-1) > 0, ref_local.norm(dim=-1) > 0)  # the mask is exact


def test_metadata_and_encoder_ids(torch_encoder: TorchConceptEncoder, onnx_fp32: Path, onnx_int8: Path,
                                  onnx_fp16: Path) -> None:
    exported = {"fp32": onnx_fp32, "int8": onnx_int8, "fp16": onnx_fp16}
    encoders = {p: OnnxConceptEncoder(path) for p, path in exported.items()}
    meta = encoders["int8"].metadata
    assert meta["elite.precision"] == "int8" and meta["elite.feature_layers"] == "4,8,12,16"
    assert meta["elite.opset"] == "18" and meta["elite.version"]
    assert meta["elite.vision_sha256"] == state_digest(torch_encoder.module.vision_model)
    assert meta["elite.global_mapper_sha256"] == state_digest(torch_encoder.module.global_mapper)
    assert encoders["fp32"].provider == "CPUExecutionProvider"
    ids = {e.encoder_id for e in encoders.values()} | {torch_encoder.encoder_id}
    assert len(ids) == 4
    assert OnnxConceptEncoder(exported["fp32"]).encoder_id == encoders["fp32"].encoder_id


def test_bad_files_and_inputs(onnx_fp32: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 100)
    with pytest.raises(CheckpointError, match=r"junk\.onnx: not a loadable ONNX encoder"):
        OnnxConceptEncoder(tmp_path / "junk.onnx")
    data = onnx_fp32.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.onnx: not a loadable ONNX encoder"):
        OnnxConceptEncoder(tmp_path / "cut.onnx")
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        OnnxConceptEncoder(tmp_path / "missing.onnx")
    encoder = OnnxConceptEncoder(onnx_fp32)
    good = np.zeros((2, 3, 224, 224), np.float32)
    with pytest.raises(InputError, match=r"pixel_values has shape \(2, 3, 64, 64\)"):
        encoder.run(np.zeros((2, 3, 64, 64), np.float32), good, np.ones((2, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"mask_grid has shape \(3, 16, 16\)"):
        encoder.run(good, good, np.ones((3, 16, 16), np.float32))


def test_an_onnx_file_without_elite_metadata_or_outputs_is_refused(onnx_fp32: Path, tmp_path: Path) -> None:
    """The right input names are not enough: a foreign graph would be accepted as an encoder and store garbage."""
    import onnx

    model = onnx.load(str(onnx_fp32))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match=r"bare\.onnx: no elite\.version, .* in its metadata"):
        OnnxConceptEncoder(tmp_path / "bare.onnx", device="cpu")
    model = onnx.load(str(onnx_fp32))
    model.graph.output[1].name = "tokens"  # outputs of another graph
    for node in model.graph.node:
        node.output[:] = ["tokens" if name == "local_tokens" else name for name in node.output]
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(CheckpointError, match=r"other\.onnx: outputs .* are not those of an ELITE encoder"):
        OnnxConceptEncoder(tmp_path / "other.onnx", device="cpu")
