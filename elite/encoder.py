"""The concept encoder: CLIP vision tower + global mapper + local mapper, in one forward pass."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionModel

from elite.checkpoints import load_mapper
from elite.concepts import ConceptEmbedding, ConceptSource
from elite.errors import CheckpointError, Failure, InputError
from elite.mappers import GlobalMapper, LocalMapper
from elite.preprocessing import ConceptPreprocessor, open_image

FEATURE_LAYERS = (4, 8, 12, 16)  # method doc: hidden_states indices used after the last layer's output


class ConceptEncoder(Protocol):
    """Anything that turns concept images (and optional masks) into concept embeddings."""

    @property
    def encoder_id(self) -> str:
        """Identifies the weights (and engine): stored with every embedding, part of the dedupe key."""
        ...

    def encode(self, images: Sequence[Image.Image], masks: Sequence[Image.Image | None] | None = None,
               concept_ids: Sequence[str] | None = None) -> list[ConceptEmbedding]: ...


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
        out = self.vision_model(pixel_values=both, output_hidden_states=True)
        features = [out.last_hidden_state, *(out.hidden_states[i] for i in self.feature_layers)]
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

    def __init__(self, module: ConceptEncoderModule, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        config = module.vision_model.config
        self.module = module.to(device=device, dtype=dtype).eval()
        self.preprocessor = ConceptPreprocessor(config.image_size, config.image_size // config.patch_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self._encoder_id: str | None = None

    @classmethod
    def from_pretrained(cls, vision_model: str | os.PathLike[str], global_mapper: str | os.PathLike[str],
                        local_mapper: str | os.PathLike[str],
                        cross_attention_layers: tuple[tuple[str, int], ...] | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        ) -> TorchConceptEncoder:
        """Load a CLIP vision tower (hub id or folder) and the two mapper files (`.pt` or safetensors)."""
        vision = CLIPVisionModel.from_pretrained(vision_model, torch_dtype=dtype)
        glob = load_mapper(GlobalMapper, global_mapper, cross_attention_layers, dtype=dtype)
        local = load_mapper(LocalMapper, local_mapper, cross_attention_layers, dtype=dtype)
        check_vision_model(vision, glob, str(vision_model))
        return cls(ConceptEncoderModule(vision, glob, local), device=device, dtype=dtype)

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


def encode_isolated(encoder: ConceptEncoder, items: Sequence[tuple[str, Image.Image, Image.Image | None]],
                    ) -> tuple[list[ConceptEmbedding], list[Failure]]:
    """Encode (concept id, image, mask) items as one batch; if one item spoils it, encode one by one."""
    if not items:
        return [], []
    try:
        return encoder.encode([x[1] for x in items], [x[2] for x in items], [x[0] for x in items]), []
    except InputError:  # one bad item spoils the batch: encode one by one to isolate it
        embeddings: list[ConceptEmbedding] = []
        failures: list[Failure] = []
        for concept_id, image, mask in items:
            try:
                embeddings += encoder.encode([image], [mask], [concept_id])
            except InputError as err:
                failures.append(Failure(concept_id, "preprocess", str(err)))
        return embeddings, failures


def encode_sources(encoder: ConceptEncoder, sources: Sequence[ConceptSource], batch_size: int = 8,
                   show_progress: bool = True) -> tuple[list[ConceptEmbedding], list[Failure]]:
    """Encode concept files in batches; a bad item is recorded as a Failure and the rest carry on."""
    embeddings: list[ConceptEmbedding] = []
    failures: list[Failure] = []
    with tqdm(total=len(sources), desc="encoding", unit="concept", disable=not show_progress) as bar:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            loaded = []
            for source in chunk:
                try:
                    image = open_image(source.image, name=source.concept_id)
                    mask = open_image(source.mask, name=f"{source.concept_id} mask") if source.mask else None
                    loaded.append((source.concept_id, image, mask))
                except InputError as err:
                    failures.append(Failure(source.concept_id, "read", str(err)))
            encoded, bad = encode_isolated(encoder, loaded)
            embeddings += encoded
            failures += bad
            bar.update(len(chunk))
    return embeddings, failures


def load_encoder(engine: str = "torch", *, onnx_path: str | os.PathLike[str] | None = None,
                 vision_model: str | os.PathLike[str] | None = None,
                 global_mapper: str | os.PathLike[str] | None = None,
                 local_mapper: str | os.PathLike[str] | None = None,
                 pretrained_model: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ConceptEncoder:
    """An ONNX Runtime encoder (`engine="onnx"`) or a torch one; `pretrained_model` names the UNet whose
    cross-attention layers the mapper files were built for (default: SD 1.x)."""
    if engine == "onnx":
        from elite.onnx_encoder import OnnxConceptEncoder

        if not onnx_path:
            raise InputError("engine 'onnx' needs an ONNX encoder file (write one with `elite export-onnx`)")
        return OnnxConceptEncoder(onnx_path)
    if engine != "torch":
        raise InputError(f"engine must be 'torch' or 'onnx', got {engine!r}")
    if not (vision_model and global_mapper and local_mapper):
        raise InputError("engine 'torch' needs a vision model and both mapper files")
    from elite.pipeline import unet_cross_attention_layers  # the pipeline module imports this one

    layers = unet_cross_attention_layers(pretrained_model) if pretrained_model else None
    return TorchConceptEncoder.from_pretrained(vision_model, global_mapper, local_mapper, layers,
                                               device=device, dtype=dtype)
