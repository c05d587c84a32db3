"""Public denoiser configs of real base models, for building them with random weights (no download).

Taken from the `unet/config.json` (FLUX: `transformer/`, `text_encoder_2/`, `vae/`) of the public
checkpoints (fields equal to diffusers' or transformers' defaults left out); the parameter counts are
the published ones: SD 1.5 859.5M, SDXL base 2567.5M, FLUX.1-dev 11.90B (T5-XXL encoder 4.76B).
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

# FLUX.1-dev (black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream blocks of width
# 24 heads x 128 = 3072; the latent packed 2x2 into 64-channel tokens (patch_size 1); T5 states of
# width 4096 and CLIP-L's pooled 768; the distilled guidance embedding (dev; schnell has none).
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,  # google/t5-v1_1-xxl's encoder
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, tie_word_embeddings=False)
FLUX_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True)  # 16 channels, still 8x smaller
FLUX_TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length: T5's states the transformer attends to
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
