"""The global and local mapping networks, laid out exactly as the public release's state dicts.

Both files of the release hold, for i in 0..4, `mapping_{i}` and `mapping_patch_{i}` (Linear 0/3/6,
LayerNorm 1/4) plus a bias-free `to_k`/`to_v` copy per UNet cross-attention layer, stored under the
layer's module path with dots replaced by underscores (method doc, "Checkpoint format").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from elite.model.configs import SD1_CROSS_ATTENTION_LAYERS


@dataclass(frozen=True)
class MapperConfig:
    input_dim: int = 1024  # CLIP ViT-L/14 vision hidden size
    hidden_dim: int = 1024  # release: width of every MLP
    output_dim: int = 768  # CLIP ViT-L/14 text hidden size (= UNet cross_attention_dim)
    num_branches: int = 5  # paper: last layer + hidden states 4, 8, 12, 16
    # (UNet module path of each cross-attention layer, its inner width): defaults to SD 1.x
    cross_attention_layers: tuple[tuple[str, int], ...] = SD1_CROSS_ATTENTION_LAYERS


def layer_key(layer_path: str) -> str:
    """The release's attribute name for a UNet module path: dots become underscores."""
    return layer_path.replace(".", "_")


def cross_attention_layers(unet: nn.Module) -> tuple[tuple[str, int], ...]:
    """Every cross-attention (`attn2`) layer of a diffusers UNet with its inner width, in module order."""
    layers = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False):
            layers.append((name, module.to_k.out_features))
    return tuple(layers)


def _mlp(config: MapperConfig) -> nn.Sequential:
    # Indices 0/3/6 are Linear and 1/4 LayerNorm: the release's key names depend on this order.
    return nn.Sequential(
        nn.Linear(config.input_dim, config.hidden_dim),
        nn.LayerNorm(config.hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(config.hidden_dim, config.hidden_dim),
        nn.LayerNorm(config.hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(config.hidden_dim, config.output_dim),
    )


class _Mapper(nn.Module):
    """Five CLS/patch MLP pairs plus per-layer key/value projections for the UNet's cross-attention."""

    def __init__(self, config: MapperConfig) -> None:
        super().__init__()
        self.config = config
        for i in range(config.num_branches):
            self.add_module(f"mapping_{i}", _mlp(config))
            self.add_module(f"mapping_patch_{i}", _mlp(config))
        for path, inner_dim in config.cross_attention_layers:
            self.add_module(f"{layer_key(path)}_to_k", nn.Linear(config.output_dim, inner_dim, bias=False))
            self.add_module(f"{layer_key(path)}_to_v", nn.Linear(config.output_dim, inner_dim, bias=False))

    def key_value(self, layer_path: str) -> tuple[nn.Linear, nn.Linear]:
        """The (to_k, to_v) projections this mapper holds for one UNet cross-attention layer."""
        key = layer_key(layer_path)
        return getattr(self, f"{key}_to_k"), getattr(self, f"{key}_to_v")

    def _branches(self, features: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(features) != self.config.num_branches:
            raise ValueError(f"expected {self.config.num_branches} feature maps, got {len(features)}")
        outputs = []
        for i, feature in enumerate(features):
            cls_token, patch_tokens = feature[:, :1], feature[:, 1:]  # (batch, 1, in), (batch, patches, in)
            cls_out = getattr(self, f"mapping_{i}")(cls_token)  # (batch, 1, out)
            outputs.append((cls_out, getattr(self, f"mapping_patch_{i}")(patch_tokens)))  # (batch, patches, out)
        return outputs


def copy_unet_key_values(mapper: _Mapper, unet: nn.Module) -> None:
    """Start every k/v copy of `mapper` from its UNet layer's own `to_k`/`to_v` (method doc: how training begins)."""
    for path, _ in mapper.config.cross_attention_layers:
        to_k, to_v = mapper.key_value(path)
        host: Any = unet.get_submodule(path)  # a diffusers Attention
        to_k.weight.data.copy_(host.to_k.weight.data)
        to_v.weight.data.copy_(host.to_v.weight.data)


class GlobalMapper(_Mapper):
    """Stage 1: five feature maps -> five words; word 0 is the primary word w0."""

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        words = [cls + patches.mean(dim=1, keepdim=True) for cls, patches in self._branches(features)]
        return torch.cat(words, dim=1)  # (batch, branches, output_dim)


class LocalMapper(_Mapper):
    """Stage 2: five feature maps of the object image -> one local token per patch (not yet masked)."""

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        per_branch = [cls + patches for cls, patches in self._branches(features)]  # each (batch, patches, out)
        return torch.stack(per_branch, dim=0).mean(dim=0)  # (batch, patches, output_dim)
