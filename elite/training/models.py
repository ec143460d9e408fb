"""The models of a training run: the frozen parts through the same `from_pretrained` code as inference, and the
mappers, from the release's files or from scratch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

from elite.model.checkpoints import load_mapper, load_pretrained
from elite.model.mappers import GlobalMapper, LocalMapper, MapperConfig, copy_unet_key_values, cross_attention_layers
from elite.training.settings import TrainSettings


@dataclass
class FrozenModels:
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    vision: Any
    noise_scheduler: Any


def load_frozen(settings: TrainSettings) -> FrozenModels:
    """The frozen parts, through the same `from_pretrained` code as inference."""
    path = settings.pretrained_model
    models = FrozenModels(
        load_pretrained("VAE", AutoencoderKL, path, subfolder="vae"),
        load_pretrained("UNet", UNet2DConditionModel, path, subfolder="unet"),
        load_pretrained("text encoder", CLIPTextModel, path, subfolder="text_encoder"),
        load_pretrained("tokenizer", CLIPTokenizer, path, subfolder="tokenizer"),
        load_pretrained("vision model", CLIPVisionModel, settings.vision_model),
        load_pretrained("noise scheduler", DDPMScheduler, path, subfolder="scheduler"))
    for module in (models.vae, models.unet, models.text_encoder, models.vision):
        module.requires_grad_(False).eval()
    return models


def new_mapper(cls: type[GlobalMapper] | type[LocalMapper], frozen: FrozenModels) -> GlobalMapper | LocalMapper:
    """A mapper from scratch: sized by the vision tower and text encoder, its k/v copies initialised from the
    UNet's own (method doc)."""
    layers = cross_attention_layers(frozen.unet)
    mapper = cls(MapperConfig(input_dim=frozen.vision.config.hidden_size,
                              hidden_dim=frozen.vision.config.hidden_size,
                              output_dim=frozen.text_encoder.config.hidden_size, cross_attention_layers=layers))
    copy_unet_key_values(mapper, frozen.unet)
    return mapper


def load_mappers(settings: TrainSettings, frozen: FrozenModels) -> tuple[GlobalMapper, LocalMapper | None]:
    """Stage 1: the global mapper to train (None for the local one). Stage 2: the frozen global mapper and the local
    mapper to train."""
    layers = cross_attention_layers(frozen.unet)
    glob = (load_mapper(GlobalMapper, settings.global_mapper, layers) if settings.global_mapper
            else new_mapper(GlobalMapper, frozen))
    if settings.stage == "global":
        return glob, None  # type: ignore[return-value]
    glob.requires_grad_(False).eval()
    local = (load_mapper(LocalMapper, settings.local_mapper, layers) if settings.local_mapper
             else new_mapper(LocalMapper, frozen))
    return glob, local  # type: ignore[return-value]
