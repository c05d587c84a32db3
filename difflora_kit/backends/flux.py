"""FLUX.1 backend (FluxPipeline folders): flow matching with a guidance-distilled transformer.

Loaded from a local diffusers folder (model_index.json `_class_name` "FluxPipeline" + transformer/
vae/ text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/ scheduler/) or a hub id in the cache.

    image [H, W, 3] in [0, 1] -> VAE (posterior mean - shift_factor) * scaling_factor -> latent (16, H/8, W/8)
    text states = [T5 last hidden state | CLIP pooled output on every token]   (N, T5_len, d_t5 + d_clip)
                  (one tensor for the shared loop, as SDXL's pooled embedding; split again in `denoiser`)
    denoiser(x, t, states): the latent is packed 2x2 into tokens (B, h w / 4, 64) with position ids
        (0, row, col); text ids are zeros; the transformer gets sigma (it multiplies by 1000 itself),
        and with guidance_embeds (FLUX.1 dev) the distilled guidance value; output unpacked to (B, 16, h, w).
Training: integer t -> shifted sigma, x_t = (1 - sigma) x0 + sigma eps, target eps - x0
(diffusion.flow_sigma / noisy_and_target); the same t gives the same sigma here.
Sampling: Euler on the flow from sigma = 1 to 0 on diffusers' FluxPipeline grid (shifted the same
way), no classifier-free guidance: `guidance` is the distilled guidance embedding (dev) or unused (schnell).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import diffusion
from ..devices import compute_dtype
from . import registry
from .latent import LatentBackend
from .registry import Family

MAX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length default
TRAIN_GUIDANCE = 3.5  # distilled guidance while training: diffusers' train_dreambooth_lora_flux.py default
# LoRA targets: diffusers' FLUX LoRA trainer's (attention and MLPs of the double blocks, both streams),
# plus the single blocks' MLP (proj_mlp) and their output projection (proj_out, named per block so the
# transformer's final proj_out is left alone). The single blocks' attention q/k/v match "attn.to_*".
DOUBLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2")


def flux_targets(num_single_layers: int) -> tuple[str, ...]:
    return DOUBLE_TARGETS + ("proj_mlp",) + tuple(f"single_transformer_blocks.{i}.proj_out"
                                                  for i in range(num_single_layers))


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): the inverse of `pack`."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of the packed tokens: (0, row, col) (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxBackend(LatentBackend):
    """What the shared machinery needs from FLUX.1; `unet` is the FluxTransformer2DModel (the shared
    LoRA/quantization/preset code calls any denoiser `unet`)."""

    def __init__(self, family: Family, transformer, vae, text_encoders: list, tokenizers: list, scheduler,
                 name: str = "", device: str | torch.device = "cpu"):
        super().__init__(family, transformer, vae, text_encoders, tokenizers, scheduler, name, device)
        self.pooled_dim = transformer.config.pooled_projection_dim  # CLIP's pooled output (768 for CLIP-L)
        self.train_guidance = TRAIN_GUIDANCE  # the distilled guidance value the denoiser gets (dev only)
        self.default_targets = self.targets_for(transformer.config)

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, denoiser=None):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        folder = Path(folder)
        dtype = dtype or compute_dtype(device)
        common = {"torch_dtype": dtype, "use_safetensors": True}
        transformer = denoiser if denoiser is not None else \
            FluxTransformer2DModel.from_pretrained(folder / "transformer", **common)
        vae = AutoencoderKL.from_pretrained(folder / "vae", **common)
        encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", **common),
                    T5EncoderModel.from_pretrained(folder / "text_encoder_2", **common)]
        tokenizers = [AutoTokenizer.from_pretrained(folder / "tokenizer"), AutoTokenizer.from_pretrained(folder / "tokenizer_2")]
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        return cls(registry.FLUX, transformer.eval(), vae, encoders, tokenizers, scheduler, name=folder.name).to(device)

    # ---- the denoiser's class, for the memory plan -------------------------------------------------
    @classmethod
    def targets_for(cls, config: dict) -> tuple[str, ...]:
        return flux_targets(config["num_single_layers"])

    @classmethod
    def latent_multiple(cls, config: dict) -> int:
        return 2  # `pack`: 2x2 latent patches per token

    @classmethod
    def plan_inputs(cls, config: dict, batch: int, side: int, tokens: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        """The transformer's call in `velocity` on meta tensors: a side x side latent packed into
        (side/2)^2 tokens of in_channels (64 = 16 x 2 x 2), `tokens` T5 states and CLIP's pooled output."""
        meta = dict(device="meta", dtype=dtype)
        n = (side // 2) ** 2
        guidance = torch.empty(batch, device="meta", dtype=torch.float32)  # dev's distilled guidance value
        extra = {"guidance": guidance} if config.get("guidance_embeds") else {}
        return (), dict(hidden_states=torch.empty(batch, n, config["in_channels"], **meta),  # (B, h w / 4, 64)
                        timestep=torch.empty(batch, **meta),
                        pooled_projections=torch.empty(batch, config["pooled_projection_dim"], **meta),
                        encoder_hidden_states=torch.empty(batch, tokens, config["joint_attention_dim"], **meta),
                        txt_ids=torch.empty(tokens, 3, **meta), img_ids=torch.empty(n, 3, **meta),
                        return_dict=False, **extra)

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(T5_len, d_t5 + d_clip): T5 states with CLIP's pooled output appended to every token
        (as FluxPipeline.encode_prompt: CLIP at its 77 tokens, T5 padded to its max length)."""
        (clip_tok, t5_tok), (clip, t5) = self.tokenizers, self.text_encoders
        ids = clip_tok([prompt], padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        pooled = self._here(clip)(ids, output_hidden_states=False).pooler_output[0]  # (d_clip,)
        n = min(t5_tok.model_max_length, MAX_T5_TOKENS)
        ids = t5_tok([prompt], padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        states = self._here(t5)(ids.to(self.device), output_hidden_states=False)[0][0]  # (T, d_t5)
        return torch.cat([states, pooled[None].to(states.dtype).expand(states.shape[0], -1)], dim=-1)

    # ---- the denoiser -------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor, guidance: float | None = None):
        """The transformer's prediction (noise - x0) for latents x (B, 16, h, w) at noise levels
        sigma (B,) float, text states (B, T, d_t5 + d_clip); `guidance` default: self.train_guidance."""
        dtype = self.unet.dtype
        b, _, h, w = x.shape
        hidden, pooled = states[..., :-self.pooled_dim], states[:, 0, -self.pooled_dim:]  # (B, T, d_t5), (B, d_clip)
        extra = {}
        if self.unet.config.guidance_embeds:
            value = self.train_guidance if guidance is None else guidance
            extra["guidance"] = torch.full((b,), float(value), device=x.device, dtype=torch.float32)
        out = self.unet(hidden_states=pack(x).to(dtype), timestep=sigma.to(x.device, dtype),
                        pooled_projections=pooled.to(dtype), encoder_hidden_states=hidden.to(dtype),
                        txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=dtype),
                        img_ids=image_ids(h, w).to(x.device, dtype), return_dict=False, **extra)[0]
        return unpack(out, h, w).float()

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Velocity for latents x (B, 16, h, w) at integer timesteps t (B,) of the training schedule
        (sigma from diffusion.flow_sigma: the one noisy_and_target used)."""
        sigma = diffusion.flow_sigma(self.scheduler.config, t, self.scheduler.config.num_train_timesteps,
                                     (x.shape[-2] // 2) * (x.shape[-1] // 2))
        return self.velocity(x, sigma, states)

    # ---- sampling -----------------------------------------------------------------------------
    def sampling_sigmas(self, steps: int, h: int, w: int) -> torch.Tensor:
        """(steps + 1,) noise levels from 1 to 0 for an h x w latent (diffusion.flow_sampling_sigmas)."""
        return diffusion.flow_sampling_sigmas(self.scheduler.config, steps, (h // 2) * (w // 2))

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], steps: int = 28, guidance: float = 3.5,
                       on_step=None) -> torch.Tensor:
        """Euler on the flow from the seeds' start noise (drawn on the CPU; sigma = 1: pure noise)."""
        x = diffusion.start_noise(seeds, self.latent_shape).to(self.device)
        states = self.encode_prompts(prompts)
        velocity = lambda x, sigma: self.velocity(x, sigma, states, guidance)  # noqa: E731
        return diffusion.euler_flow(velocity, x, self.sampling_sigmas(steps, *x.shape[-2:]), on_step)

    def generate(self, prompts: list[str], seeds: list[int], steps: int = 28, guidance: float = 3.5,
                 rescale: float = 0.0, on_step=None, solver: str = "ddim") -> np.ndarray:
        """One image per (prompt, seed): [N, H, W, 3] in [0, 1]. No classifier-free guidance: `guidance`
        is FLUX.1 dev's distilled guidance (ignored by schnell); `rescale` does not apply."""
        diffusion.check_flow_solver(solver, self.family.label)
        return self.decode(self.sample_latents(prompts, seeds, steps, guidance, on_step))
