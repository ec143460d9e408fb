from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from elite.model.checkpoints import expected_shapes
from elite.model.configs import SD1_CROSS_ATTENTION_LAYERS, SD14_UNET_CONFIG
from elite.model.mappers import GlobalMapper, LocalMapper, MapperConfig, cross_attention_layers


def release_layout() -> dict[str, tuple[int, ...]]:
    """The public release's keys and shapes, written out from the method doc independently of the code."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(5):
        for name in (f"mapping_{i}", f"mapping_patch_{i}"):
            shapes |= {f"{name}.0.weight": (1024, 1024), f"{name}.0.bias": (1024,),
                       f"{name}.1.weight": (1024,), f"{name}.1.bias": (1024,),
                       f"{name}.3.weight": (1024, 1024), f"{name}.3.bias": (1024,),
                       f"{name}.4.weight": (1024,), f"{name}.4.bias": (1024,),
                       f"{name}.6.weight": (768, 1024), f"{name}.6.bias": (768,)}
    attn = []
    for block, width in ((0, 320), (1, 640), (2, 1280)):
        attn += [(f"down_blocks_{block}_attentions_{a}", width) for a in range(2)]
    for block, width in ((1, 1280), (2, 640), (3, 320)):
        attn += [(f"up_blocks_{block}_attentions_{a}", width) for a in range(3)]
    attn.append(("mid_block_attentions_0", 1280))
    for prefix, width in attn:
        for proj in ("to_k", "to_v"):
            shapes[f"{prefix}_transformer_blocks_0_attn2_{proj}.weight"] = (width, 768)
    return shapes


def test_sd14_unet_has_the_16_release_layers() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    assert cross_attention_layers(unet) == SD1_CROSS_ATTENTION_LAYERS
    assert len(cross_attention_layers(unet)) == 16


def test_both_mappers_match_the_public_layout_at_real_size() -> None:
    expected = release_layout()
    assert len(expected) == 132
    assert sum(torch.Size(s).numel() for s in expected.values()) == 48_074_240
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
        config = MapperConfig(cross_attention_layers=cross_attention_layers(unet))
        for cls in (GlobalMapper, LocalMapper):
            state = cls(config).state_dict()
            assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert expected_shapes(MapperConfig()) == expected


def test_mapper_outputs_follow_the_method() -> None:
    torch.manual_seed(0)
    config = MapperConfig(input_dim=8, hidden_dim=16, output_dim=12, cross_attention_layers=(("a.attn2", 6),))
    features = [torch.randn(2, 1 + 9, 8) for _ in range(5)]  # (batch, cls + patches, input_dim)
    glob, local = GlobalMapper(config).eval(), LocalMapper(config).eval()
    words = glob(features)
    assert words.shape == (2, 5, 12)
    # word i = mapping_i(CLS) + mean over patches of mapping_patch_i(patch)
    expect_w3 = glob.mapping_3(features[3][:, :1]) + glob.mapping_patch_3(features[3][:, 1:]).mean(1, keepdim=True)
    torch.testing.assert_close(words[:, 3:4], expect_w3)
    tokens = local(features)
    assert tokens.shape == (2, 9, 12)
    expect_tokens = sum(getattr(local, f"mapping_{i}")(f[:, :1]) + getattr(local, f"mapping_patch_{i}")(f[:, 1:])
                        for i, f in enumerate(features)) / 5
    torch.testing.assert_close(tokens, expect_tokens)
    to_k, to_v = glob.key_value("a.attn2")
    assert to_k.weight.shape == (6, 12) and to_k.bias is None and to_v.bias is None
