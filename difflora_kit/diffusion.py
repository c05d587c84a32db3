"""Diffusion math shared by every backend: training targets, guidance, the sampling loop.

Training (one image x0, noise eps, timestep t, alpha_bar = prod(1 - beta)):
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    target = eps                                              (epsilon prediction)
           = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (v prediction, Salimans & Ho 2022)
Sampling: classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16), then a DDIM step.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler


def noisy_and_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, regression target) for the scheduler's prediction type. x0, noise: (B, C, H, W); t: (B,)."""
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return x_t, noise
    if kind == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x_t, x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, optionally rescaled toward the conditional prediction's std."""
    out = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = tuple(range(1, cond.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-8)
        out = rescale * out * ratio + (1 - rescale) * out
    return out


def start_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise image per seed, independent of batch composition: (len(seeds), *shape)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def denoise(
    denoiser,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int = 20,
    guidance: float = 2.0,
    rescale: float = 0.7,
    on_step=None,
) -> torch.Tensor:
    """DDIM from pure noise. noise: (B, C, H, W); cond/uncond: (B, T, D) text states.

    `denoiser(x, t, states)` returns the model output for a batch; with guidance != 1 the
    conditional and unconditional halves run as one batch of 2B. `on_step(i)` is called before
    each model call (the sweep uses it to switch per-sample LoRA scales).
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    use_cfg = guidance != 1.0
    states = torch.cat([cond, uncond]) if use_cfg else cond  # (2B or B, T, D)
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i)
        model_in = torch.cat([x, x]) if use_cfg else x
        t_batch = torch.full((model_in.shape[0],), int(t), dtype=torch.long, device=x.device)
        out = denoiser(model_in, t_batch, states)
        if use_cfg:
            out_cond, out_uncond = out.chunk(2)
            out = guided(out_cond, out_uncond, guidance, rescale)
        x = scheduler.step(out, t, x).prev_sample
    return x
