"""Loading encoders by name: the torch encoder or an exported ONNX one, and the UNet layout the mappers follow."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from elite.errors import CheckpointError, InputError
from elite.model.devices import DeviceArg, DtypeArg
from elite.model.encoder import ConceptEncoder, TorchConceptEncoder
from elite.model.mappers import cross_attention_layers
from elite.model.onnx_encoder import OnnxConceptEncoder


def unet_cross_attention_layers(pretrained_model: str | os.PathLike[str]) -> tuple[tuple[str, int], ...]:
    """Cross-attention layers of an SD repo's UNet, read from its config alone (no weights loaded)."""
    try:
        config = UNet2DConditionModel.load_config(pretrained_model, subfolder="unet")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the UNet config of {pretrained_model}: {str(err).splitlines()[0]}") from err
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return cross_attention_layers(unet)


def load_encoder(engine: str = "torch", *, onnx_path: str | os.PathLike[str] | None = None,
                 vision_model: str | os.PathLike[str] | None = None,
                 global_mapper: str | os.PathLike[str] | None = None,
                 local_mapper: str | os.PathLike[str] | None = None,
                 pretrained_model: str | os.PathLike[str] | None = None,
                 device: DeviceArg = "auto", dtype: DtypeArg = "auto",
                 provider_options: Mapping[str, Any] | None = None, strict_device: bool = False) -> ConceptEncoder:
    """An ONNX Runtime encoder (`engine="onnx"`) or a torch one, on `device` ("auto": the first GPU, else the CPU).

    `pretrained_model` names the UNet whose cross-attention layers the mapper files were built for (default:
    SD 1.x). `dtype` is the torch encoder's ("auto": float16 on CUDA, as generation; float32 on the CPU); an
    ONNX file's precision was fixed at export. `provider_options` and `strict_device` are the ONNX encoder's:
    a torch encoder cannot fall back to another device, it fails on one it cannot use."""
    if engine == "onnx":
        if not onnx_path:
            raise InputError("engine 'onnx' needs an ONNX encoder file (write one with `elite export-onnx`)")
        return OnnxConceptEncoder(onnx_path, device=device, provider_options=provider_options,
                                  strict_device=strict_device)
    if engine != "torch":
        raise InputError(f"engine must be 'torch' or 'onnx', got {engine!r}")
    if not (vision_model and global_mapper and local_mapper):
        raise InputError("engine 'torch' needs a vision model and both mapper files")
    layers = unet_cross_attention_layers(pretrained_model) if pretrained_model else None
    return TorchConceptEncoder.from_pretrained(vision_model, global_mapper, local_mapper, layers,
                                               device=device, dtype=dtype)
