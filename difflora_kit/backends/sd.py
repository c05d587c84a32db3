"""Stable Diffusion 1.x and SDXL backends: latent space (VAE), CLIP text encoder(s), the diffusers UNet.

Loaded from a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/
scheduler/, and text_encoder_2/ tokenizer_2/ for SDXL), or a hub id resolved by
huggingface_hub's cache (`--base stabilityai/stable-diffusion-xl-base-1.0`: downloaded once when
online; offline it must be in the cache). The family is the pipeline class in model_index.json.
SD 1.x and SDXL differ by a declared attribute of their registry rows (which hidden state of CLIP
conditions the UNet) and by their configs (a second text encoder; the UNet's
`addition_embed_type="text_time"`), never by their names.

    image [H, W, 3] in [0, 1] -> VAE encoder (posterior mean) * scaling_factor -> latent (4, H/8, W/8)
    SD 1.x: text states = CLIP last hidden state                       (N, 77, 768)
    SDXL:   text states = [CLIP-L hidden[-2] | CLIP-G hidden[-2]]       (N, 77, 2048)
            + pooled CLIP-G embedding (N, 1280) and time ids (orig size, crop, target size) as
            `added_cond_kwargs`. The shared loop passes one tensor of text states, so the pooled
            embedding rides along as extra features of every token: states (N, 77, 2048 + 1280),
            split again in `denoiser`.
The prediction type (epsilon or v) is read from the scheduler config by diffusion.noisy_and_target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import diffusion
from ..devices import compute_dtype
from . import registry
from .latent import LatentBackend
from .unet_inputs import UNetPlan
from .registry import Family


class StableDiffusionBackend(UNetPlan, LatentBackend):
    """SD 1.x / SDXL: encode prompts and images, the UNet, its training scheduler, and DDIM sampling."""

    def __init__(self, family: Family, unet, vae, text_encoders: list, tokenizers: list, scheduler,
                 name: str = "", force_zeros_for_empty_prompt: bool = False, device: str | torch.device = "cpu"):
        super().__init__(family, unet, vae, text_encoders, tokenizers, scheduler, name, device)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.pooled = unet.config.get("addition_embed_type") == "text_time"  # SDXL: pooled text + size/crop ids
        self.pooled_dim = text_encoders[-1].config.projection_dim if self.pooled else 0  # SDXL: 1280

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, denoiser=None):
        """Load every component from a diffusers folder; the denoiser stays full precision (the kit
        quantizes its linears itself), in `dtype` (default: compute_dtype(device))."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        index = json.loads((folder / "model_index.json").read_text())
        family = registry.by_pipeline(index.get("_class_name", ""))
        if family is None or family.backend_class() is not cls:
            raise NotImplementedError(f"{folder}: pipeline {index.get('_class_name')!r} is not SD 1.x or SDXL")
        dtype = dtype or compute_dtype(device)
        common = {"torch_dtype": dtype, "use_safetensors": True}
        unet = denoiser if denoiser is not None else UNet2DConditionModel.from_pretrained(folder / "unet", **common)
        vae_dtype = dtype
        if dtype == torch.float16 and AutoencoderKL.load_config(folder / "vae").get("force_upcast", False):
            vae_dtype = torch.float32  # SDXL's VAE overflows in fp16 (NaN latents): diffusers upcasts it too
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype, use_safetensors=True)
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", **common)]
        tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer")]
        if (folder / "text_encoder_2").is_dir():  # SDXL: CLIP-G with its projection (the pooled embedding)
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **common))
            tokenizers.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")  # training noise schedule
        backend = cls(family, unet.eval(), vae, encoders, tokenizers, scheduler, name=folder.name,
                      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
        return backend.to(device)

    @staticmethod
    def folder_sample_size(folder: Path) -> int:
        """Pixels the base draws, from its configs: the UNet's latent size x the VAE's down-sampling."""
        size = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return size * 2 ** (len(vae["block_out_channels"]) - 1)

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(77, D) text states of one prompt (SDXL: D = 2048 + 1280, the pooled embedding appended)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = self._here(encoder)(ids, output_hidden_states=True)
            if self.family.text_states == "last":
                hidden.append(out.last_hidden_state[0])  # (77, 768)
            else:
                hidden.append(out.hidden_states[-2][0])  # (77, 768) CLIP-L, (77, 1280) CLIP-G
                pooled = out[0][0] if out[0].ndim == 2 else pooled  # CLIP-G's projected embedding (1280,)
        states = torch.cat(hidden, dim=-1)  # (77, D)
        if self.pooled:
            states = torch.cat([states, pooled[None].expand(states.shape[0], -1)], dim=-1)  # (77, 2048 + 1280)
            if prompt == "" and self.force_zeros_for_empty_prompt:
                states = torch.zeros_like(states)  # SDXL's unconditional branch
        return states

    @property
    def sample_size(self) -> int:
        """Pixels of the images the denoiser was trained at."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    # ---- the denoiser -------------------------------------------------------------------------
    def denoiser(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Model output for latents x (B, 4, h, w), timesteps t (B,), text states (B, 77, D)."""
        dtype = self.unet.dtype
        extra = {}
        if self.pooled:
            states, pooled = states[..., :-self.pooled_dim], states[:, 0, -self.pooled_dim:]  # (B, 77, 2048), (B, 1280)
            side = 8 * x.shape[-1]
            time_ids = torch.tensor([[8 * x.shape[-2], side, 0, 0, 8 * x.shape[-2], side]], device=x.device)
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype),
                                          "time_ids": time_ids.expand(x.shape[0], -1).to(dtype)}
        out = self.unet(x.to(dtype), t, states.to(dtype), **extra).sample
        return out.float()

    # ---- sampling -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0,
                 rescale: float = 0.0, on_step=None, solver: str = "ddim") -> np.ndarray:
        """One image per (prompt, seed) pair: [N, H, W, 3] in [0, 1]."""
        noise = diffusion.start_noise(seeds, self.latent_shape).to(self.device)  # drawn on the CPU
        cond, uncond = self.encode_prompts(prompts), self.encode_prompts([""] * len(prompts))
        sampler = diffusion.sampling_scheduler(self.scheduler, solver)
        with torch.no_grad():
            latents = diffusion.denoise(self.denoiser, sampler, noise, cond, uncond, steps, guidance, rescale, on_step)
        return self.decode(latents)
