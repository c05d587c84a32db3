"""The toy backend: pixel-space 32x32 RGB, word-level CLIP text encoder, v-prediction.

The toy backend's "latents" are the pixels themselves (the interface: backends/base.py):
    image [H, W, 3] in [0, 1]  <->  latent (3, H, W) in [-1, 1]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .. import diffusion
from ..files import atomic_directory
from ..paths import DATA_SAMPLES, TOY_BASE as DEFAULT_FOLDER  # noqa: F401  (DATA_SAMPLES: for the kit's users)
from ..toy import model
from .base import Backend
from .registry import TOY
from .unet_inputs import UNetPlan


class ToyBackend(UNetPlan, Backend):
    family = TOY

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler: DDPMScheduler, name: str = "toy", info: dict | None = None):
        self.unet = unet
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoders = [self.text_encoder]
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.name = name
        self.info = info or {}
        self.device = torch.device("cpu")
        self._state_cache: dict[str, torch.Tensor] = {}

    def to(self, device: str | torch.device) -> "ToyBackend":
        """Move the denoiser and the text encoder (fp32: the toy is small) to `device`."""
        self.device = torch.device(device)
        self.unet.to(self.device)
        self.text_encoder.to(self.device)
        self._state_cache = {k: v.to(self.device) for k, v in self._state_cache.items()}
        return self

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path = DEFAULT_FOLDER, device: str | torch.device = "cpu", dtype=None,
             denoiser=None) -> "ToyBackend":
        """The toy model in `folder`, on `device`; always fp32 (`dtype` is not used: the toy is small)."""
        folder = Path(folder)
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{folder} is not a toy base model folder (no model_index.json). The shipped one is "
                f"{DEFAULT_FOLDER}; make a new one with `python -m difflora_kit.toy.pretrain --out DIR`."
            )
        info = json.loads(index.read_text())
        unet = denoiser if denoiser is not None else UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        backend = cls(unet.eval(), text_encoder, tokenizer, scheduler, name=str(info.get("name", folder.name)), info=info)
        return backend.to(device)

    @staticmethod
    def folder_sample_size(folder: Path) -> int:
        """Pixels the toy draws (pixel space: the UNet's sample_size)."""
        return json.loads((Path(folder) / "unet" / "config.json").read_text())["sample_size"]

    def save(self, folder: Path, extra: dict | None = None) -> None:
        with atomic_directory(folder) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.scheduler.save_pretrained(tmp / "scheduler")
            index = {"_class_name": "DiffLoraToyPipeline", "family": TOY.key, "name": "toy", **(extra or {})}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states (N, T, D), cached per prompt (prompts repeat across seeds and scales)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._state_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=model.MAX_TOKENS,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            for p, s in zip(missing, self.text_encoder(ids).last_hidden_state):
                self._state_cache[p] = s
        return torch.stack([self._state_cache[p] for p in prompts])

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """[N, H, W, 3] in [0, 1] -> latents (N, 3, H, W) in [-1, 1], on the backend's device."""
        return (torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2) * 2 - 1).to(self.device)

    @staticmethod
    def decode(latents: torch.Tensor) -> np.ndarray:
        """latents (N, 3, H, W) -> [N, H, W, 3] float32 in [0, 1]."""
        return ((latents.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, states).sample

    # ---- sampling -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 2.0,
                 rescale: float = 0.7, on_step=None, solver: str = "ddim") -> np.ndarray:
        """One image per (prompt, seed) pair: [N, H, W, 3] in [0, 1]."""
        noise = diffusion.start_noise(seeds, self.latent_shape).to(self.device)  # drawn on the CPU: same on any device
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))
        sampler = model.sampling_scheduler(self.scheduler, solver)
        latents = diffusion.denoise(self.denoiser, sampler, noise, cond, uncond, steps, guidance, rescale, on_step)
        return self.decode(latents)
