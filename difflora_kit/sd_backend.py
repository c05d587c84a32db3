"""Stable Diffusion 1.x and SDXL backends: latent space (VAE), CLIP text encoder(s), the diffusers UNet.

Loaded from a local diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/
scheduler/, and text_encoder_2/ tokenizer_2/ for SDXL), or a hub id resolved by
huggingface_hub's cache (`--base stabilityai/stable-diffusion-xl-base-1.0`: downloaded once when
online; offline it must be in the cache). The family is the pipeline class in model_index.json.

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

from . import diffusion

FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU; bf16 on sm80+ (Ampere and newer); fp16 on older GPUs (T4 is sm75)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


class StableDiffusionBackend:
    """What the shared machinery needs from SD 1.x / SDXL: encode prompts and images, the denoiser,
    its training scheduler, and sampling."""

    def __init__(self, family: str, unet, vae, text_encoders: list, tokenizers: list, scheduler,
                 name: str = "", force_zeros_for_empty_prompt: bool = False, device: str | torch.device = "cpu"):
        self.family, self.name = family, name
        self.unet, self.vae, self.scheduler = unet, vae.eval().requires_grad_(False), scheduler
        self.text_encoders = [t.eval().requires_grad_(False) for t in text_encoders]
        self.tokenizers = tokenizers
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.device = torch.device(device)
        self.pooled_dim = text_encoders[-1].config.projection_dim if family == "sdxl" else 0  # SDXL: 1280
        self._state_cache: dict[str, torch.Tensor] = {}

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Load every component from a diffusers folder; the denoiser stays full precision (the kit
        quantizes its linears itself), in `dtype` (default: compute_dtype(device))."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        index = json.loads((folder / "model_index.json").read_text())
        family = FAMILIES.get(index.get("_class_name", ""))
        if family is None:
            raise NotImplementedError(f"{folder}: pipeline {index.get('_class_name')!r} is not SD 1.x or SDXL")
        dtype = dtype or compute_dtype(device)
        common = {"torch_dtype": dtype, "use_safetensors": True}
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", **common)
        vae_dtype = dtype
        if dtype == torch.float16 and AutoencoderKL.load_config(folder / "vae").get("force_upcast", False):
            vae_dtype = torch.float32  # SDXL's VAE overflows in fp16 (NaN latents): diffusers upcasts it too
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype, use_safetensors=True)
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", **common)]
        tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer")]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **common))
            tokenizers.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")  # training noise schedule
        backend = cls(family, unet.eval(), vae, encoders, tokenizers, scheduler, name=folder.name,
                      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
        return backend.to(device)

    def to(self, device: str | torch.device):
        self.device = torch.device(device)
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(self.device)
        self._state_cache = {k: v.to(self.device) for k, v in self._state_cache.items()}
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def offload_encoders(self) -> None:
        """Move the text encoders and the VAE to the CPU while the denoiser trains (their outputs are
        cached); each comes back to the device on its next use. No-op on a CPU backend."""
        if self.device.type == "cpu":
            return
        for module in (self.vae, *self.text_encoders):
            module.to("cpu")
        torch.cuda.empty_cache()

    def _here(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module`, on the backend's device (after offload_encoders)."""
        if next(module.parameters()).device != self.device:
            module.to(self.device)
        return module

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(77, D) text states of one prompt (SDXL: D = 2048 + 1280, the pooled embedding appended)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = self._here(encoder)(ids, output_hidden_states=True)
            if self.family == "sd15":
                hidden.append(out.last_hidden_state[0])  # (77, 768)
            else:
                hidden.append(out.hidden_states[-2][0])  # (77, 768) CLIP-L, (77, 1280) CLIP-G
                pooled = out[0][0] if out[0].ndim == 2 else pooled  # CLIP-G's projected embedding (1280,)
        states = torch.cat(hidden, dim=-1)  # (77, D)
        if self.family == "sdxl":
            states = torch.cat([states, pooled[None].expand(states.shape[0], -1)], dim=-1)  # (77, 2048 + 1280)
            if prompt == "" and self.force_zeros_for_empty_prompt:
                states = torch.zeros_like(states)  # SDXL's unconditional branch
        return states

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states (N, 77, D), cached per prompt."""
        for p in dict.fromkeys(prompts):
            if p not in self._state_cache:
                self._state_cache[p] = self._encode_one(p)
        return torch.stack([self._state_cache[p] for p in prompts])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] in [0, 1] -> latents (N, 4, H/8, W/8): the posterior mean, scaled."""
        x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1
        latents = self._here(self.vae).encode(x).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (N, 4, h, w) -> [N, 8h, 8w, 3] float32 in [0, 1]."""
        images = self._here(self.vae).decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample
        return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    @property
    def sample_size(self) -> int:
        """Pixels of the images the denoiser was trained at."""
        return self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    # ---- the denoiser -------------------------------------------------------------------------
    def denoiser(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Model output for latents x (B, 4, h, w), timesteps t (B,), text states (B, 77, D)."""
        dtype = self.unet.dtype
        extra = {}
        if self.family == "sdxl":
            states, pooled = states[..., :-self.pooled_dim], states[:, 0, -self.pooled_dim:]  # (B, 77, 2048), (B, 1280)
            side = 8 * x.shape[-1]
            time_ids = torch.tensor([[8 * x.shape[-2], side, 0, 0, 8 * x.shape[-2], side]], device=x.device)
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype),
                                          "time_ids": time_ids.expand(x.shape[0], -1).to(dtype)}
        out = self.unet(x.to(dtype), t, states.to(dtype), **extra).sample
        return out.float()

    # ---- sampling -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0,
                 rescale: float = 0.0, on_step=None) -> np.ndarray:
        """One image per (prompt, seed) pair: [N, H, W, 3] in [0, 1]."""
        from diffusers import DDIMScheduler

        noise = diffusion.start_noise(seeds, self.latent_shape).to(self.device)  # drawn on the CPU
        cond, uncond = self.encode_prompts(prompts), self.encode_prompts([""] * len(prompts))
        sampler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        with torch.no_grad():
            latents = diffusion.denoise(self.denoiser, sampler, noise, cond, uncond, steps, guidance, rescale, on_step)
        return self.decode(latents)
