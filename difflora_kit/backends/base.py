"""The interface of a model family: what the shared machinery (LoRA, 8-bit quantization, training,
sampling, the health report) needs to know about a base model, and nothing else.

    backend = backends.load_backend(base)          # a Backend of base's family (its registry row)
    states  = backend.encode_prompts(prompts)      # (N, T, D): one tensor, whatever the family packs in it
    x0      = backend.encode_images(images)        # [N, H, W, 3] in [0, 1] -> latents (N, C, h, w)
    out     = backend.denoiser(x_t, t, states)     # the training target's prediction (epsilon, v or velocity)
    images  = backend.generate(prompts, seeds, steps, guidance, rescale, on_step, solver)

The optional parts are declared here with their defaults, so callers never probe a backend:
`default_targets` (None: config.DEFAULT_TARGETS), `lora_prefix` (from the row) and
`offload_encoders()` and `encode_first()` (no-ops unless the family has encoders to move off the GPU).
"""

from __future__ import annotations

import abc

import numpy as np
import torch
from torch import nn

from .registry import Family


class Backend(abc.ABC):
    family: Family
    """The family's registry row."""
    unet: nn.Module
    """The denoiser (a UNet or a transformer): the shared LoRA, quantization and preset code adapts it."""
    scheduler: object
    """The training noise schedule (a diffusers scheduler: DDPM, or flow matching)."""
    device: torch.device
    name: str = ""
    vae: nn.Module | None = None
    """The VAE (None: a pixel-space family, the toy)."""
    text_encoders: tuple[nn.Module, ...] | list[nn.Module] = ()
    """The text encoders, in the order they encode (the toy: its one CLIP text model)."""
    default_targets: tuple[str, ...] | None = None
    """LoRA target suffixes of this family when the user keeps config.DEFAULT_TARGETS (the UNet's);
    None: the UNet defaults fit."""

    @property
    def lora_prefix(self) -> str:
        """Key prefix of this family's LoRA files ("unet" or "transformer")."""
        return self.family.lora_prefix

    def offload_encoders(self) -> None:
        """Move what only encodes (text encoders, VAE) off the GPU while the denoiser trains. Default: nothing."""

    def encode_first(self, images=(), prompts=()) -> None:
        """Encode `images` and `prompts` ahead of use into the caches, then offload_encoders. Default:
        nothing (the toy encodes on use: its encoder is tiny and it has no VAE)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, folder, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             denoiser: nn.Module | None = None) -> "Backend":
        """The base in a model folder, on `device`, computing in `dtype` (None: the family's rule).
        `denoiser`: one already built (e.g. streamed in 8-bit, difflora_kit.streaming) instead of
        reading the folder's."""

    @staticmethod
    @abc.abstractmethod
    def folder_sample_size(folder) -> int:
        """Pixels of the images a model folder's base draws, from its configs alone (no weights)."""

    # ---- the denoiser's class, for the memory plan (difflora_kit.plan: rows with plan=True) ------
    @classmethod
    def targets_for(cls, config: dict) -> tuple[str, ...] | None:
        """`default_targets` of this family's denoiser of `config` (None: the UNet defaults fit)."""
        return None

    @classmethod
    def latent_multiple(cls, config: dict) -> int:
        """Latent sides must be multiples of this for the denoiser of `config`."""
        raise NotImplementedError(f"{cls.__name__} has no memory plan")

    @classmethod
    def plan_inputs(cls, config: dict, batch: int, side: int, tokens: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        """(args, kwargs) of one training call of the denoiser of `config`, as meta tensors: a batch of
        side x side latents and `tokens` text tokens."""
        raise NotImplementedError(f"{cls.__name__} has no memory plan")

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> "Backend":
        """Move the backend's models to `device`; returns self."""

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one sample's latent at the base's own size."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states (N, T, D) on the device, cached per prompt."""

    @abc.abstractmethod
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] in [0, 1] -> latents (N, C, h, w) on the device."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (N, C, h, w) -> [N, H, W, 3] float32 in [0, 1]."""

    @abc.abstractmethod
    def denoiser(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The model output for latents x (B, C, h, w) at integer timesteps t (B,) of the training
        schedule and text states (B, T, D): what diffusion.noisy_and_target's target is."""

    @abc.abstractmethod
    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float, rescale: float = 0.0,
                 on_step=None, solver: str = "ddim") -> np.ndarray:
        """One image per (prompt, seed): [N, H, W, 3] in [0, 1]; `on_step(i)` before each model call;
        `solver`: config.SOLVERS (the flow families refuse all but ddim, their Euler loop's stand-in)."""
