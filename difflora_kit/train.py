"""The training loop of step 1 and step 2 (they differ only by a preset LoRA fused into the base).

One image x0 and its prompt; each step draws `batch` noise levels, stratified over the schedule
so every step sees the whole range, and regresses the denoiser's output on the target:

    t_b = floor((b + u_b) / batch * T)          b = 0..batch-1, u_b ~ U[0, 1)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps ; loss = || D(x_t, t, c) - target ||^2

A flow-matching base (FLUX) maps t to a shifted sigma instead: x_t = (1 - sigma) x0 + sigma eps,
target eps - x0 (diffusion.noisy_and_target). A family's LoRA targets replace the UNet defaults
when cfg.targets is left at them and its backend declares `default_targets` (FLUX).

Only the LoRA (A, B) trains; the base stays frozen (in 8-bit by default). With cfg.offload_blocks, that many
of the denoiser's blocks wait in pinned CPU memory and come in one by one (difflora_kit.block_swap).

The LoRA's weights and AdamW's moments are fp32 whatever the base computes in (lora.attach). A base that
computes in fp16 (a T4, devices.compute_dtype) gets dynamic loss scaling, as torch.amp does it:

    fp16's smallest number is 6e-8 (normal ones: 6e-5): the gradient of a mean over B*C*H*W latent
    elements, backpropagated through fp16 layers, falls below it and becomes 0 before it reaches the
    fp32 LoRA (a tiny SD 1.5 UNet of the real diffusers classes at 512 px: the self-attention query and
    key LoRAs get almost none of their gradient, tests/test_fp16_scaling.py). So: backward of loss * S;
    the LoRA's fp32 gradients / S; S starts at 2^16, halves when a gradient overflows (that step's update
    is skipped) and doubles after 2000 clean steps.
A skipped step is not a bad loss: the loss was finite (NonFiniteLossError is for a loss that is not);
TrainResult.skipped_steps lists them. bf16 (sm80+) has fp32's range and fp32 needs nothing: no scaling there.

Ctrl-C (SIGINT) while the loop runs in the main thread: the first one lets the current optimizer step
finish, writes a checkpoint at that step boundary (when the caller gave a checkpoint path, whatever
cfg.checkpoint_every says) and raises TrainingInterrupted; `resume` continues from that checkpoint bit for
bit. A second Ctrl-C raises KeyboardInterrupt at once (the last periodic checkpoint, if any, stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
import signal
import threading
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as checkpoints
from . import block_swap, diffusion, lora
from .config import TrainConfig, lora_targets
from .images import image_digest

ADAPTER = "difflora"


class NonFiniteLossError(FloatingPointError):
    pass


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, answered at a step boundary: `step` of `steps` optimizer steps done, their
    state in `checkpoint` (None: the caller gave no checkpoint path, nothing was kept). A KeyboardInterrupt,
    so whatever catches only Exception (the health report's fallback, temp folders' clean-up) lets it by."""

    def __init__(self, step: int, steps: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step} of {steps}"
                         + (f"; checkpoint {checkpoint}" if checkpoint is not None else "; no checkpoint kept"))
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


@contextlib.contextmanager
def stop_at_step_end():
    """Yield a list that a first Ctrl-C (SIGINT) appends to, for the loop to read after each step; a second
    Ctrl-C raises KeyboardInterrupt at once, and so does leaving the block with a Ctrl-C the loop did not
    read (it came after the last step's check: never swallowed). Only where Python's own handler is in
    place, in the main thread (signal handlers live there); anywhere else Ctrl-C does what it did."""
    pressed: list[bool] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield pressed
        return

    def handler(signum, frame):
        if pressed:  # the second Ctrl-C: now
            raise KeyboardInterrupt
        pressed.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:  # left normally, with a Ctrl-C the loop never read
        raise KeyboardInterrupt


