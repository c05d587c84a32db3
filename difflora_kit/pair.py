"""Step 1 and step 2 of differential LoRA, wired together.

    step 1:  base(8-bit)                      + LoRA 1 (trained on image 1)  -> lora1
    step 2:  [base + LoRA 1 fused](8-bit)     + LoRA 2 (trained on image 2)  -> lora2
    use:     base(8-bit) + s * LoRA 2   (LoRA 1 dropped)

The preset LoRA is fused while quantizing by default; difflora_kit.preset has the other two ways.
Everything here is in memory; difflora_kit.pair_files writes a pair the way `difflora pair` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from . import backends, lora, streaming
from .backends import Base
from .config import TrainConfig
from .files import check_writable
from .images import check_pair, image_digest
from .plan import DTYPE_NAMES, explain_out_of_memory
from .devices import compute_dtype
from .train import TrainResult, train_lora


@dataclasses.dataclass(frozen=True)
class Encodes:
    """What the encoders and the VAE encode before the denoiser arrives (prepare_base); the empty prompt
    (guidance's negative) always is. Anything else is encoded on use, its encoder back on the device."""

    images: tuple[np.ndarray, ...] = ()
    """Images [H, W, 3] in [0, 1] the backend will encode: a stage's training image, image 2 of a report."""
    prompts: tuple[str, ...] = ()
    """Prompts it will encode: the training prompt, the prompts it will sample or report with."""


def prepare_base(base: str | Path | Base, cfg: TrainConfig, preset: lora.LoraFile | None = None,
                 device: str | None = None, encode: Encodes = Encodes()):
    """Load a fresh base (on `device`: backends.default_device() when None). Its denoiser is streamed
    layer by layer (difflora_kit.streaming): each linear gets the preset LoRA (if any) the way
    cfg.preset_mode says and is quantized to 8-bit (if cfg.eight_bit) as it arrives, so the full
    precision denoiser is never held whole.

    A latent family encodes first: its encoders and VAE load on the device around a denoiser of shapes
    alone (streaming.meta_denoiser), encode `encode` and the empty prompt into the backend's caches, move
    to the CPU, and only then is the denoiser streamed in: it never arrives beside them (an encoder used
    later comes back to the device, the VAE to decode). The toy (pixel space, a tiny encoder) loads as
    it is; `encode` is not needed there."""
    base = backends.resolve_base(base)
    device = device or backends.default_device()

    def stream():
        return streaming.load_denoiser(base, device, None, preset, cfg.preset_scale, cfg.preset_mode, cfg.eight_bit)

    if base.family.pixel_space:
        return backends.load_backend(base, device, denoiser=stream())
    shapes = streaming.meta_denoiser(base, device)
    if preset is not None:
        lora.check_fits(shapes, preset)  # a LoRA of another base fails before anything loads
    backend = backends.load_backend(base, device, denoiser=shapes)  # the encoders and the VAE, on the device
    backend.encode_first(encode.images, (*encode.prompts, ""))  # cached; then they go to the CPU
    backend.attach_denoiser(stream())
    return backend


def load_lora(path: Path, base: str | Path | Base = "toy") -> lora.LoraFile:
    """A LoRA file in the kit's/diffusers' keys or kohya's (names resolved against `base`)."""
    return lora.load(path, module_names=lambda: backends.module_names(base))


def train_stage(image: np.ndarray, prompt: str, cfg: TrainConfig, base: str | Path | Base = "toy",
                preset: lora.LoraFile | None = None, progress: bool = True,
                checkpoint: Path | None = None, resume: bool = False) -> TrainResult:
    """Train one LoRA: step 1 without a preset, step 2 with LoRA 1 as the preset.
    `checkpoint`/`resume`: see train.train_lora."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: give the caption of the image, e.g. --prompt 'a red circle on a blue background'")
    base = backends.resolve_base(base)
    plan_args = {"base": base, "resolution": image.shape[0], "cfg": cfg,
                 "dtype": DTYPE_NAMES[compute_dtype("cuda" if torch.cuda.is_available() else "cpu")]}
    with explain_out_of_memory(plan_args):  # a GPU out of memory: what to lower, with the plan's figures
        backend = prepare_base(base, cfg, preset, encode=Encodes((image,), (prompt,)))
        plan_args["dtype"] = DTYPE_NAMES.get(backend.unet.dtype, "fp32")
        return _train(backend, image, prompt, cfg, base, preset, progress, checkpoint, resume)


def _train(backend, image, prompt, cfg, base, preset, progress, checkpoint, resume) -> TrainResult:
    meta = {"stage": 2 if preset is not None else 1, "base": str(base), "family": base.family.key,
            "base_digest": backends.base_digest(base),
            "prompt": prompt, "image_digest": image_digest(image),
            "preset_digest": preset.digest() if preset is not None else "", "preset_scale": cfg.preset_scale if preset else "",
            "preset_mode": cfg.preset_mode if preset else ""}
    return train_lora(backend, image, prompt, cfg, meta, progress, checkpoint, resume)


@dataclasses.dataclass
class PairResult:
    step1: TrainResult
    step2: TrainResult

    @property
    def lora1(self) -> lora.LoraFile:
        return self.step1.lora

    @property
    def lora2(self) -> lora.LoraFile:
        return self.step2.lora


def train_pair(image1: np.ndarray, image2: np.ndarray, prompt: str, cfg: TrainConfig, base: str | Path | Base = "toy",
               progress: bool = True) -> PairResult:
    """Both steps for one pair; nothing is written (see `save_pair`, or pair_files.train_pair_to_folder)."""
    check_pair(image1, image2)
    base = backends.resolve_base(base)
    step1 = train_stage(image1, prompt, cfg, base, None, progress)
    step2 = train_stage(image2, prompt, cfg, base, step1.lora, progress)
    step2.lora.meta["image1_digest"] = step1.lora.meta["image_digest"]
    return PairResult(step1, step2)


def index_entry(i: int, row: dict, result: PairResult) -> dict:
    """The index.json entry of pair i of a many-pairs folder (`difflora pairs`, the stability pool):
    its folder pair_XXX, images, prompt, axis, the LoRAs' digests and the training time."""
    return {"dir": f"pair_{i:03d}", "image1": row["image1"], "image2": row["image2"], "prompt": row["prompt"],
            "axis": row.get("axis", ""), "lora1_digest": result.lora1.digest(), "lora2_digest": result.lora2.digest(),
            "seconds": round(result.step1.seconds + result.step2.seconds, 2)}


def save_pair(result: PairResult, out_dir: Path, force: bool = False) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    paths = out_dir / "lora1.safetensors", out_dir / "lora2.safetensors"
    for p in paths:
        check_writable(p, force)
    lora.save_files(paths[0], result.lora1)
    lora.save_files(paths[1], result.lora2)
    return paths
