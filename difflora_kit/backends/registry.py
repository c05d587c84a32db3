"""Every model family the kit knows, one row each: the one place where a family is named.

A new family is one backend module (difflora_kit/backends/<module>.py, a `Backend`) and one row
here. The rest of the kit reads a family's facts from its row and never compares family names:

    row = registry.by_pipeline("StableDiffusionXLPipeline")   # model_index.json's _class_name
    row.key, row.denoiser_folder, row.lora_prefix, row.sampling, row.plan, row.kohya

A row is plain data (strings, dicts): reading it imports no model library; the backend class is
imported the first time a base of that family is loaded (`row.backend_class()`).
"""

from __future__ import annotations

import dataclasses
import importlib

from .. import model_configs
from ..config import SampleConfig


@dataclasses.dataclass(frozen=True)
class PublicConfig:
    """The public configs of a family's best-known checkpoint, for `difflora plan --base KEY` and the
    memory benchmark: nothing downloaded, shapes only."""

    unet: dict
    text_encoders: tuple[tuple[str, dict], ...]  # (transformers class name, its config)
    vae: dict
    tokens: int = model_configs.TEXT_TOKENS
    sample_size: int | None = None
    """Pixels the base draws (None: the UNet's sample_size x the VAE's 8)."""


@dataclasses.dataclass(frozen=True)
class Family:
    key: str
    """What `backends.family` returns and LoRA metadata records, e.g. "sdxl"."""
    label: str
    """For messages: "SDXL"."""
    pipelines: tuple[str, ...]
    """model_index.json `_class_name` values of this family's folders."""
    backend: str
    """"module:Class" of its Backend, under difflora_kit.backends (imported on first use)."""
    denoiser_folder: str
    """The denoiser's subfolder of a model folder: "unet" or "transformer"."""
    denoiser_class: str
    """The diffusers class of the denoiser (built from its config alone by the memory plan)."""
    lora_prefix: str
    """Key prefix of the family's LoRA files: the denoiser's name in its pipeline, so that
    `pipe.load_lora_weights(file)` reads them ("unet" or "transformer")."""
    sampling: dict
    """SampleConfig defaults (`sample_config()`)."""
    text_states: str = "last"
    """Which hidden state of a CLIP text encoder conditions the denoiser: "last" (last_hidden_state,
    SD 1.x) or "penultimate" (hidden_states[-2], SDXL)."""
    full_precision: bool = False
    """True: computes in fp32 on any device (the toy is small); False: devices.compute_dtype."""
    pixel_space: bool = False
    """True: the denoiser works on pixels (no VAE): the toy."""
    toy_world: bool = False
    """True: the toy world's judge reads its images (claims, stability curve, held-out captions)."""
    plan: bool = True
    """`difflora plan` covers it."""
    kohya: bool = False
    """kohya-format export and import (ComfyUI, A1111) covers it."""
    kohya_version: str = ""
    """kohya's `ss_base_model_version` for it (sd-scripts' value; AUTOMATIC1111 lists a LoRA as SDXL when it
    starts with "sdxl_", else as SD 1)."""
    kohya_beside: bool = False
    """`pair`, `pairs`, `train` and `average` write a kohya copy beside each LoRA (NAME.kohya.safetensors):
    ComfyUI and AUTOMATIC1111 read no peft-keyed file of this family completely (bench/results/loader_matrix.md)."""
    text_tokens: int | None = None
    """Text tokens the denoiser attends to, for the memory plan (None: the first text encoder's
    context length, max_position_embeddings: CLIP's 77)."""
    public: PublicConfig | None = None
    """Public configs: `difflora plan --base KEY` without a download."""

    def sample_config(self) -> SampleConfig:
        """The SampleConfig this family samples with unless told otherwise."""
        return SampleConfig(**self.sampling)

    def backend_class(self):
        module, cls = self.backend.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


TOY = Family(
    key="difflora-toy", label="the toy model", pipelines=("DiffLoraToyPipeline",), backend="toy:ToyBackend",
    denoiser_folder="unet", denoiser_class="UNet2DConditionModel", lora_prefix="unet",
    sampling=dict(steps=10, guidance=2.0, rescale=0.7, solver="unipc"),  # tuned on the toy; UniPC 10 against
    # DDIM 20: the demo's claim scores within 0.018, rates within one sample (bench/results/solver_eval.md)
    full_precision=True, pixel_space=True, toy_world=True, kohya=True, kohya_version="difflora_toy")

