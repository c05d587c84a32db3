"""Z-Image backend (ZImagePipeline folders, e.g. Z-Image-Turbo): a single-stream DiT on flow matching,
conditioned by a Qwen3 language model.

Loaded from a local diffusers folder (model_index.json `_class_name` "ZImagePipeline" + transformer/
vae/ text_encoder/ tokenizer/ scheduler/) or a hub id in the cache. Conventions (checked against
diffusers' ZImagePipeline on a tiny random pipeline, tests/test_zimage.py):

    prompt -> the tokenizer's chat template (a user turn) -> padded to MAX_TEXT_TOKENS -> Qwen3
              hidden_states[-2] -> the valid tokens only (T_i, D): captions have different lengths
              one tensor for the shared loop: (MAX_TEXT_TOKENS, D + 1), zero past the valid tokens,
              the last column the mask (cut again in `velocity`: zero rows would be real tokens)
    image [H, W, 3] in [0, 1] -> VAE (posterior mean - shift_factor) * scaling_factor -> latent (16, H/8, W/8)
    velocity(x, sigma, states): the transformer takes a list of (16, 1, h, w) latents, the time
              1 - sigma (it counts from noise to image) and the list of captions; it predicts
              x0 - noise, so the velocity noise - x0 (what diffusion.noisy_and_target trains) is minus it
Training: integer t -> shifted sigma (the scheduler's static shift, 3.0 for Z-Image-Turbo).
Sampling: Euler on the flow on the pipeline's grid (diffusion.flow_sampling_sigmas), with the
pipeline's guidance: v = v_pos + g (v_pos - v_neg), g = 0 is off (Turbo samples at g = 0, 8 steps);
the negative prompt is the empty one. `rescale` does not apply.
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

MAX_TEXT_TOKENS = 512  # ZImagePipeline's max_sequence_length default
# LoRA targets: attention and the SwiGLU MLP of every block (main layers and both refiners), as
# diffusers' train_dreambooth_lora_z_image.py (attention) and VideoX-Fun (attention + feed_forward).
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
PATCH = 2  # latent pixels per token side (the transformer's all_patch_size)


def pack_states(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L, D) states and their (L,) bool mask -> (L, D + 1): zero past the valid tokens, mask last."""
    return torch.cat([states * mask[:, None], mask[:, None].to(states.dtype)], dim=-1)


def captions(packed: torch.Tensor) -> list[torch.Tensor]:
    """(B, L, D + 1) packed states -> the pipeline's list of B (T_i, D) valid-token states."""
    states, mask = packed[..., :-1], packed[..., -1] > 0.5
    return [s[m] for s, m in zip(states, mask)]


def model_time(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's time of noise level sigma, as the pipeline computes it from its timestep
    t = 1000 sigma: (1000 - t) / 1000 = 1 - sigma."""
    return (1000 - sigma * 1000) / 1000


class ZImageBackend(LatentBackend):
    """What the shared machinery needs from Z-Image; `unet` is the ZImageTransformer2DModel."""

    default_targets = TARGETS

    def __init__(self, family: Family, transformer, vae, text_encoder, tokenizer, scheduler, name: str = "",
                 device: str | torch.device = "cpu"):
        super().__init__(family, transformer, vae, [text_encoder], [tokenizer], scheduler, name, device)

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, denoiser=None):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        dtype = dtype or compute_dtype(device)
        common = {"torch_dtype": dtype, "use_safetensors": True}
        transformer = denoiser if denoiser is not None else \
            ZImageTransformer2DModel.from_pretrained(folder / "transformer", **common)
        vae = AutoencoderKL.from_pretrained(folder / "vae", **common)
        text_encoder = AutoModel.from_pretrained(folder / "text_encoder", **common)  # Qwen3Model
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        return cls(registry.ZIMAGE, transformer.eval(), vae, text_encoder, tokenizer, scheduler,
                   name=folder.name).to(device)

    # ---- the denoiser's class, for the memory plan -------------------------------------------------
    @classmethod
    def targets_for(cls, config: dict) -> tuple[str, ...]:
        return TARGETS

    @classmethod
    def latent_multiple(cls, config: dict) -> int:
        return PATCH

    @classmethod
    def plan_inputs(cls, config: dict, batch: int, side: int, tokens: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        """The transformer's call on meta tensors: `tokens` valid caption tokens per sample (the
        packed mask cannot be read on the meta device)."""
        meta = dict(device="meta", dtype=dtype)
        x = [torch.empty(config["in_channels"], 1, side, side, **meta) for _ in range(batch)]
        caps = [torch.empty(tokens, config["cap_feat_dim"], **meta) for _ in range(batch)]
        return (x, torch.empty(batch, device="meta", dtype=torch.float32), caps), {"return_dict": False}

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(MAX_TEXT_TOKENS, D + 1) packed states of one prompt (ZImagePipeline._encode_prompt)."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        ids = tokenizer([text], padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(self.device).bool()
        out = self._here(encoder)(input_ids=ids.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True)
        return pack_states(out.hidden_states[-2][0], mask[0])  # (L, D + 1)

    # ---- the denoiser -------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """noise - x0 as the transformer predicts it, for latents x (B, 16, h, w) at noise levels
        sigma (B,) float and packed text states (B, L, D + 1)."""
        dtype = self.unet.dtype
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # B x (16, 1, h, w)
        tau = model_time(sigma.to(x.device, torch.float32))
        out = self.unet(latents, tau, [c.to(dtype) for c in captions(states)], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # (B, 16, h, w)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Velocity at integer timesteps t (B,) of the training schedule (sigma as noisy_and_target's)."""
        sigma = diffusion.flow_sigma(self.scheduler.config, t, self.scheduler.config.num_train_timesteps,
                                     (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH))
        return self.velocity(x, sigma, states)

    # ---- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], steps: int = 8, guidance: float = 0.0,
                       on_step=None) -> torch.Tensor:
        """Euler on the flow from the seeds' start noise (drawn on the CPU). With guidance g > 0 the
        batch is [cond; uncond] (2N rows: what the sweep's per-sample strengths expect)."""
        x = diffusion.start_noise(seeds, self.latent_shape).to(self.device)
        cond = self.encode_prompts(prompts)
        if guidance > 0:
            states = torch.cat([cond, self.encode_prompts([""] * len(prompts))])  # (2N, L, D + 1)

            def velocity(x, sigma):
                pos, neg = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), states).chunk(2)
                return pos + guidance * (pos - neg)
        else:
            velocity = lambda x, sigma: self.velocity(x, sigma, cond)  # noqa: E731
        sigmas = diffusion.flow_sampling_sigmas(self.scheduler.config, steps,
                                                (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH))
        return diffusion.euler_flow(velocity, x, sigmas, on_step)

    def generate(self, prompts: list[str], seeds: list[int], steps: int = 8, guidance: float = 0.0,
                 rescale: float = 0.0, on_step=None, solver: str = "ddim") -> np.ndarray:
        """One image per (prompt, seed): [N, H, W, 3] in [0, 1]. `guidance` is the pipeline's g
        (0 = off); `rescale` does not apply."""
        diffusion.check_flow_solver(solver, self.family.label)
        return self.decode(self.sample_latents(prompts, seeds, steps, guidance, on_step))
