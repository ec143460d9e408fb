from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from elite.model.attention import EliteAttnProcessor, LocalInjection, elite_attention
from elite.model.pipeline import ElitePipeline

HEADS, HEAD_DIM, QUERY_DIM, TEXT_DIM, PATCHES, CONTEXT = 2, 8, 16, 12, 9, 7


@pytest.fixture()
def layer() -> dict[str, object]:
    torch.manual_seed(0)
    attn = Attention(QUERY_DIM, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()
    inner = HEADS * HEAD_DIM
    proj = {name: nn.Linear(TEXT_DIM, inner, bias=False) for name in ("kg", "vg", "kl", "vl")}
    return {"attn": attn, **proj,
            "hidden": torch.randn(3, 10, QUERY_DIM),  # (batch, queries, query_dim); row 0 plays "unconditional"
            "context": torch.randn(3, CONTEXT, TEXT_DIM),
            "local": torch.randn(2, 2, PATCHES, TEXT_DIM),  # rows 1 and 2, two slots each
            "index": torch.tensor([[2, 5], [4, 0]]),
            "weight": torch.tensor([[0.8, 0.8], [0.8, 0.0]])}  # row 2 has one real slot and one padding


def _run(layer: dict, injection: LocalInjection | None) -> torch.Tensor:
    proc = EliteAttnProcessor(layer["kg"], layer["vg"], layer["kl"], layer["vl"], injection)
    with torch.no_grad():
        return proc(layer["attn"], layer["hidden"], layer["context"])


def _injection(layer: dict, scale: float = 1.0, normalization: str = "per_sample") -> LocalInjection:
    return LocalInjection(torch.tensor([1, 2]), layer["local"], layer["index"], layer["weight"] * scale,
                          normalization)  # type: ignore[arg-type]


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)  # (batch, heads, tokens, head_dim)


def test_lambda_zero_equals_default_attention_with_global_kv(layer: dict) -> None:
    reference = copy.deepcopy(layer["attn"])
    reference.to_k.weight.data.copy_(layer["kg"].weight.data)
    reference.to_v.weight.data.copy_(layer["vg"].weight.data)
    reference.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        expected = reference(layer["hidden"], encoder_hidden_states=layer["context"])
    torch.testing.assert_close(_run(layer, _injection(layer, scale=0.0)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_run(layer, None), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalization", ["per_sample", "batch"])
def test_local_branch_equals_the_method_formula(layer: dict, normalization: str) -> None:
    attn = layer["attn"]
    scale = HEAD_DIM ** -0.5
    with torch.no_grad():
        q = _heads(attn.to_q(layer["hidden"]))
        probs = (q @ _heads(layer["kg"](layer["context"])).transpose(-1, -2) * scale).softmax(-1)
        out = probs @ _heads(layer["vg"](layer["context"]))  # (batch, heads, queries, head_dim)
        maps = {(r, s): probs[row, :, :, layer["index"][r, s]] for r, row in enumerate((1, 2)) for s in range(2)}
        for r, row in enumerate((1, 2)):
            for s in range(2):
                if normalization == "per_sample":
                    peak = maps[(r, s)].max()
                else:  # the release: maximum over the whole (conditional) batch
                    peak = torch.stack([maps[(rr, s)] for rr in range(2)]).max()
                a = maps[(r, s)] / peak  # (heads, queries)
                k_local = _heads(layer["kl"](layer["local"][r, s][None]))[0]
                v_local = _heads(layer["vl"](layer["local"][r, s][None]))[0]
                p_local = (q[row] @ k_local.transpose(-1, -2) * scale).softmax(-1)  # (heads, queries, patches)
                out[row] += (p_local * a[..., None] * layer["weight"][r, s]) @ v_local
        expected = attn.to_out[0](out.transpose(1, 2).reshape(3, -1, HEADS * HEAD_DIM))
    got = _run(layer, _injection(layer, normalization=normalization))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the unconditional row gets no local injection
    torch.testing.assert_close(got[0], _run(layer, None)[0], atol=1e-6, rtol=0)


def test_per_sample_normalisation_is_batch_invariant(layer: dict) -> None:
    both = _run(layer, _injection(layer))
    alone = EliteAttnProcessor(layer["kg"], layer["vg"], layer["kl"], layer["vl"], LocalInjection(
        torch.tensor([0]), layer["local"][1:], layer["index"][1:], layer["weight"][1:]))
    with torch.no_grad():
        single = alone(layer["attn"], layer["hidden"][2:], layer["context"][2:])
    torch.testing.assert_close(both[2:], single, atol=1e-6, rtol=0)
    batch_mode = _run(layer, _injection(layer, normalization="batch"))
    assert not torch.allclose(batch_mode[2:], single, atol=1e-4)  # the release's mode depends on the batch


def test_processors_are_installed_and_restored(pipe: ElitePipeline) -> None:
    before = dict(pipe.unet.attn_processors)
    attn2 = [name for name in before if "attn2" in name]
    assert attn2
    with pytest.raises(RuntimeError, match="boom"):
        with elite_attention(pipe.unet, pipe.global_mapper, pipe.local_mapper) as installed:
            now = pipe.unet.attn_processors
            assert set(installed) == set(attn2)
            assert all(isinstance(now[name], EliteAttnProcessor) for name in attn2)
            assert all(now[name] is before[name] for name in before if name not in attn2)
            raise RuntimeError("boom")
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not any(isinstance(m, EliteAttnProcessor) for m in pipe.unet.modules())


def test_attention_mask_applies_to_the_attention_map(layer: dict) -> None:
    # masking every context token but the placeholder's gives A = 1 everywhere (after normalisation):
    # the local term then equals lambda * SDPA over the local tokens, independent of the global scores.
    mask = torch.zeros(3, CONTEXT)
    mask[1, :] = -1e9
    mask[1, layer["index"][0, 0]] = 0.0
    injection = LocalInjection(torch.tensor([1]), layer["local"][:1, :1], layer["index"][:1, :1],
                               layer["weight"][:1, :1])
    proc = EliteAttnProcessor(layer["kg"], layer["vg"], layer["kl"], layer["vl"], injection)
    plain = EliteAttnProcessor(layer["kg"], layer["vg"])
    attn = layer["attn"]
    with torch.no_grad():
        got = proc(attn, layer["hidden"], layer["context"], attention_mask=mask[:, None, :])
        base = plain(attn, layer["hidden"], layer["context"], attention_mask=mask[:, None, :])
        q = _heads(attn.to_q(layer["hidden"][1:2]))
        k_local = _heads(layer["kl"](layer["local"][0, 0][None]))
        v_local = _heads(layer["vl"](layer["local"][0, 0][None]))
        local = torch.nn.functional.scaled_dot_product_attention(q, k_local, v_local) * layer["weight"][0, 0]
        expected = base[1:2] + local.transpose(1, 2).reshape(1, -1, HEADS * HEAD_DIM) @ attn.to_out[0].weight.T
    torch.testing.assert_close(got[1:2], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[[0, 2]], base[[0, 2]], atol=1e-6, rtol=0)
