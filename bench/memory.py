"""Memory of the denoiser's weights and of a step-2 training step, per preset mode and model.

    python bench/memory.py                       # toy, sd15, sdxl; fuse, requant, adapter
    python bench/memory.py --models toy,sd15 --resolution 256 --steps 2

Weights: bytes in fp32, fp16 and the kit's 8-bit form (int8 linears + the rest in fp32 on CPU / fp16
on a GPU), from the public configs (difflora_kit.model_configs; random weights, nothing downloaded).
The int8 linears must hold out*in bytes + 4 bytes of scale a row and nothing more
(quant.int8_linear_storage counts every storage the layers reach; a hidden fp copy would show).

A step-2 training step: each (model, mode) runs in a fresh process: build the fp32 denoiser, apply a
random rank-8 LoRA 1 the mode's way (difflora_kit.preset), attach LoRA 2, then the kit's training
loop (train.train_lora) for a few steps, batch 1, at --resolution. Peak RSS is the process' VmHWM,
reset (/proc/self/clear_refs) after the base is prepared, so it is the training steps' own peak;
the preparation peak (the fp32 model exists then) is reported apart. On CUDA it would be
torch.cuda.max_memory_allocated; this script runs wherever it is started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

MODES = ("fuse", "requant", "adapter")
GB = 1024**3


# ----------------------------------------------------------------------------- measurements
def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def weight_bytes_by_format(unet: torch.nn.Module) -> dict:
    """From shapes alone (works on the meta device)."""
    linear = [m for m in unet.modules() if type(m) is torch.nn.Linear]
    n_all = sum(p.numel() for p in unet.parameters())
    n_lin_w = sum(m.weight.numel() for m in linear)
    rows = sum(m.out_features for m in linear)
    rest = n_all - n_lin_w
    return {"params": n_all, "linear_weight_params": n_lin_w, "fp32": 4 * n_all, "fp16": 2 * n_all,
            "int8_linears": n_lin_w + 4 * rows,
            "kit_8bit_rest_fp32": n_lin_w + 4 * rows + 4 * rest, "kit_8bit_rest_fp16": n_lin_w + 4 * rows + 2 * rest}


class RandomConditionBackend:
    """What train.train_lora needs from a backend: a real denoiser class, a random latent image and
    random text conditioning of the real shapes (SDXL: pooled embedding and time ids), on `device`
    (bench/gpu_memory.py uses it on a GPU, in the denoiser's dtype). It declares the optional parts of
    difflora_kit.backends.base.Backend that training reads (the UNet defaults, "unet" keys, nothing to offload)."""

    default_targets = None

    def __init__(self, name: str, unet, resolution: int, device: str | torch.device = "cpu"):
        from diffusers import DDPMScheduler

        from difflora_kit.backends import registry
        from difflora_kit.model_configs import LATENT_CHANNELS, VAE_SCALE, conditioning

        self.name, self.unet, self.device, self.family = name, unet, torch.device(device), registry.get(name)
        self.lora_prefix = self.family.lora_prefix
        self.side, self.channels = resolution // VAE_SCALE, LATENT_CHANNELS
        self.cond = conditioning(registry.public_config(name).unet, 1)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)

    def offload_encoders(self):  # no encoders here
        pass

    def encode_images(self, images):  # (1, H, W, 3) -> latents (1, 4, h, w)
        g = torch.Generator().manual_seed(1)
        return torch.randn(1, self.channels, self.side, self.side, generator=g).to(self.device)

    def encode_prompts(self, prompts):  # -> (1, 77, D)
        return self.cond["encoder_hidden_states"].to(self.device)

    def denoiser(self, x, t, states):
        dtype, extra = self.unet.dtype, {}
        if "added_cond_kwargs" in self.cond:
            extra["added_cond_kwargs"] = {k: v.expand(x.shape[0], -1).to(self.device, dtype)
                                          for k, v in self.cond["added_cond_kwargs"].items()}
        return self.unet(x.to(dtype), t, states.to(dtype), **extra).sample.float()


def public_unet(name: str) -> dict:
    """The public UNet config of a family key (sd15, sdxl): difflora_kit.backends.registry."""
    from difflora_kit.backends import registry

    return registry.public_config(name).unet


def random_lora(unet, rank: int, targets, seed: int = 0):
    """A LoRA 1 for this denoiser with random A and B (a trained one is as dense), built on the meta
    device from the model's shapes, so it costs no second model."""
    from difflora_kit import lora

    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    lora.attach(meta, rank, rank, targets, "random")
    tensors, config = lora.adapter_state(meta, "random")
    g = torch.Generator().manual_seed(seed)
    real = {k: torch.randn(v.shape, generator=g) * (0.02 if ".lora_B." in k else v.shape[1] ** -0.5)
            for k, v in tensors.items()}
    return lora.LoraFile(real, config, {"stage": "1"})


def one_run(model: str, mode: str, resolution: int, steps: int) -> dict:
    """Runs in its own process: prepare the step-2 base in `mode`, then train LoRA 2 for `steps` steps."""
    from difflora_kit import backends, preset, quant
    from difflora_kit.config import TrainConfig
    from difflora_kit.model_configs import build_unet
    from difflora_kit.train import train_lora

    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch=1, preset_mode=mode)
    started = time.time()
    if model == "toy":
        backend = backends.load_backend("toy")
    else:
        backend = RandomConditionBackend(model, build_unet(public_unet(model)), resolution)
    lora1 = random_lora(backend.unet, cfg.rank, cfg.targets)
    preset.apply_preset(backend.unet, lora1, 1.0, mode)
    prepare_s, prepare_peak = time.time() - started, vm_kib("VmHWM") * 1024
    storage = quant.int8_linear_storage(backend.unet)
    weights = quant.weight_bytes(backend.unet)
    reset_peak_rss()
    rss_before = vm_kib("VmRSS") * 1024
    image = np.zeros((resolution, resolution, 3), np.float32)
    result = train_lora(backend, image, "a photo", cfg, progress=False)
    return {"model": model, "mode": mode, "resolution": resolution, "steps": steps,
            "prepare_s": prepare_s, "prepare_peak_rss": prepare_peak, "rss_before_steps": rss_before,
            "step_peak_rss": vm_kib("VmHWM") * 1024,
            "step_s": float(np.median(result.step_seconds[1:] or result.step_seconds)),  # the first step sets up
            "int8_held": storage["held"], "int8_ideal": storage["ideal"], "weights_after": weights}


