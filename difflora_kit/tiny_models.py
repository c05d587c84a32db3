"""Tiny random-weight Stable Diffusion 1.x and SDXL pipelines, saved as real diffusers folders.

The real-model code paths (`--base PATH`) are tested offline with these: the *same* diffusers and
transformers classes as the public checkpoints (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTextModelWithProjection, SDXL's `addition_embed_type="text_time"`), a few thousand times
smaller, random weights, no download. The tokenizer is the toy model's word-level CLIP tokenizer.

    make_tiny_pipeline("sdxl", "out/tiny_sdxl")   # then: difflora pair A.png B.png --base out/tiny_sdxl ...

"flux": FluxPipeline with a tiny FluxTransformer2DModel (guidance-embedded, like FLUX.1 dev), a
16-channel AutoencoderKL with shift_factor, CLIPTextModel (pooled) + T5EncoderModel, and the
FlowMatchEulerDiscreteScheduler with dynamic shifting (dev's settings). The toy tokenizer fills both
tokenizer slots.

"zimage": ZImagePipeline (Z-Image-Turbo's layout) with a tiny ZImageTransformer2DModel (the real model's
patch size 2, RoPE axes lengths, qk-norm; head_dim = sum(axes_dims)), the FLUX-like 16-channel VAE (Z-Image
uses FLUX's VAE constants), a tiny Qwen3Model text encoder (the prompt's states are its hidden_states[-2]),
the toy tokenizer with a small chat template (the pipeline formats every prompt with
`apply_chat_template`), and Z-Image-Turbo's FlowMatchEulerDiscreteScheduler (static shift 3).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .files import atomic_directory
from .backends.toy import DEFAULT_FOLDER as TOY_FOLDER

HIDDEN = 32  # width of each tiny text encoder
IMAGE_SIZE = 64  # pixels; latents are 8x8


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def _text_encoder(vocab: int, max_len: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=max_len, projection_dim=HIDDEN,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
                         block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=IMAGE_SIZE)


def _unet(family: str, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=4)
    if family == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=HIDDEN,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    time_dim = 8
    return UNet2DConditionModel(**common, cross_attention_dim=2 * HIDDEN, use_linear_projection=True,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + HIDDEN)


def _flux_parts(vocab: int, max_len: int, seed: int) -> dict:
    """The FLUX-specific components: transformer, 16-channel VAE, T5 encoder, flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=HIDDEN,
                                         pooled_projection_dim=HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8, layers_per_block=1,
                        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=IMAGE_SIZE, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's VAE constants
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0,
                                 feed_forward_proj="gated-gelu", n_positions=max_len))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)  # FLUX.1 dev's scheduler config
    return dict(transformer=transformer, vae=vae, text_encoder_2=t5, scheduler=scheduler)


# Z-Image's chat template, cut down: the real one (Qwen3's) gives "<|im_start|>user\n{prompt}<|im_end|>\n
# <|im_start|>assistant\n" for the pipeline's call (enable_thinking=True adds no think block). This one
# gives "user {prompt} assistant", words the toy tokenizer spells with its own letters.
ZIMAGE_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} {{ message['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant{% if enable_thinking is defined and "
                        "not enable_thinking %} think{% endif %}{% endif %}")


def _zimage_parts(vocab: int, seed: int) -> dict:
    """The Z-Image components: transformer, 16-channel VAE, Qwen3 text encoder, Z-Image-Turbo's scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64,
                                           n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, qk_norm=True,
                                           cap_feat_dim=HIDDEN, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512])
    with torch.no_grad():  # zeros at init (learned in the real model): random, so padding is visible in tests
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8, layers_per_block=1,
                        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=IMAGE_SIZE, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)  # Z-Image's (FLUX's)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6,
                                          rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=0,
                                          eos_token_id=1, pad_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                use_dynamic_shifting=False)  # Z-Image-Turbo's scheduler config
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def make_tiny_pipeline(family: str, folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny random `family` ("sd15", "sdxl", "flux" or "zimage") pipeline to `folder` with
    save_pretrained (`prediction_type`: SD only; FLUX and Z-Image are flow-matching models)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in ("sd15", "sdxl", "flux", "zimage"):
        raise ValueError(f"family must be sd15, sdxl, flux or zimage, got {family!r}")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        shutil.copytree(TOY_FOLDER / "tokenizer", tok_dir)
        tokenizer = _tokenizer(tok_dir)
    vocab, max_len = len(tokenizer), tokenizer.model_max_length
    if family == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline(**_flux_parts(vocab, max_len, seed), tokenizer=tokenizer, tokenizer_2=tokenizer,
                            text_encoder=_text_encoder(vocab, max_len, projection=False, seed=seed + 3))
        with atomic_directory(Path(folder)) as out:
            pipe.save_pretrained(out, safe_serialization=True)
        return Path(folder)
    if family == "zimage":
        from diffusers import ZImagePipeline

        tokenizer.chat_template = ZIMAGE_CHAT_TEMPLATE
        pipe = ZImagePipeline(**_zimage_parts(vocab, seed), tokenizer=tokenizer)
        with atomic_directory(Path(folder)) as out:
            pipe.save_pretrained(out, safe_serialization=True)
        return Path(folder)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, steps_offset=1,
                              clip_sample=False)
    parts = dict(vae=_vae(seed), unet=_unet(family, seed + 1), scheduler=scheduler, tokenizer=tokenizer,
                 text_encoder=_text_encoder(vocab, max_len, projection=False, seed=seed + 2))
    if family == "sd15":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True,
                                         text_encoder_2=_text_encoder(vocab, max_len, projection=True, seed=seed + 3))
    with atomic_directory(Path(folder)) as out:
        pipe.save_pretrained(out, safe_serialization=True)
    return Path(folder)
