"""Sampling with a LoRA at many strengths in one batched pass.

peft's LoRA layer computes  y = base(x) + scaling * B(A(x)).  A forward hook on every B module
multiplies its output by a per-sample strength s_b, so one batch holds a whole sweep:

    y_b = base(x_b) + s_b * scaling * B(A(x_b))          b = (prompt, seed, strength) flattened

With classifier-free guidance the batch is [cond; uncond] (2N): the N strengths repeat.

How many (prompt, seed, strength) images go in one batch: `max_batch`; None sizes it to the device
(batch_size: MAX_BATCH on the CPU; on a GPU as many as fit in the memory free now, from the memory
plan's bytes per row). A GPU that runs out of memory anyway raises SampleOutOfMemory, which says
what to lower.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from . import plan
from .config import SampleConfig
from .lora import PREFIX, LoraFile, active_presets, check_fits
from .plan import OutOfMemoryAdvice, error_line

SWEEP_ADAPTER = "difflora_sweep"
MAX_BATCH = 96
"""The most images a sweep batches in one call (and the rows of a health report's call): on the CPU
always this many; on a GPU fewer when they do not fit (batch_size)."""


class Strengths:
    """Per-sample LoRA strengths as the hooks of per_sample_strength apply them: (N,) values; a LoRA
    output of n rows (n a multiple of N: classifier-free guidance's [cond; uncond]) gets row b
    multiplied by values[b % N].

    The (n,) multiplier is made once per (device, dtype, n), on the output's device in its dtype, and
    every later hook call (one per LoRA layer per model call) reuses it: no host-to-device copy and no
    cast per layer. `set` changes the values (the start-noise gate does, when it opens) and drops the
    multipliers made so far."""

    def __init__(self, values):
        self.values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)  # (N,)
        if self.values.numel() == 0:
            raise ValueError("per-sample strengths need at least one value")
        self._made: dict[tuple, torch.Tensor] = {}
        self.made = 0
        """Multipliers made so far (device copies): one per (device, dtype, rows), not one per hook call."""

    def set(self, values) -> None:
        """New strengths, the same count; the multipliers are made again at their next use."""
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
        if values.shape != self.values.shape:
            raise ValueError(f"{values.numel()} strengths for {self.values.numel()} samples")
        self.values = values.clone()
        self._made.clear()

    def multiplier(self, output: torch.Tensor) -> torch.Tensor:
        """(n, 1, ..., 1) strengths to multiply `output` (n, ...) with, on its device in its dtype."""
        n, N = output.shape[0], self.values.shape[0]
        key = (output.device, output.dtype, n)
        s = self._made.get(key)
        if s is None:
            if n % N:
                raise ValueError(f"a LoRA output of {n} rows for {N} per-sample strengths (rows must repeat them)")
            s = self._made[key] = self.values.repeat(n // N).to(output.device, output.dtype)  # (n,): the one copy
            self.made += 1
        return s.view(n, *([1] * (output.ndim - 1)))


@contextlib.contextmanager
def per_sample_strength(unet: torch.nn.Module, adapter: str, strengths):
    """Within the block, the adapter's output for batch row b is multiplied by strengths[b % N].

    `strengths`: a Strengths, or (N,) values (made into one); the block yields the Strengths, whose
    `set` changes the values for the next model call (the start-noise gate does)."""
    table = strengths if isinstance(strengths, Strengths) else Strengths(strengths)

    def hook(module, inputs, output):
        return output * table.multiplier(output)

    handles = [layer.lora_B[adapter].register_forward_hook(hook)
               for layer in unet.modules() if isinstance(layer, LoraLayer) and adapter in layer.lora_B]
    try:
        yield table
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def lora_loaded(unet: torch.nn.Module, lora: LoraFile, adapter: str = SWEEP_ADAPTER):
    """Load a kit LoRA with diffusers' own loader for the duration of the block; a LoRA of which any
    module does not fit the denoiser is refused first (lora.check_fits: diffusers would skip those
    modules with a warning and go on with part of the LoRA)."""
    check_fits(unet, lora)
    metadata = {f"{PREFIX}.{k}": v for k, v in lora.config.items()}
    with warnings.catch_warnings():  # "multiple adapters": intended beside a frozen preset adapter
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.load_lora_adapter(dict(lora.tensors), prefix=PREFIX, adapter_name=adapter, metadata=metadata)
    presets = active_presets(unet)  # a frozen step-2 preset adapter stays on at its own strength
    unet.set_adapters(presets + [adapter], [1.0] * (len(presets) + 1))
    try:
        yield adapter
    finally:
        unet.delete_adapters(adapter)


def gated_steps(cfg: SampleConfig) -> int:
    """How many of the first sampling steps run without the LoRA."""
    return round(cfg.lora_off_first * cfg.steps)


def start_noise_gate(wanted: torch.Tensor, live: Strengths, cfg: SampleConfig):
    """on_step(i) for the sampler: LoRA strengths 0 for the first gated steps, then `wanted`, set on
    `live` (the Strengths the hooks read, holding `wanted` to begin with) only when the gate turns:
    the strengths reach the device at most twice a batch, not at every step."""
    off = gated_steps(cfg)
    now = [True]  # live holds `wanted`

    def on_step(i: int) -> None:
        if (i >= off) != now[0]:
            now[0] = i >= off
            live.set(wanted if now[0] else torch.zeros_like(wanted))

    return on_step


def free_device_bytes(device) -> int | None:
    """Bytes a batch can take on `device` now: CUDA's free memory plus what PyTorch's caching allocator
    holds unused (it hands that out first); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def batch_size(backend, rows_per_item: int = 2, decode: bool = True, cap: int = MAX_BATCH, least: int = 1) -> int:
    """Items per batched call on `backend`'s device: `cap` off CUDA (the CPU: always the same batches);
    on CUDA as many as the memory free now takes (plan.rows_that_fit, with the plan's bytes per row of
    this backend's denoiser at its own size), within [least, cap]. Items: a sweep's images (2 denoiser
    rows each under guidance, then decoded together: the defaults), a report's rows (1 each, no decoding).
    A backend the plan cannot size gets `least`."""
    free = free_device_bytes(backend.device)
    if free is None:
        return cap
    try:
        cost = plan.row_bytes(plan.backend_shapes(backend), None, plan.DTYPE_NAMES.get(backend.unet.dtype, "fp32"),
                              _eight_bit(backend.unet))
    except Exception as e:  # a denoiser the plan does not know: the smallest batch, slow but within memory
        warnings.warn(f"the memory plan could not size the batch ({type(e).__name__}: {e}): {least} at a time; "
                      "give max_batch to choose", stacklevel=2)
        return least
    vae = backend.vae
    on_device = vae is None or next(vae.parameters()).device == backend.device
    return plan.rows_that_fit(cost, free, rows_per_item, decode, on_device, cap, least)


def _eight_bit(unet: torch.nn.Module) -> bool:
    """Whether the denoiser's linears are the kit's 8-bit ones (their CUDA temporaries count per row)."""
    from .quant import int8_linear_class

    int8 = int8_linear_class()
    return any(isinstance(m, int8) for m in unet.modules())


class SampleOutOfMemory(OutOfMemoryAdvice):
    """The GPU ran out of memory while sampling; the message says what to lower."""


def out_of_memory_message(images: int, max_batch: int | None, error: BaseException) -> str:
    """What to do after a sampling batch of `images` ran out of GPU memory (`max_batch`: as given, None: sized
    to the free memory)."""
    first = error_line(error)
    smaller = max(1, images // 2)
    how = "as given" if max_batch is not None else "sized to the GPU memory free when it started"
    return (f"the GPU ran out of memory sampling a batch of {images} images ({how}): {first}. Nothing was written, "
            "and no LoRA file was changed. Sample fewer images at once: `difflora sample --max-batch "
            f"{smaller}` (sample.sweep(..., max_batch={smaller})), or fewer --seeds, --scales or --prompt per run; "
            "or free the GPU of other models and processes (nvidia-smi lists them).")


@contextlib.contextmanager
def _explained(images: int, max_batch: int | None):
    """A CUDA out-of-memory error of a sampling batch becomes SampleOutOfMemory (what to lower)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise SampleOutOfMemory(out_of_memory_message(images, max_batch, e)) from e


class BaseImages:
    """The base's own images (strength 0, no LoRA) by (prompt, seed, sampler settings), for one backend.

    Strength 0 draws the same image whatever LoRA is swept (its output is multiplied by 0), so
    sweeps of many LoRAs on the same prompts and seeds share them: give the sweeps one BaseImages
    and each (prompt, seed) is sampled once. It holds images of `backend` only: a backend whose
    weights change (another preset) needs a new one."""

    def __init__(self, backend):
        self.backend = backend
        self._images: dict[tuple, np.ndarray] = {}
        self.sampled = 0
        """(prompt, seed) images this cache sampled (the rest were reused)."""

    @staticmethod
    def _key(prompt: str, seed: int, cfg: SampleConfig) -> tuple:
        return (prompt, int(seed), cfg.steps, float(cfg.guidance), float(cfg.rescale), cfg.solver)

    def get(self, cases: list[tuple[str, int]], cfg: SampleConfig, max_batch: int | None = None) -> np.ndarray:
        """The base's images of `cases`: [N, H, W, 3], sampling only those not cached yet, `max_batch` at a
        time (None: batch_size)."""
        missing = list(dict.fromkeys(c for c in cases if self._key(*c, cfg) not in self._images))
        size = max_batch or batch_size(self.backend)
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
            with _explained(len(chunk), max_batch):
                images = self.backend.generate([p for p, _ in chunk], [seed for _, seed in chunk], cfg.steps,
                                               cfg.guidance, cfg.rescale, None, cfg.solver)
            self._images.update({self._key(*c, cfg): im for c, im in zip(chunk, images)})
            self.sampled += len(chunk)
        return np.stack([self._images[self._key(*c, cfg)] for c in cases])


def sweep(backend, lora: LoraFile | None, prompts: list[str], seeds: list[int], strengths: list[float],
          cfg: SampleConfig | None = None, max_batch: int | None = None,
          base_images: BaseImages | None = None) -> np.ndarray:
    """Images for every (prompt, seed, strength): [P, S, K, H, W, 3] in [0, 1].

    Strength s applies base + s * LoRA. The start noise depends only on the seed, so every
    strength of a (prompt, seed) starts from the same noise. Batches of at most `max_batch` images
    (None: batch_size, MAX_BATCH on the CPU, what fits on a GPU); the batching does not change the images.
    cfg None: the defaults of the base's family (its registry row's sampling).
    """
    if not prompts or not seeds or not strengths:
        raise ValueError("a sweep needs at least one prompt, one seed and one strength")
    out = sweep_cases(backend, lora, [(p, seed) for p in prompts for seed in seeds], strengths, cfg, max_batch, base_images)
    return out.reshape(len(prompts), len(seeds), len(strengths), *out.shape[2:])


def sweep_cases(backend, lora: LoraFile | None, cases: list[tuple[str, int]], strengths: list[float],
                cfg: SampleConfig | None = None, max_batch: int | None = None,
                base_images: BaseImages | None = None) -> np.ndarray:
    """Images for every (prompt, seed) case at every strength: [N, K, H, W, 3] in [0, 1] (what `sweep`
    does for a product of prompts and seeds, for any list of cases: e.g. other seeds for each prompt).

    `base_images`: the strength-0 images (all of them, without a LoRA) come from it, sampled there
    once for every sweep that shares it; None samples them in the batch like any strength."""
    if not cases or not strengths:
        raise ValueError("a sweep needs at least one (prompt, seed) case and one strength")
    if base_images is not None and base_images.backend is not backend:
        raise ValueError("base_images holds another backend's images: make one BaseImages(backend) per backend")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    cfg = cfg or backend.family.sample_config()  # None: the base family's defaults
    combos = [(prompt, seed, s) for prompt, seed in cases for s in strengths]  # row n * K + k
    reused = [i for i, c in enumerate(combos) if base_images is not None and (lora is None or c[2] == 0.0)]
    todo = sorted(set(range(len(combos))) - set(reused))
    out: list[np.ndarray | None] = [None] * len(combos)
    with contextlib.ExitStack() as stack:
        adapter = stack.enter_context(lora_loaded(backend.unet, lora)) if lora is not None and todo else None
        size = (max_batch or batch_size(backend)) if todo else 1  # sized with the LoRA loaded
        for start in range(0, len(todo), size):
            chunk = [combos[i] for i in todo[start : start + size]]
            with contextlib.ExitStack() as inner:
                on_step = None
                if adapter is not None:
                    wanted = torch.tensor([c[2] for c in chunk], dtype=torch.float32)  # (n,) strength per sample
                    live = inner.enter_context(per_sample_strength(backend.unet, adapter, wanted))  # what the hooks apply
                    on_step = start_noise_gate(wanted, live, cfg)
                with _explained(len(chunk), max_batch):
                    images = backend.generate([prompt for prompt, _, _ in chunk], [seed for _, seed, _ in chunk],
                                              cfg.steps, cfg.guidance, cfg.rescale, on_step, cfg.solver)
            for i, im in zip(todo[start : start + size], images):
                out[i] = im
    if reused:
        for i, im in zip(reused, base_images.get([combos[i][:2] for i in reused], cfg, max_batch)):
            out[i] = im
    return np.stack(out).reshape(len(cases), len(strengths), *out[0].shape)
