"""What every latent-space family shares: a VAE, text encoders with their tokenizers, caches of prompt
states and image latents, and the encoders off the GPU while the denoiser is there.

    image [H, W, 3] in [0, 1] -> VAE (posterior mean - shift_factor) * scaling_factor -> latent (C, H/f, W/f)
    latent -> / scaling_factor + shift_factor -> VAE decode -> image       (shift_factor: 0 for SD's VAE)

Encode first (pair.prepare_base): the backend is built around a shapes-only denoiser (its parameters on
the meta device), the encoders and the VAE encode what the stage needs into the caches, leave the GPU,
and only then does the real denoiser arrive:

    backend = family.load(folder, "cuda", denoiser=streaming.meta_denoiser(base))   # encoders + VAE
    backend.encode_first(images, prompts)      # cached; then the encoders and the VAE go to the CPU
    backend.attach_denoiser(streaming.load_denoiser(base, "cuda", ...))
Anything not encoded first still works: an encoder comes back to the device on its next use.

A family says how one prompt becomes text states (`_encode_one`), how the denoiser is called
(`denoiser`) and how it samples (`generate`); sizes come from the VAE unless it says otherwise.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np
import torch

from ..images import image_digest
from .base import Backend
from .registry import Family


def _shapes_only(module: torch.nn.Module) -> bool:
    """True for a denoiser built on the meta device (streaming.meta_denoiser): no weights to move."""
    return any(p.is_meta for p in module.parameters())


def image_key(image: np.ndarray) -> str:
    """The latent cache's key of one image [H, W, 3]: the digest of its float32 bytes, and its shape."""
    return f"{image_digest(image)}:{'x'.join(map(str, image.shape))}"


class LatentBackend(Backend):
    def __init__(self, family: Family, unet, vae, text_encoders: list, tokenizers: list, scheduler, name: str = "",
                 device: str | torch.device = "cpu"):
        self.family, self.name = family, name
        self.unet, self.vae, self.scheduler = unet, vae.eval().requires_grad_(False), scheduler
        self.text_encoders = [t.eval().requires_grad_(False) for t in text_encoders]
        self.tokenizers = tokenizers
        self.device = torch.device(device)
        self._state_cache: dict[str, torch.Tensor] = {}  # prompt -> (T, D)
        self._latent_cache: dict[str, torch.Tensor] = {}  # image_key(image) -> (1, C, h, w)

    def to(self, device: str | torch.device):
        """Move the models and the caches to `device` (a shapes-only denoiser stays where it is)."""
        self.device = torch.device(device)
        for module in (self.unet, self.vae, *self.text_encoders):
            if not _shapes_only(module):
                module.to(self.device)
        self._state_cache = {k: v.to(self.device) for k, v in self._state_cache.items()}
        self._latent_cache = {k: v.to(self.device) for k, v in self._latent_cache.items()}
        return self

    def attach_denoiser(self, denoiser: torch.nn.Module) -> None:
        """Put the real denoiser (already on the device, e.g. streamed) in place of the shapes-only one the
        backend was built around; the backend read only its config, the same for both."""
        if type(denoiser) is not type(self.unet):
            raise TypeError(f"the backend was built around a {type(self.unet).__name__}, "
                            f"not a {type(denoiser).__name__}")
        self.unet = denoiser.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The VAE's dtype (fp32 under fp16 when the VAE is upcast)."""
        return self.vae.dtype

    def offload_encoders(self) -> None:
        """Move the text encoders and the VAE to the CPU while the denoiser is on the device (their outputs
        are cached); each comes back to the device on its next use. No-op on a CPU backend."""
        if self.device.type == "cpu":
            return
        for module in (self.vae, *self.text_encoders):
            module.to("cpu")
        torch.cuda.empty_cache()

    def encode_first(self, images=(), prompts=()) -> None:
        """Encode before the denoiser arrives: the text states of `prompts` and the latents of `images`
        (each [H, W, 3] in [0, 1], encoded one by one: the latent encode_images(image[None]) gives) into
        the caches, then the encoders and the VAE to the CPU (offload_encoders)."""
        if prompts:
            self.encode_prompts(list(prompts))
        for image in images:
            self.encode_images(np.asarray(image)[None])
        self.offload_encoders()

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

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] in [0, 1] -> latents (N, C, H/f, W/f), cached per image (image_key): the images
        not in the cache are encoded together (_vae_encode), each row kept as the VAE gave it, its memory
        layout too (a CPU VAE gives channels last; the denoiser's convolutions follow the layout, and a
        contiguous copy would train a LoRA that differs in the last bits). Returns a copy: the caller's own."""
        images = np.asarray(images, np.float32)
        keys = [image_key(image) for image in images]
        missing: dict[str, int] = {}  # key -> its first row
        for i, key in enumerate(keys):
            if key not in self._latent_cache:
                missing.setdefault(key, i)
        if missing:
            latents = self._vae_encode(images[list(missing.values())])  # (M, C, h, w)
            for j, key in enumerate(missing):
                self._latent_cache[key] = latents[j:j + 1]  # (1, C, h, w), the VAE's strides
        return torch.cat([self._latent_cache[k] for k in keys])  # (N, C, h, w): cat keeps the rows' layout

    @torch.no_grad()
    def _vae_encode(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] float32 in [0, 1] -> (N, C, H/f, W/f): (posterior mean - shift) * scale."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1
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
