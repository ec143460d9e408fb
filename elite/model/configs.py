"""Real-size model configurations of the reference setup (method doc, "Models").

Used to build random-weight models at real size for key/shape checks and benchmarks,
and as the release layout the public mapper checkpoints must match.
"""

from __future__ import annotations

from typing import Any

# CompVis/stable-diffusion-v1-4 unet/config.json (the fields that shape the network).
SD14_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# openai/clip-vit-large-patch14 vision_config.
CLIP_L14_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# CompVis/stable-diffusion-v1-4 vae/config.json (the fields that shape the network).
SD14_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215}

# openai/clip-vit-large-patch14 text_config (SD 1.4's text encoder).
CLIP_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}

# The 16 cross-attention layers of the SD 1.x UNet with their inner (query) width, in module order.
SD1_CROSS_ATTENTION_LAYERS: tuple[tuple[str, int], ...] = (
    *(
        (f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", width)
        for b, width in ((0, 320), (1, 640), (2, 1280))
        for a in range(2)
    ),
    *(
        (f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", width)
        for b, width in ((1, 1280), (2, 640), (3, 320))
        for a in range(3)
    ),
    ("mid_block.attentions.0.transformer_blocks.0.attn2", 1280),
)