@dataclasses.dataclass
class TrainResult:
    lora: lora.LoraFile
    losses: list[float]
    seconds: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    """Wall time of each optimizer step (the first includes one-time set-up)."""
    block_swap: SwapLog | None = None
    """With cfg.offload_blocks: which blocks were offloaded and how often each came in, step by step."""
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    """fp16 only: the steps (counted from 1) whose gradients overflowed under loss scaling, so the update
    was skipped and the scale halved (a few at the start are normal; the loss of each was finite)."""


@dataclasses.dataclass
class SwapLog:
    """What block swap did during a run (difflora_kit.block_swap)."""

    names: list[str]
    """The offloaded blocks, in the order they run."""
    sizes: list[int]
    """Their frozen bytes (what one bring-in copies)."""
    counts: list[list[int]] = dataclasses.field(default_factory=list)
    """Per optimizer step: how many times each block was brought in during it."""
    misses: list[int] = dataclasses.field(default_factory=list)
    """Per optimizer step: blocks brought in only when needed, not fetched ahead (the GPU waited for them)."""

    @property
    def bytes_per_step(self) -> list[int]:
        return [sum(c * s for c, s in zip(step, self.sizes)) for step in self.counts]


def stratified_timesteps(batch: int, num_train: int, generator: torch.Generator) -> torch.Tensor:
    """One timestep in each of `batch` equal slices of [0, T): (batch,) int64."""
    u = torch.rand(batch, generator=generator)
    return ((torch.arange(batch) + u) / batch * num_train).long().clamp_max(num_train - 1)


def computes_in_fp16(denoiser: torch.nn.Module) -> bool:
    """Does the denoiser compute in fp16? Its frozen floating-point tensors say (an 8-bit linear's codes
    are int8, the LoRA's weights fp32 whatever the base: lora.attach)."""
    return any(p.dtype == torch.float16 for p in denoiser.parameters() if not p.requires_grad)


def loss_scaler(denoiser: torch.nn.Module, device: torch.device | str,
                init_scale: float = 2.0 ** 16) -> torch.amp.GradScaler:
    """torch.amp's dynamic loss scaling when the denoiser computes in fp16 (the module docstring), on
    `device`'s type (a GradScaler works on the CPU too); disabled otherwise: then scale() returns the
    loss as it is and step() is optimizer.step()."""
    return torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale,
                                enabled=computes_in_fp16(denoiser))


