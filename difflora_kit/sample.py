"""Sampling with a LoRA at many strengths in one batched pass.

peft's LoRA layer computes  y = base(x) + scaling * B(A(x)).  A forward hook on every B module
multiplies its output by a per-sample strength s_b, so one batch holds a whole sweep:

    y_b = base(x_b) + s_b * scaling * B(A(x_b))          b = (prompt, seed, strength) flattened

With classifier-free guidance the batch is [cond; uncond] (2N): the N strengths repeat.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from .config import SampleConfig
from .lora import PREFIX, LoraFile, active_presets

SWEEP_ADAPTER = "difflora_sweep"


@contextlib.contextmanager
def per_sample_strength(unet: torch.nn.Module, adapter: str, strengths: torch.Tensor):
    """Within the block, the adapter's output for batch row b is multiplied by strengths[b % N].

    `strengths` (N,) float is read at every call, so changing it in place (the start-noise gate
    does) takes effect at the next model call."""

    def hook(module, inputs, output):
        n = output.shape[0]
        s = strengths.repeat(n // strengths.shape[0]) if n != strengths.shape[0] else strengths  # (n,)
        return output * s.to(output.device, output.dtype).view(n, *([1] * (output.ndim - 1)))

    handles = [layer.lora_B[adapter].register_forward_hook(hook)
               for layer in unet.modules() if isinstance(layer, LoraLayer) and adapter in layer.lora_B]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def lora_loaded(unet: torch.nn.Module, lora: LoraFile, adapter: str = SWEEP_ADAPTER):
    """Load a kit LoRA with diffusers' own loader for the duration of the block."""
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


def start_noise_gate(wanted: torch.Tensor, live: torch.Tensor, cfg: SampleConfig):
    """on_step(i) for the sampler: LoRA strengths 0 for the first gated steps, then `wanted`."""
    off = gated_steps(cfg)

    def on_step(i: int) -> None:
        live.copy_(wanted if i >= off else torch.zeros_like(wanted))

    return on_step


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

    def get(self, cases: list[tuple[str, int]], cfg: SampleConfig, max_batch: int = 96) -> np.ndarray:
        """The base's images of `cases`: [N, H, W, 3], sampling only those not cached yet."""
        missing = list(dict.fromkeys(c for c in cases if self._key(*c, cfg) not in self._images))
        for start in range(0, len(missing), max_batch):
            chunk = missing[start : start + max_batch]
            images = self.backend.generate([p for p, _ in chunk], [seed for _, seed in chunk], cfg.steps, cfg.guidance,
                                           cfg.rescale, None, cfg.solver)
            self._images.update({self._key(*c, cfg): im for c, im in zip(chunk, images)})
            self.sampled += len(chunk)
        return np.stack([self._images[self._key(*c, cfg)] for c in cases])


def sweep(backend, lora: LoraFile | None, prompts: list[str], seeds: list[int], strengths: list[float],
          cfg: SampleConfig | None = None, max_batch: int = 96, base_images: BaseImages | None = None) -> np.ndarray:
    """Images for every (prompt, seed, strength): [P, S, K, H, W, 3] in [0, 1].

    Strength s applies base + s * LoRA. The start noise depends only on the seed, so every
    strength of a (prompt, seed) starts from the same noise. Batches of at most `max_batch`.
    cfg None: the defaults of the base's family (its registry row's sampling).
    """
    if not prompts or not seeds or not strengths:
        raise ValueError("a sweep needs at least one prompt, one seed and one strength")
    out = sweep_cases(backend, lora, [(p, seed) for p in prompts for seed in seeds], strengths, cfg, max_batch, base_images)
    return out.reshape(len(prompts), len(seeds), len(strengths), *out.shape[2:])


def sweep_cases(backend, lora: LoraFile | None, cases: list[tuple[str, int]], strengths: list[float],
                cfg: SampleConfig | None = None, max_batch: int = 96, base_images: BaseImages | None = None) -> np.ndarray:
    """Images for every (prompt, seed) case at every strength: [N, K, H, W, 3] in [0, 1] (what `sweep`
    does for a product of prompts and seeds, for any list of cases: e.g. other seeds for each prompt).

    `base_images`: the strength-0 images (all of them, without a LoRA) come from it, sampled there
    once for every sweep that shares it; None samples them in the batch like any strength."""
    if not cases or not strengths:
        raise ValueError("a sweep needs at least one (prompt, seed) case and one strength")
    if base_images is not None and base_images.backend is not backend:
        raise ValueError("base_images holds another backend's images: make one BaseImages(backend) per backend")
    cfg = cfg or backend.family.sample_config()  # None: the base family's defaults
    combos = [(prompt, seed, s) for prompt, seed in cases for s in strengths]  # row n * K + k
    reused = [i for i, c in enumerate(combos) if base_images is not None and (lora is None or c[2] == 0.0)]
    todo = sorted(set(range(len(combos))) - set(reused))
    out: list[np.ndarray | None] = [None] * len(combos)
    with contextlib.ExitStack() as stack:
        adapter = stack.enter_context(lora_loaded(backend.unet, lora)) if lora is not None and todo else None
        for start in range(0, len(todo), max_batch):
            chunk = [combos[i] for i in todo[start : start + max_batch]]
            with contextlib.ExitStack() as inner:
                on_step = None
                if adapter is not None:
                    wanted = torch.tensor([c[2] for c in chunk], dtype=torch.float32)  # (n,) strength per sample
                    live = wanted.clone()  # what the hooks apply at this step
                    inner.enter_context(per_sample_strength(backend.unet, adapter, live))
                    on_step = start_noise_gate(wanted, live, cfg)
                images = backend.generate([prompt for prompt, _, _ in chunk], [seed for _, seed, _ in chunk],
                                          cfg.steps, cfg.guidance, cfg.rescale, on_step, cfg.solver)
            for i, im in zip(todo[start : start + max_batch], images):
                out[i] = im
    if reused:
        for i, im in zip(reused, base_images.get([combos[i][:2] for i in reused], cfg, max_batch)):
            out[i] = im
    return np.stack(out).reshape(len(cases), len(strengths), *out[0].shape)
