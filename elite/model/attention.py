"""ELITE's cross-attention: global key/value copies plus the attention-weighted local branch.

Per cross-attention layer, with q from the image features (method doc, "Local mapping network"):
    out = softmax(q k_g^T s) v_g + lambda * A * softmax(q k_l^T s) v_l
where A is the attention of each query on the placeholder token, normalised by its maximum.
Because A is one number per query, (P_l * A) v_l = A * (P_l v_l), so both terms run on
`F.scaled_dot_product_attention`; only A needs the explicit global scores (a few context tokens).

Normalisation of A: the release divides by the maximum over the whole batch, so an image depends on
the others generated with it. The default here, "per_sample", divides by each sample's own maximum
over heads and queries (batch-invariant); "batch" keeps the release's behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from elite.errors import InputError
from elite.model.mappers import GlobalMapper, LocalMapper

Normalization = Literal["per_sample", "batch"]


@dataclass(frozen=True)
class LocalInjection:
    """What the local branch needs for one generation call."""

    rows: torch.Tensor  # (injected,) long: UNet batch rows that get the local branch (never the unconditional half)
    local_tokens: torch.Tensor  # (injected, slots, patches, text_dim): zero for padding slots
    placeholder_index: torch.Tensor  # (injected, slots) long: token position of each slot's placeholder
    slot_weight: torch.Tensor  # (injected, slots): lambda for real slots, 0 for padding
    normalization: Normalization = "per_sample"


class EliteAttnProcessor(nn.Module):
    """Cross-attention processor owning only ELITE's extra projections; q and the output come from the host."""

    to_k_global: nn.Linear
    to_v_global: nn.Linear
    to_k_local: nn.Linear | None
    to_v_local: nn.Linear | None

    def __init__(self, to_k_global: nn.Linear, to_v_global: nn.Linear, to_k_local: nn.Linear | None = None,
                 to_v_local: nn.Linear | None = None, injection: LocalInjection | None = None) -> None:
        super().__init__()
        self.to_k_global = to_k_global
        self.to_v_global = to_v_global
        self.to_k_local = to_k_local
        self.to_v_local = to_v_local
        self.injection = injection
        self._local_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_injection(self, injection: LocalInjection | None) -> None:
        """What the next call injects (processors installed once for many calls: a compiled UNet)."""
        self.injection = injection
        self._local_kv = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("EliteAttnProcessor serves cross-attention layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (batch, hw, c)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = self.to_k_global(encoder_hidden_states)
        value = self.to_v_global(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, queries, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, context, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        if self.injection is not None and self.to_k_local is not None:
            out = out.index_add(0, self.injection.rows.to(out.device),
                                self._local_term(attn, query, key, attention_mask))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (batch, queries, inner)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _local_term(self, attn: Attention, query: torch.Tensor, key: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
        injection = self.injection
        assert injection is not None
        rows = injection.rows.to(query.device)
        query_rows = query[rows]  # (injected, heads, queries, head_dim)
        injected, heads, queries, head_dim = query_rows.shape
        slots = injection.placeholder_index.shape[1]

        # A: attention of every query on each slot's placeholder token, from the global scores.
        scores = query_rows @ key[rows].transpose(-1, -2) * attn.scale  # (injected, heads, queries, context)
        if attention_mask is not None:  # the same additive mask the global attention used
            scores = scores + attention_mask[rows]
        index = injection.placeholder_index.to(query.device)[:, None, None, :].expand(-1, heads, queries, -1)
        attention_map = scores.softmax(dim=-1).gather(-1, index)  # (injected, heads, queries, slots)
        if injection.normalization == "per_sample":
            peak = attention_map.amax(dim=(1, 2), keepdim=True)  # (injected, 1, 1, slots)
        else:
            peak = attention_map.amax(dim=(0, 1, 2), keepdim=True)  # (1, 1, 1, slots): the release's batch max
        attention_map = attention_map / peak * injection.slot_weight.to(attention_map)[:, None, None, :]

        key_local, value_local = self._local_key_value(heads, head_dim, query.dtype)  # (injected*slots, h, p, d)
        query_slots = query_rows.unsqueeze(1).expand(-1, slots, -1, -1, -1).reshape(-1, heads, queries, head_dim)
        local = F.scaled_dot_product_attention(query_slots, key_local, value_local, scale=attn.scale)
        local = local.view(injected, slots, heads, queries, head_dim)
        weights = attention_map.permute(0, 3, 1, 2).unsqueeze(-1)  # (injected, slots, heads, queries, 1)
        return (local * weights).sum(dim=1)  # (injected, heads, queries, head_dim)

    def _local_key_value(self, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # The local tokens are fixed for the whole call: project them once (not under autograd, so
        # training recomputes them every forward and keeps its graph).
        if self._local_kv is not None:
            return self._local_kv
        assert self.injection is not None and self.to_k_local is not None and self.to_v_local is not None
        tokens = self.injection.local_tokens.to(self.to_k_local.weight)
        tokens = tokens.flatten(0, 1)  # (injected * slots, patches, text_dim)
        key = self.to_k_local(tokens).view(tokens.shape[0], -1, heads, head_dim).transpose(1, 2).to(dtype)
        value = self.to_v_local(tokens).view(tokens.shape[0], -1, heads, head_dim).transpose(1, 2).to(dtype)
        if not torch.is_grad_enabled():
            self._local_kv = (key, value)
        return key, value


def install_processors(unet: UNet2DConditionModel, global_mapper: GlobalMapper, local_mapper: LocalMapper | None = None,
                       injection: LocalInjection | None = None) -> tuple[dict[str, Any], dict[str, EliteAttnProcessor]]:
    """Install ELITE processors on the mapper's cross-attention layers: (the processors there before, the
    installed ones by processor name)."""
    original = dict(unet.attn_processors)
    layers = [path for path, _ in global_mapper.config.cross_attention_layers]
    missing = [path for path in layers if f"{path}.processor" not in original]
    if missing:
        raise InputError(f"the UNet has no attention layer {missing[0]!r} that the mapper was built for")
    installed = {}
    for path in layers:
        to_k_global, to_v_global = global_mapper.key_value(path)
        to_k_local, to_v_local = local_mapper.key_value(path) if local_mapper is not None else (None, None)
        installed[f"{path}.processor"] = EliteAttnProcessor(to_k_global, to_v_global, to_k_local, to_v_local,
                                                            injection)
    unet.set_attn_processor({**original, **installed})
    return original, installed


@contextlib.contextmanager
def elite_attention(unet: UNet2DConditionModel, global_mapper: GlobalMapper, local_mapper: LocalMapper | None = None,
                    injection: LocalInjection | None = None) -> Iterator[dict[str, EliteAttnProcessor]]:
    """Install ELITE processors on the mapper's cross-attention layers; restore the originals on exit."""
    original, installed = install_processors(unet, global_mapper, local_mapper, injection)
    try:
        yield installed
    finally:
        unet.set_attn_processor(dict(original))  # diffusers pops from the dict it is given