def train_lora(backend, image: np.ndarray, prompt: str, cfg: TrainConfig, meta: dict | None = None,
               progress: bool = True, checkpoint: Path | None = None, resume: bool = False,
               on_step=None) -> TrainResult:
    """Train a LoRA on one image [H, W, 3] in [0, 1]; the backend's denoiser gets (and keeps) the adapter.

    With `checkpoint` and cfg.checkpoint_every > 0, the state is written there every that many steps;
    `resume` continues from it when it exists (same result, bit for bit on a CPU).
    `on_step(step, loss)` is called after each optimizer step (step counts from 1).
    A first Ctrl-C stops at the end of the current step, with the state written to `checkpoint` (if
    given): TrainingInterrupted; a second stops at once (KeyboardInterrupt). See the module docstring."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # peft's A init
    targets = lora_targets(cfg.targets, backend.default_targets)  # the UNet defaults kept: the family's own (FLUX)
    params = lora.attach(backend.unet, cfg.rank, cfg.alpha, targets, ADAPTER)
    named = [(n, p) for n, p in backend.unet.named_parameters() if p.requires_grad]  # the LoRA's, by name
    backend.unet.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # its moments: fp32, as the LoRA
    scaler = loss_scaler(backend.unet, params[0].device)  # fp16: dynamic loss scaling; else a no-op
    x0 = backend.encode_images(image[None]).expand(cfg.batch, -1, -1, -1)  # (B, C, H, W), cached once
    states = backend.encode_prompts([prompt]).expand(cfg.batch, -1, -1)  # (B, T, D), cached once
    backend.offload_encoders()  # a GPU keeps only the denoiser while training (back on first use)
    if cfg.gradient_checkpointing:
        backend.unet.enable_gradient_checkpointing()
    scheduler = backend.scheduler
    losses, step_seconds, skipped, started, first = [], [], [], time.time(), 0
    # what makes a run the same run: not how often it is checkpointed, nor how memory is saved
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("checkpoint_every", "gradient_checkpointing", "offload_blocks")}
    run = checkpoints.fingerprint(cfg=settings, prompt=prompt, image=image_digest(image), meta=meta or {})
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        first, losses, skipped = checkpoints.restore(checkpoint, named, optimizer, generator, run, scaler)
    warmup = max(1, cfg.steps // 20)
    # block swap: cfg.offload_blocks of the denoiser's blocks in host memory while it trains (the LoRA attached
    # first: the hooks go on the modules as they now are); the denoiser is whole again after. A `with`: an
    # error inside reaches block swap's exit, which keeps it the error raised (block_swap.BlockSwap.close)
    swapping = (block_swap.offloaded(backend.unet, cfg.offload_blocks) if cfg.offload_blocks
                else contextlib.nullcontext())
    bar = tqdm(range(first, cfg.steps), desc=f"LoRA ({meta.get('stage', '?') if meta else '?'})",
               disable=not progress, initial=first, total=cfg.steps)
    try:
        with swapping as swapper, stop_at_step_end() as pressed:
            swap_log = None if swapper is None else SwapLog(swapper.names, swapper.sizes)
            seen = [] if swapper is None else [0] * len(swapper.names)
            for step in bar:
                noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # drawn on the CPU: same on any device
                t = stratified_timesteps(cfg.batch, scheduler.config.num_train_timesteps, generator).to(x0.device)
                x_t, target = diffusion.noisy_and_target(scheduler, x0, noise, t)
                loss = torch.nn.functional.mse_loss(backend.denoiser(x_t, t, states).float(), target)
                if not math.isfinite(loss.item()):
                    raise NonFiniteLossError(
                        f"the training loss became {loss.item()} at step {step + 1}: stopped, nothing written. "
                        f"Lower the learning rate (now {cfg.lr}) or the alpha (now {cfg.alpha})."
                    )
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / warmup)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # fp16: backward of loss * S, so small gradients stay above 6e-8
                scale = scaler.get_scale()
                scaler.step(optimizer)  # the fp32 LoRA gradients / S; no update if one is inf or nan
                scaler.update()  # S halves after an overflow, doubles after 2000 clean steps
                if scaler.get_scale() < scale:  # it backed off: this step's update was skipped
                    skipped.append(step + 1)
                losses.append(loss.item())
                if swap_log is not None:  # block swap: the bring-ins of this step
                    swap_log.counts.append([c - s for c, s in zip(swapper.counts, seen)])
                    swap_log.misses.append(swapper.misses - sum(swap_log.misses))
                    seen = list(swapper.counts)
                if on_step is not None:
                    on_step(step + 1, losses[-1])
                step_seconds.append(time.time() - started - sum(step_seconds))
                periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
                if checkpoint is not None and (periodic or pressed):  # Ctrl-C: the state at this step boundary
                    checkpoints.save(checkpoint, named, optimizer, step + 1, generator, losses, run,
                                     scaler, skipped)
                if pressed:
                    raise TrainingInterrupted(step + 1, cfg.steps, checkpoint)
    finally:  # also after an error: the backend may be reused (a notebook, the OOM advice)
        bar.close()  # the bar's line ended, so what is printed next starts on its own line
        backend.unet.eval()
        if cfg.gradient_checkpointing:
            backend.unet.disable_gradient_checkpointing()
    tensors, config = lora.adapter_state(backend.unet, ADAPTER)
    info = {"rank": cfg.rank, "alpha": cfg.alpha, "steps": cfg.steps, "lr": cfg.lr, "seed": cfg.seed,
            "eight_bit": cfg.eight_bit, **(meta or {})}
    if backend.lora_prefix != lora.PREFIX:
        info["denoiser"] = backend.lora_prefix  # e.g. FLUX: written with "transformer." keys (lora.save)
    return TrainResult(lora.LoraFile(tensors, config, info), losses, time.time() - started, step_seconds,
                       swap_log, skipped)
