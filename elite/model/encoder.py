"""The concept encoder: CLIP vision tower + global mapper + local mapper, in one forward pass."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionModel

from elite.errors import CheckpointError, InputError
from elite.model.checkpoints import load_mapper, load_pretrained
from elite.model.concepts import ConceptEmbedding
from elite.model.devices import DeviceArg, DtypeArg, check_torch_device, resolve_device, resolve_dtype
from elite.model.mappers import GlobalMapper, LocalMapper
from elite.model.preprocessing import ConceptPreprocessor

FEATURE_LAYERS = (4, 8, 12, 16)  # method doc: hidden_states indices used after the last layer's output


class ConceptEncoder(Protocol):
    """Anything that turns concept images (and optional masks) into concept embeddings."""

    @property
    def encoder_id(self) -> str:
        """Identifies the weights (and engine): stored with every embedding, part of the dedupe key."""
        ...

    @property
    def device(self) -> str:
        """Where it encodes ("cpu", "cuda:0"), for jobs to report."""
        ...

    def encode(self, images: Sequence[Image.Image], masks: Sequence[Image.Image | None] | None = None,
               concept_ids: Sequence[str] | None = None) -> list[ConceptEmbedding]: ...


def vision_features(vision_model: CLIPVisionModel, pixel_values: torch.Tensor,
                    feature_layers: tuple[int, ...] = FEATURE_LAYERS) -> list[torch.Tensor]:
    """The five feature maps the mappers read (method doc, "Multi-layer features"): the last layer's output, then
    hidden states 4, 8, 12 and 16, each (batch, 1 + patches, hidden)."""
    out = vision_model(pixel_values=pixel_values, output_hidden_states=True)
    return [out.last_hidden_state, *(out.hidden_states[i] for i in feature_layers)]


class ConceptEncoderModule(nn.Module):
    """Tensors in, tensors out: the graph exported to ONNX and run by the torch encoder."""

    def __init__(self, vision_model: CLIPVisionModel, global_mapper: GlobalMapper, local_mapper: LocalMapper,
                 feature_layers: tuple[int, ...] = FEATURE_LAYERS) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.global_mapper = global_mapper
        self.local_mapper = local_mapper
        self.feature_layers = feature_layers

    def forward(self, pixel_values: torch.Tensor, object_pixel_values: torch.Tensor,
                mask_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pixel_values.shape[0]
        both = torch.cat([pixel_values, object_pixel_values], dim=0)  # (2 * batch, 3, size, size)
        features = vision_features(self.vision_model, both, self.feature_layers)
        words = self.global_mapper([f[:batch] for f in features])  # (batch, 5, text_dim)
        local_tokens = self.local_mapper([f[batch:] for f in features])  # (batch, patches, text_dim)
        patch_mask = mask_grid.reshape(batch, -1, 1).to(local_tokens.dtype)  # (batch, patches, 1)
        return words, local_tokens * patch_mask


def check_vision_model(vision_model: CLIPVisionModel, global_mapper: GlobalMapper, source: str) -> None:
    config = vision_model.config
    if config.hidden_size != global_mapper.config.input_dim:
        raise CheckpointError(f"{source}: vision hidden size {config.hidden_size} does not match the mappers' "
                              f"input size {global_mapper.config.input_dim}")
    if config.num_hidden_layers < max(FEATURE_LAYERS):
        raise CheckpointError(f"{source}: {config.num_hidden_layers} layers, ELITE reads hidden state "
                              f"{max(FEATURE_LAYERS)}")


class PreprocessingEncoder:
    """Shared front half of every encoder: PIL images and masks -> model inputs -> ConceptEmbeddings."""

    preprocessor: ConceptPreprocessor

    def _run(self, pixel_values: torch.Tensor, object_pixel_values: torch.Tensor,
             mask_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode(self, images: Sequence[Image.Image], masks: Sequence[Image.Image | None] | None = None,
               concept_ids: Sequence[str] | None = None) -> list[ConceptEmbedding]:
        ids = list(concept_ids) if concept_ids is not None else [f"concept-{i}" for i in range(len(images))]
        mask_list = list(masks) if masks is not None else [None] * len(images)
        if not (len(ids) == len(images) == len(mask_list)):
            raise InputError(f"got {len(images)} images, {len(mask_list)} masks and {len(ids)} concept ids")
        if not images:
            return []
        prepared = [self.preprocessor(image, mask, name=cid)
                    for image, mask, cid in zip(images, mask_list, ids, strict=True)]
        pixel_values = torch.stack([p.pixel_values for p in prepared])  # (batch, 3, size, size)
        object_pixel_values = torch.stack([p.object_pixel_values for p in prepared])
        mask_grid = torch.stack([p.mask_grid for p in prepared])  # (batch, grid, grid)
        words, local_tokens = self._run(pixel_values, object_pixel_values, mask_grid)
        return [ConceptEmbedding(cid, words[i].float().cpu(), local_tokens[i].float().cpu(), mask_grid[i])
                for i, cid in enumerate(ids)]


class TorchConceptEncoder(PreprocessingEncoder):
    """Encode concept images with PyTorch; preprocessing travels with the model so they cannot drift."""

    def __init__(self, module: ConceptEncoderModule, device: DeviceArg = "cpu", dtype: DtypeArg = torch.float32,
                 ) -> None:
        """`device`, `dtype`: as `elite.model.devices` reads them ("auto": the GPU in float16, else the CPU in
        float32). The explicit CPU float32 default keeps direct users (tests, exports) on the exact reference."""
        where = check_torch_device(resolve_device(device))
        self.dtype = resolve_dtype(dtype, where)
        self.device: str = str(where)  # where it encodes, as jobs report it ("cpu", "cuda:0")
        config = module.vision_model.config
        self.module = module.to(device=where, dtype=self.dtype).eval()
        self.preprocessor = ConceptPreprocessor(config.image_size, config.image_size // config.patch_size)
        self._encoder_id: str | None = None

    @classmethod
    def from_pretrained(cls, vision_model: str | os.PathLike[str], global_mapper: str | os.PathLike[str],
                        local_mapper: str | os.PathLike[str],
                        cross_attention_layers: tuple[tuple[str, int], ...] | None = None,
                        device: DeviceArg = "cpu", dtype: DtypeArg = torch.float32,
                        ) -> TorchConceptEncoder:
        """Load a CLIP vision tower (hub id or folder) and the two mapper files (`.pt` or safetensors)."""
        where = check_torch_device(resolve_device(device))  # before any weight is read: a bad device fails fast
        torch_dtype = resolve_dtype(dtype, where)
        vision = load_pretrained("vision model", CLIPVisionModel, vision_model, torch_dtype=torch_dtype)
        glob = load_mapper(GlobalMapper, global_mapper, cross_attention_layers, dtype=torch_dtype)
        local = load_mapper(LocalMapper, local_mapper, cross_attention_layers, dtype=torch_dtype)
        check_vision_model(vision, glob, str(vision_model))
        return cls(ConceptEncoderModule(vision, glob, local), device=where, dtype=torch_dtype)

    @property
    def encoder_id(self) -> str:
        """`torch-<sha256 of the weights' content>`: equal weights give equal ids, whatever the files."""
        if self._encoder_id is None:
            self._encoder_id = f"torch-{state_digest(self.module)}"
        return self._encoder_id

    @torch.inference_mode()
    def _run(self, pixel_values: torch.Tensor, object_pixel_values: torch.Tensor,
             mask_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(pixel_values.to(self.device, self.dtype),
                           object_pixel_values.to(self.device, self.dtype), mask_grid.to(self.device, self.dtype))


def state_digest(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes and bytes), independent of file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
