"""Public denoiser configs of real base models, for building them with random weights (no download).

Taken from the `unet/config.json` of the public checkpoints (fields equal to diffusers' defaults
left out); the parameter counts are the published ones: SD 1.5 859.5M, SDXL base 2567.5M.
Used by the memory benchmark and the memory plan (through the families' rows in
backends/registry.py: `registry.public_config(name)`); the real-model backends load real weights.
"""

from __future__ import annotations

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
)

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

# The other components, for the memory plan (parameter counts checked: 123.06M, 694.66M, 83.65M).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,  # openai/clip-vit-large-patch14
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,  # OpenCLIP ViT-bigG/14
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
SDXL_VAE = dict(SD_VAE, force_upcast=True)  # SDXL's VAE overflows in fp16
TEXT_TOKENS = 77
LATENT_CHANNELS, VAE_SCALE = 4, 8  # the SD VAE: 8x smaller, 4 channels


def build_unet(config: dict, device="cpu"):
    """A full-size UNet of a public `config` (e.g. SDXL_UNET) with random weights (device "meta": shapes only)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**config)


def conditioning(config: dict, batch: int) -> dict:
    """Random text conditioning of the right shapes for a UNet `config`: encoder_hidden_states (B, 77, D)
    and, for SDXL, added_cond_kwargs (pooled text_embeds (B, 1280), time_ids (B, 6))."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {"encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g)}
    if config.get("addition_embed_type") == "text_time":
        out["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                    "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).expand(batch, -1)}
    return out
