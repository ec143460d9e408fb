"""The paper's metrics: CLIP-T, CLIP-I and DINO-I (elite-method.md, "How the metrics are computed").

    models = MetricModels.from_pretrained()              # CLIP ViT-B/32 and DINO ViT-S/16, from the hub or folders
    clip, dino = models.image_features(images)            # L2-normalised rows, float32 on the CPU
    text = models.text_features(["a photo of a dog on the beach"])
    clip_t = cosine(clip, text); clip_i = cosine(clip, source_clip); dino_i = cosine(dino, source_dino)

- CLIP-T: cosine of the CLIP image embedding of a generated image and the CLIP text embedding of its prompt with
  the placeholder replaced by the concept's class word (`clip_t_text`). As textual inversion's evaluator, which
  the authors used: projected embeddings, no logit scale.
- CLIP-I: cosine of the CLIP image embeddings of the generated and the source image.
- DINO-I: cosine of the L2-normalised CLS features (last hidden state, after the final layer norm) of DINO ViT-S/16.

Each model's own processor (the folder's preprocessor_config.json: CLIP resizes the short side and crops the
centre, DINO resizes to its square input) prepares the images, as `from_pretrained` users get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

from elite.errors import InputError
from elite.evaluation import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from elite.model.checkpoints import load_pretrained
from elite.model.devices import DeviceArg, DtypeArg, check_torch_device, resolve_device, resolve_dtype
from elite.model.placeholders import placeholder_pattern


def clip_t_text(prompt: str, class_word: str, placeholder: str = "S") -> str:
    """The CLIP-T text of a prompt: every whole-word placeholder replaced by the class word ("a photo of a S on
    the beach" -> "a photo of a dog on the beach"). A prompt without its placeholder is an InputError."""
    pattern = placeholder_pattern([placeholder])
    if not pattern.search(prompt):
        raise InputError(f"prompt {prompt!r} does not contain the placeholder {placeholder!r}")
    return pattern.sub(lambda _: class_word, prompt)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (n, d) tensors (rows need not be normalised)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@dataclass
class MetricModels:
    """CLIP (image and text towers with their projections) and DINO, on one device, with their processors."""

    clip: Any  # transformers CLIPModel
    clip_processor: Any  # image processor
    tokenizer: Any
    dino: Any  # transformers ViTModel (or any AutoModel whose output has last_hidden_state)
    dino_processor: Any
    device: torch.device
    dtype: torch.dtype
    clip_id: str
    dino_id: str

    @classmethod
    def from_pretrained(cls, clip_model: str = DEFAULT_CLIP_MODEL, dino_model: str = DEFAULT_DINO_MODEL,
                        device: DeviceArg = "auto", dtype: DtypeArg = "auto") -> MetricModels:
        """Both models by hub id or folder (transformers layouts), in eval mode on `device` (auto: the GPU when
        torch sees one) in `dtype` (auto: float16 on CUDA, float32 on the CPU)."""
        where = check_torch_device(resolve_device(device))
        kind = resolve_dtype(dtype, where)
        clip = load_pretrained("CLIP model", CLIPModel, clip_model)
        clip_processor = load_pretrained("CLIP image processor", AutoImageProcessor, clip_model)
        tokenizer = load_pretrained("CLIP tokenizer", AutoTokenizer, clip_model)
        dino_config = load_pretrained("DINO config", AutoConfig, dino_model)
        extra = {"add_pooling_layer": False} if dino_config.model_type == "vit" else {}  # DINO has no pooler
        dino = load_pretrained("DINO model", AutoModel, dino_model, **extra)
        dino_processor = load_pretrained("DINO image processor", AutoImageProcessor, dino_model)
        # loaded in float32 and cast here: transformers renamed torch_dtype between the versions we accept
        return cls(clip.to(where, kind).eval(), clip_processor, tokenizer, dino.to(where, kind).eval(),
                   dino_processor, where, kind, str(clip_model), str(dino_model))

    def _pixels(self, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP image embeddings, DINO CLS features) of `images`, each (n, d), L2-normalised, float32 on the CPU."""
        if not images:
            raise InputError("image_features: no images")
        clip = self.clip.get_image_features(pixel_values=self._pixels(self.clip_processor, images))
        dino = self.dino(pixel_values=self._pixels(self.dino_processor, images)).last_hidden_state[:, 0]
        return _normalised(_tensor(clip)), _normalised(dino)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings of `texts` (n, d), L2-normalised, float32 on the CPU; texts longer than CLIP's 77
        tokens are cut, as CLIP itself would."""
        if not texts:
            raise InputError("text_features: no texts")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _normalised(_tensor(self.clip.get_text_features(**tokens)))


def _tensor(output: Any) -> torch.Tensor:
    """The embedding tensor of get_*_features: a tensor, or (newer transformers) an output whose pooler_output
    holds it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalised(features: torch.Tensor) -> torch.Tensor:
    features = features.float().cpu()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