def run_in_subprocess(model: str, mode: str, resolution: int, steps: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import memory; "
            f"print('RESULT', json.dumps(memory.one_run({model!r}, {mode!r}, {resolution}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{model}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- report
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="toy,sd15,sdxl")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--resolution", type=int, default=256, help="pixels for sd15/sdxl (latents 1/8); toy is 32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--name", default="memory", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    models, modes = args.models.split(","), args.modes.split(",")

    from difflora_kit import backends
    from difflora_kit.model_configs import build_unet

    formats = {}
    for model in models:
        unet = backends.load_backend("toy").unet if model == "toy" else build_unet(public_unet(model), "meta")
        formats[model] = weight_bytes_by_format(unet)
    runs = []
    for model in models:
        for mode in modes:
            res = 32 if model == "toy" else args.resolution
            print(f"... {model} {mode} at {res}px", flush=True)
            runs.append(run_in_subprocess(model, mode, res, args.steps))

    lines = ["Denoiser weights (from the public configs; MiB):", "",
             "| model | params | fp32 | fp16 | kit 8-bit (rest fp32) | kit 8-bit (rest fp16) | int8 linears | int8 linears / their fp32 bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for model, f in formats.items():
        ratio = f["int8_linears"] / (4 * f["linear_weight_params"])
        lines.append(f"| {model} | {f['params'] / 1e6:.1f}M | {f['fp32'] / 2**20:.0f} | {f['fp16'] / 2**20:.0f} | "
                     f"{f['kit_8bit_rest_fp32'] / 2**20:.0f} | {f['kit_8bit_rest_fp16'] / 2**20:.0f} | "
                     f"{f['int8_linears'] / 2**20:.2f} | {ratio:.4f} |")
    lines += ["", f"A step-2 training step (batch 1, {args.steps} steps, LoRA rank 8 on the kit's default targets; "
                  "peak RSS in MiB, the process' whole RSS (~0.5 GiB of it is Python, torch and libraries); "
                  "step s: median of the steps after the first; CPU):", "",
              "| model | px | mode | prepare s | prepare peak | RSS before steps | step peak | step s | int8 held = ideal |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ok = "yes" if r["int8_held"] == r["int8_ideal"] else f"NO ({r['int8_held']} vs {r['int8_ideal']})"
        lines.append(f"| {r['model']} | {r['resolution']} | {r['mode']} | {r['prepare_s']:.1f} | "
                     f"{r['prepare_peak_rss'] / 2**20:.0f} | {r['rss_before_steps'] / 2**20:.0f} | "
                     f"{r['step_peak_rss'] / 2**20:.0f} | {r['step_s']:.2f} | {ok} |")
    table = "\n".join(lines)
    print(table)
    write_result(args.name, {"formats": formats, "runs": runs, "gpu_measured": torch.cuda.is_available()}, table)


if __name__ == "__main__":
    main()
