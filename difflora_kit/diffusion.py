"""Diffusion math shared by every backend: training targets, guidance, the sampling loop.

Training (one image x0, noise eps, timestep t, alpha_bar = prod(1 - beta)):
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    target = eps                                              (epsilon prediction)
           = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (v prediction, Salimans & Ho 2022)
Flow matching (FLUX: the scheduler is a FlowMatchEulerDiscreteScheduler; rectified flow, Esser et
al. 2024), integer t in [0, T) mapped to a shifted noise level sigma in (0, 1]:
    u = (t + 1) / T                                           (t = T-1: pure noise; diffusers' grid)
    sigma = shift u / (1 + (shift - 1) u)                     (static shift)
          = e^mu / (e^mu + 1/u - 1)                           (use_dynamic_shifting: FLUX.1 dev), with
    mu = base_shift + (max_shift - base_shift) (n - base_image_seq_len) / (max_image_seq_len - base_image_seq_len)
         for n = image tokens (latent h w / 4: FLUX packs 2x2 latent patches into one token)
    x_t = (1 - sigma) x0 + sigma eps ;  target = eps - x0     (the velocity the model predicts)
The clean-image estimate from a model output inverts this (predicted_x0; the health report uses it).
Sampling: classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16), then a solver step: DDIM,
DPM-Solver++ 2M (Lu et al. 2022) or UniPC (Zhao et al. 2023), built from the training schedule.
Flow-matching bases sample with an Euler loop on the flow instead (euler_flow, on flow_sampling_sigmas).
"""

from __future__ import annotations

import math

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)


def is_flow(scheduler) -> bool:
    """True for a flow-matching (rectified flow) training schedule, e.g. FLUX's."""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def flow_mu(config, image_seq_len: int) -> float:
    """Dynamic-shift mu for `image_seq_len` image tokens: diffusers' FLUX calculate_shift (linear in
    the token count between base_image_seq_len -> base_shift and max_image_seq_len -> max_shift)."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * m + config["base_shift"] - m * config["base_image_seq_len"]


def shift_sigma(config, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """The scheduler's time shift of unshifted noise levels u in (0, 1] (config: a flow scheduler's)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if config.get("use_dynamic_shifting", False):
        mu = flow_mu(config, image_seq_len)
        if config.get("time_shift_type", "exponential") == "linear":
            return (mu / (mu + (1 / u - 1))).float()
        return (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).float()
    shift = float(config.get("shift", 1.0))
    return (shift * u / (1 + (shift - 1) * u)).float()


def flow_sigma(config, t: torch.Tensor, num_train: int, image_seq_len: int) -> torch.Tensor:
    """Shifted noise level sigma in (0, 1] of integer timesteps t in [0, num_train): u = (t + 1) / T,
    then the scheduler's shift (static or dynamic). Shared by training and the FLUX denoiser."""
    return shift_sigma(config, (torch.as_tensor(t).double().cpu() + 1) / num_train, image_seq_len).to(
        torch.as_tensor(t).device)


def _batch_sigma(scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A flow scheduler's sigma of each row's timestep, shaped (B, 1, 1, 1) like x (B, C, H, W)."""
    n_tokens = (x.shape[-2] // 2) * (x.shape[-1] // 2)  # FLUX's 2x2 packed latent tokens
    sigma = flow_sigma(scheduler.config, t, scheduler.config.num_train_timesteps, n_tokens)
    return sigma.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))


def noisy_and_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, regression target) for the scheduler's prediction type. x0, noise: (B, C, H, W); t: (B,).
    A flow-matching scheduler: x_t = (1 - sigma) x0 + sigma noise, target = noise - x0 (see above)."""
    if is_flow(scheduler):
        sigma = _batch_sigma(scheduler, x0, t)
        return (1 - sigma) * x0 + sigma * noise, noise - x0
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return x_t, noise
    if kind == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x_t, x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predicted_x0(scheduler, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean-image estimate x0 from a model output `out` at x_t, t (the inverse of noisy_and_target
    on its target). x_t, out: (B, C, H, W); t: (B,) integer timesteps; ab = alpha_bar_t:
        epsilon:       x0 = (x_t - sqrt(1 - ab) out) / sqrt(ab)
        v_prediction:  x0 = sqrt(ab) x_t - sqrt(1 - ab) out
        sample:        x0 = out
        flow matching: x0 = x_t - sigma out          (sigma as noisy_and_target computes it)"""
    if is_flow(scheduler):
        return x_t - _batch_sigma(scheduler, x_t, t) * out
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return out
    ab = scheduler.alphas_cumprod.to(x_t.device, x_t.dtype)[t.to(x_t.device)].view(-1, *([1] * (x_t.ndim - 1)))
    if kind == "epsilon":
        return (x_t - (1 - ab) ** 0.5 * out) / ab ** 0.5
    if kind == "v_prediction":
        return ab ** 0.5 * x_t - (1 - ab) ** 0.5 * out
    raise ValueError(f"unsupported prediction_type {kind!r}")


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, optionally rescaled toward the conditional prediction's std."""
    out = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = tuple(range(1, cond.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-8)
        out = rescale * out * ratio + (1 - rescale) * out
    return out


def sampling_scheduler(train: DDPMScheduler, solver: str = "ddim", **ddim_options):
    """The sampler of `solver` (config.SOLVERS) on the training schedule, trailing timesteps (they
    start at t = T - 1: pure noise on a zero-terminal-SNR schedule). `ddim_options` go to DDIM only."""
    if solver == "ddim":
        return DDIMScheduler.from_config(train.config, timestep_spacing="trailing", **ddim_options)
    if solver == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(train.config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing", final_sigmas_type="zero")
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(train.config, solver_order=2, timestep_spacing="trailing")
    raise ValueError(f"unknown solver {solver!r}: ddim, dpmpp or unipc")


def check_flow_solver(solver: str, family: str) -> None:
    """Flow families sample with euler_flow: `solver` must be the default."""
    if solver != "ddim":
        raise ValueError(f"{family} samples with its flow-matching Euler loop; solver {solver!r} is for the "
                         "toy, SD 1.x and SDXL (leave --solver at ddim)")


def start_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise image per seed, independent of batch composition: (len(seeds), *shape)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def flow_sampling_sigmas(config, steps: int, image_seq_len: int) -> torch.Tensor:
    """(steps + 1,) noise levels from 1 to 0 of a flow-matching sampler: the FLUX / Z-Image pipelines'
    grid linspace(1, 1/steps, steps), shifted by the scheduler config for `image_seq_len` tokens, then 0."""
    u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return torch.cat([shift_sigma(config, u, image_seq_len), torch.zeros(1)])


@torch.no_grad()
def euler_flow(velocity, x: torch.Tensor, sigmas: torch.Tensor, on_step=None) -> torch.Tensor:
    """Euler on the flow, x <- x + (sigma_next - sigma) v(x, sigma), from x at sigmas[0] (1: pure noise)
    to sigmas[-1]. `velocity(x, sigma (B,))` returns noise - x0 as the model predicts it; `on_step(i)`
    is called before each model call (as `denoise` does)."""
    for i in range(len(sigmas) - 1):
        if on_step is not None:
            on_step(i)
        v = velocity(x, sigmas[i].expand(x.shape[0]))
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x


@torch.no_grad()
def denoise(
    denoiser,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int = 20,
    guidance: float = 2.0,
    rescale: float = 0.7,
    on_step=None,
) -> torch.Tensor:
    """The scheduler's solver (diffusion.sampling_scheduler) from pure noise. noise: (B, C, H, W);
    cond/uncond: (B, T, D) text states.

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
