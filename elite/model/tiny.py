"""Tiny randomly initialised models in the real on-disk layouts, built offline.

`make_tiny_models(DIR)` writes a complete SD 1.x repo (unet, vae, text_encoder, tokenizer,
scheduler, model_index.json), a CLIP vision tower and the two mapper checkpoints in the release's
`.pt` format. Tests and the offline demo load them through the same `from_pretrained` and
checkpoint code as real weights. The tokenizer is a byte-level BPE built here from a small vocab.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from elite.model.mappers import (
    GlobalMapper,
    LocalMapper,
    MapperConfig,
    copy_unet_key_values,
    cross_attention_layers,
)

TEXT_DIM = 32
VISION_DIM = 32
# Words that get whole-word merges, so prompts stay short; anything else falls back to bytes.
MERGED_WORDS = ("a", "photo", "of", "the", "on", "in", "at", "with", "and", "next", "to", "beach", "dog",
                "cat", "painting", "style", "picture", "table", "garden", "snow", "city", "street")


@dataclass(frozen=True)
class TinyModels:
    pretrained_model: Path  # SD 1.x layout
    vision_model: Path
    global_mapper: Path
    local_mapper: Path


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer_files(folder: Path) -> int:
    """vocab.json + merges.txt of a small CLIP-style BPE; returns the vocab size."""
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in MERGED_WORDS:
        pieces = [*list(word[:-1]), word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
                if merged not in vocab:
                    vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}))
    return len(vocab)


def make_tiny_models(out_dir: str | os.PathLike[str], seed: int = 0) -> TinyModels:
    out = Path(out_dir)
    paths = TinyModels(out / "stable-diffusion", out / "clip-vision", out / "global_mapper.pt",
                       out / "local_mapper.pt")
    with tempfile.TemporaryDirectory() as scratch:
        vocab_size = write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=VISION_DIM, intermediate_size=37, num_hidden_layers=16, num_attention_heads=4,
        image_size=224, patch_size=14, projection_dim=TEXT_DIM))
    config = MapperConfig(input_dim=VISION_DIM, hidden_dim=64, output_dim=TEXT_DIM,
                          cross_attention_layers=cross_attention_layers(unet))
    write_model_set(paths, vae, text_encoder, tokenizer, unet, scheduler, vision, config)
    return paths


def write_model_set(paths: TinyModels, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                    unet: UNet2DConditionModel, scheduler: SchedulerMixin, vision: CLIPVisionModel,
                    mapper_config: MapperConfig) -> None:
    """Models of any size written as users have them: an SD 1.x repo (the tokenizer folder as SD 1.4 ships it:
    vocab.json + merges.txt + configs, no tokenizer.json), a CLIP vision tower, and the two mappers in the release's
    `.pt` format with their k/v copies started from the UNet's own, as in training."""
    with warnings.catch_warnings():  # diffusers asks LMS for steps_offset 1, which its linspace spacing ignores
        warnings.simplefilter("ignore", FutureWarning)
        StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(paths.pretrained_model)
    tokenizer_dir = paths.pretrained_model / "tokenizer"
    for stale in tokenizer_dir.iterdir():
        stale.unlink()
    write_tokenizer_files(tokenizer_dir)
    vision.save_pretrained(paths.vision_model)
    for cls, path in ((GlobalMapper, paths.global_mapper), (LocalMapper, paths.local_mapper)):
        mapper = cls(mapper_config)
        copy_unet_key_values(mapper, unet)
        torch.save(mapper.state_dict(), path)  # the release's format: a pickled plain state dict


@dataclass(frozen=True)
class TinyEvalModels:
    clip_model: Path  # CLIPModel + image processor + tokenizer, as openai/clip-vit-base-patch32 ships
    dino_model: Path  # ViTModel + image processor, as facebook/dino-vits16 ships


EVAL_IMAGE_SIZE = 32


def make_tiny_eval_models(out_dir: str | os.PathLike[str], seed: int = 0) -> TinyEvalModels:
    """Tiny random metric models (elite.evaluation.metrics) in the hub layouts: a CLIP with both towers, its
    CLIPImageProcessor (short-side resize, centre crop) and tokenizer, and a DINO ViT with its ViTImageProcessor
    (square resize, ImageNet normalisation)."""
    out = Path(out_dir)
    paths = TinyEvalModels(out / "clip", out / "dino")
    paths.clip_model.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer_files(paths.clip_model)
    tokenizer = CLIPTokenizer.from_pretrained(paths.clip_model)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": EVAL_IMAGE_SIZE, "patch_size": 8},
        projection_dim=16)).save_pretrained(paths.clip_model)
    square = {"height": EVAL_IMAGE_SIZE, "width": EVAL_IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": EVAL_IMAGE_SIZE}, crop_size=square).save_pretrained(paths.clip_model)
    ViTModel(ViTConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       image_size=EVAL_IMAGE_SIZE, patch_size=8), add_pooling_layer=False).save_pretrained(
        paths.dino_model)
    ViTImageProcessor(size=square, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        paths.dino_model)
    return paths
