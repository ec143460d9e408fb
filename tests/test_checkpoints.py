from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from elite.errors import CheckpointError
from elite.model.checkpoints import convert_checkpoint, load_mapper, read_state_dict
from elite.model.loading import unet_cross_attention_layers
from elite.model.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite.model.tiny import TinyModels
from elite_cli.main import main


@pytest.fixture(scope="module")
def release_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mapper file in the release's exact format and size: a pickled fp32 state dict, 132 tensors."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("release") / "global_mapper.pt"
    torch.save(GlobalMapper(MapperConfig()).state_dict(), path)
    return path


def test_release_pt_converts_to_identical_safetensors(release_pt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "global_mapper.safetensors"
    assert main(["convert-checkpoint", str(release_pt), str(out)]) == 0
    assert "132 tensors" in capsys.readouterr().out
    original = torch.load(release_pt, weights_only=True)
    converted = safetensors.torch.load_file(str(out))
    assert converted.keys() == original.keys()
    for key in original:
        assert torch.equal(converted[key], original[key]), key
    # both formats load into the same mapper
    a, b = load_mapper(GlobalMapper, release_pt), load_mapper(GlobalMapper, out)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def _tiny_state(tiny_models: TinyModels) -> dict[str, torch.Tensor]:
    return torch.load(tiny_models.local_mapper, weights_only=True)


def test_missing_key_is_named(tiny_models: TinyModels, tmp_path: Path) -> None:
    state = _tiny_state(tiny_models)
    del state["mapping_patch_3.4.bias"]
    torch.save(state, tmp_path / "bad.pt")
    layers = unet_cross_attention_layers(tiny_models.pretrained_model)
    with pytest.raises(CheckpointError, match=r"missing key 'mapping_patch_3\.4\.bias'"):
        load_mapper(LocalMapper, tmp_path / "bad.pt", layers)


def test_wrong_shape_and_unexpected_key_are_named(tiny_models: TinyModels, tmp_path: Path) -> None:
    layers = unet_cross_attention_layers(tiny_models.pretrained_model)
    key = "mid_block_attentions_0_transformer_blocks_0_attn2_to_v.weight"
    state = _tiny_state(tiny_models)
    state[key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=rf"key '{key}' has shape \[3, 3\]"):
        load_mapper(LocalMapper, tmp_path / "shape.pt", layers)
    state = _tiny_state(tiny_models)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key 'extra\.weight'"):
        load_mapper(LocalMapper, tmp_path / "extra.pt", layers)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_by_file_and_key(tiny_models: TinyModels, tmp_path: Path, bad: float) -> None:
    """NaN mapper weights gave black images with exit 0; the checkpoint, not the first concept, is at fault."""
    state = _tiny_state(tiny_models)
    state["mapping_2.3.weight"][0, 0] = bad
    torch.save(state, tmp_path / "nan.pt")
    layers = unet_cross_attention_layers(tiny_models.pretrained_model)
    with pytest.raises(CheckpointError, match=r"nan\.pt: key 'mapping_2\.3\.weight' holds 1 non-finite value"):
        load_mapper(GlobalMapper, tmp_path / "nan.pt", layers)


def test_mapper_for_another_unet_is_refused(tiny_models: TinyModels) -> None:
    # tiny mapper checked against the SD 1.x release layout: the first layer has the wrong width
    with pytest.raises(CheckpointError, match=r"key 'down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
                                              r"\.weight' has shape \[32, 32\], expected \[320, 32\]"):
        load_mapper(GlobalMapper, tiny_models.global_mapper)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, not a checkpoint\n", "truncated or not a checkpoint"),
])
def test_non_checkpoint_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        read_state_dict(path)


def test_truncated_file_cli_one_line(tiny_models: TinyModels, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = Path(tiny_models.global_mapper).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    code = main(["convert-checkpoint", str(tmp_path / "cut.pt"), str(tmp_path / "out.safetensors"),
                 "--pretrained-model", str(tiny_models.pretrained_model)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "truncated or not a checkpoint" in err and "cut.pt" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_names_bad_key_and_converts_tiny(tiny_models: TinyModels, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = _tiny_state(tiny_models)
    del state["mapping_0.6.bias"]
    torch.save(state, tmp_path / "bad.pt")
    args = ["--pretrained-model", str(tiny_models.pretrained_model)]
    assert main(["convert-checkpoint", str(tmp_path / "bad.pt"), str(tmp_path / "o.safetensors"), *args]) == 1
    assert "missing key 'mapping_0.6.bias'" in capsys.readouterr().err
    assert main(["convert-checkpoint", str(tiny_models.local_mapper), str(tmp_path / "ok.safetensors"), *args]) == 0


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_with_code_is_refused_never_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"mapping_0.0.weight": _RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(path, tmp_path / "out.safetensors")
    assert "refused" in str(info.value) or "not a checkpoint" in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_state_dict_of_non_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"mapping_0.0.weight": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a tensor"):
        read_state_dict(tmp_path / "list.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "tensor.pt")


class _Payload:
    """Unpickling this would create the file `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_code_in_a_vision_model_folder_is_refused_with_one_clear_error(tiny_models: TinyModels,
                                                                       tmp_path: Path) -> None:
    """A vision tower folder whose weights are a pickle with code: refused by name, nothing runs, no traceback of
    the unpickler's own making reaches the user."""
    from elite.model.loading import load_encoder

    folder = tmp_path / "clip-vision"
    shutil.copytree(tiny_models.vision_model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "code-ran"
    torch.save({"vision_model.embeddings.class_embedding": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"cannot load the vision model from .*clip-vision"):
        load_encoder("torch", vision_model=folder, global_mapper=tiny_models.global_mapper,
                     local_mapper=tiny_models.local_mapper, pretrained_model=tiny_models.pretrained_model,
                     device="cpu")
    assert not marker.exists()
