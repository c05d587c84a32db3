"""What every latent-space family shares: a VAE, text encoders with their tokenizers, a prompt cache,
and moving the encoders off the GPU while the denoiser trains.

    image [H, W, 3] in [0, 1] -> VAE (posterior mean - shift_factor) * scaling_factor -> latent (C, H/f, W/f)
    latent -> / scaling_factor + shift_factor -> VAE decode -> image       (shift_factor: 0 for SD's VAE)

A family says how one prompt becomes text states (`_encode_one`), how the denoiser is called
(`denoiser`) and how it samples (`generate`); sizes come from the VAE unless it says otherwise.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np
import torch

from .base import Backend
from .registry import Family


class LatentBackend(Backend):
    def __init__(self, family: Family, unet, vae, text_encoders: list, tokenizers: list, scheduler, name: str = "",
                 device: str | torch.device = "cpu"):
        self.family, self.name = family, name
        self.unet, self.vae, self.scheduler = unet, vae.eval().requires_grad_(False), scheduler
        self.text_encoders = [t.eval().requires_grad_(False) for t in text_encoders]
        self.tokenizers = tokenizers
        self.device = torch.device(device)
        self._state_cache: dict[str, torch.Tensor] = {}

    def to(self, device: str | torch.device):
        self.device = torch.device(device)
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(self.device)
        self._state_cache = {k: v.to(self.device) for k, v in self._state_cache.items()}
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The VAE's dtype (fp32 under fp16 when the VAE is upcast)."""
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
    @abc.abstractmethod
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(T, D) text states of one prompt."""

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states (N, T, D), cached per prompt."""
        for p in dict.fromkeys(prompts):
            if p not in self._state_cache:
                self._state_cache[p] = self._encode_one(p)
        return torch.stack([self._state_cache[p] for p in prompts])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] in [0, 1] -> latents (N, C, H/f, W/f): (posterior mean - shift) * scale."""
        x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1
        latents = self._here(self.vae).encode(x).latent_dist.mean.float()
        config = self.vae.config
        return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (N, C, h, w) -> [N, f h, f w, 3] float32 in [0, 1]."""
        config = self.vae.config
        z = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        images = self._here(self.vae).decode(z.to(self.dtype)).sample
        return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    @staticmethod
    def folder_sample_size(folder) -> int:
        """Pixels the base draws, from its configs: the VAE config's sample_size (FLUX.1: 1024)."""
        return int(json.loads((Path(folder) / "vae" / "config.json").read_text()).get("sample_size") or 1024)

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        """f: pixels per latent pixel (8 for SD and FLUX's VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sample_size(self) -> int:
        """Pixels of the images the base draws: the VAE config's sample_size (FLUX.1: 1024)."""
        return int(self.vae.config.get("sample_size") or 1024)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.sample_size // self.vae_scale
        return (self.vae.config.latent_channels, side, side)