SD15 = Family(
    key="sd15", label="Stable Diffusion 1.x", pipelines=("StableDiffusionPipeline",), backend="sd:StableDiffusionBackend",
    denoiser_folder="unet", denoiser_class="UNet2DConditionModel", lora_prefix="unet",
    sampling=dict(steps=30, guidance=7.5, rescale=0.0),  # diffusers' pipeline default guidance, no rescale
    kohya=True, kohya_beside=True, kohya_version="sd_v1",
    public=PublicConfig(model_configs.SD15_UNET, (("CLIPTextModel", model_configs.CLIP_L),), model_configs.SD_VAE))

SDXL = Family(
    key="sdxl", label="SDXL", pipelines=("StableDiffusionXLPipeline",), backend="sd:StableDiffusionBackend",
    denoiser_folder="unet", denoiser_class="UNet2DConditionModel", lora_prefix="unet",
    sampling=dict(steps=30, guidance=5.0, rescale=0.0), text_states="penultimate", kohya=True, kohya_beside=True,
    kohya_version="sdxl_base_v1-0",
    public=PublicConfig(model_configs.SDXL_UNET, (("CLIPTextModel", model_configs.CLIP_L),
                                                  ("CLIPTextModelWithProjection", model_configs.CLIP_G)),
                        model_configs.SDXL_VAE))

FLUX = Family(
    key="flux", label="FLUX", pipelines=("FluxPipeline",), backend="flux:FluxBackend",
    denoiser_folder="transformer", denoiser_class="FluxTransformer2DModel", lora_prefix="transformer",
    sampling=dict(steps=28, guidance=3.5, rescale=0.0),  # FluxPipeline's: distilled guidance, no CFG
    text_tokens=model_configs.FLUX_TEXT_TOKENS,  # T5's padded prompt, what the transformer attends to
    public=PublicConfig(model_configs.FLUX_TRANSFORMER, (("CLIPTextModel", model_configs.CLIP_L),
                                                         ("T5EncoderModel", model_configs.T5_XXL)),
                        model_configs.FLUX_VAE, tokens=model_configs.FLUX_TEXT_TOKENS, sample_size=1024),
    kohya=True, kohya_version="flux1")  # BFL's fused layer names (kohya.py)

# Z-Image-Turbo (Tongyi-MAI/Z-Image-Turbo: transformer/, text_encoder/ and vae/ config.json): a 6B
# single-stream DiT, a Qwen3-4B text encoder (its hidden_states[-2]), FLUX.1's 16-channel VAE.
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512),
)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
ZIMAGE_VAE = dict(model_configs.SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True)

ZIMAGE = Family(
    key="zimage", label="Z-Image", pipelines=("ZImagePipeline",), backend="zimage:ZImageBackend",
    denoiser_folder="transformer", denoiser_class="ZImageTransformer2DModel", lora_prefix="transformer",
    sampling=dict(steps=8, guidance=0.0, rescale=0.0),  # Z-Image-Turbo: 8 steps, the pipeline's g = 0 (no CFG)
    text_tokens=512,  # the plan counts a caption of the pipeline's max_sequence_length: an upper bound
    public=PublicConfig(ZIMAGE_TRANSFORMER, (("Qwen3Model", QWEN3_4B),), ZIMAGE_VAE, tokens=512, sample_size=1024))

FAMILIES: tuple[Family, ...] = (TOY, SD15, SDXL, FLUX, ZIMAGE)


def get(key: str) -> Family:
    """The row of a family key ("sdxl"); a clear error naming the known ones."""
    for row in FAMILIES:
        if row.key == key:
            return row
    raise NotImplementedError(f"model family {key!r} has no backend in this version of difflora-kit "
                              f"(available: {available()})")


def by_pipeline(class_name: str) -> Family | None:
    """The row whose folders have this model_index.json `_class_name`, or None."""
    return next((row for row in FAMILIES if class_name in row.pipelines), None)


def sample_defaults(key: str) -> SampleConfig:
    """The SampleConfig of the family `key` (the toy's: UniPC, 10 steps)."""
    return get(key).sample_config()


def public_config(name: str) -> PublicConfig | None:
    """The public configs of the family `name` ("sd15", "sdxl", "flux", "zimage"), or None when it has none."""
    return next((row.public for row in FAMILIES if row.key == name and row.public is not None), None)


def available() -> str:
    """'the toy model, Stable Diffusion 1.x (sd15), ...': for error messages."""
    return ", ".join(row.label if row.toy_world else f"{row.label} ({row.key})" for row in FAMILIES)
