"""Step-2 training of the full-size SDXL and SD 1.5 denoisers on a GPU: peak memory and step time,
against the memory plan's prediction (difflora_kit.plan).

    python bench/gpu_memory.py                                  # sdxl@1024, sd15@512; batch 1; checkpointing off/on
    python bench/gpu_memory.py --models sd15 --resolution 512 --steps 4 --name gpu_memory_sd15
    python bench/gpu_memory.py --device cpu --models sd15 --resolution 64 --steps 2 --no-write   # smoke run

Targets (the real-models issue): SDXL step 2 at 1024x1024, batch 1, under 10 GB peak (a 12 GB card);
SD 1.5 at 512 under 6 GB.

Each (model, checkpointing, matmul) runs in its own process: the denoiser is built from its public config
(difflora_kit.model_configs; random weights, nothing downloaded) in the compute dtype (bf16 on sm80+,
fp16 before), a random rank-8 LoRA 1 is fused in as step 2's preset (the merge kernels: Triton on
sm80+), LoRA 2 is trained by the kit's own loop (train.train_lora) on a random latent with random
text conditioning of the real shapes. Peak: torch.cuda.max_memory_allocated over the steps after the
first (reset when the first ends), against the plan's step-2 peak (encoders offloaded: none here).
`--compare-bnb` adds a run per model where the 8-bit linears use bitsandbytes' own matmul (which keeps
every linear's input for the backward pass) instead of the kit's FrozenInt8Matmul.
On a CPU the same runs measure the process' peak RSS above its level after the first step (a smoke
run: the plan's comparison there is tests/test_plan.py).
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

GiB = 2**30
TARGETS_GIB = {"sdxl": 10.0, "sd15": 6.0}


def one_run(model: str, resolution: int, steps: int, checkpointing: bool, device: str, matmul: str) -> dict:
    """In its own process: build, fuse a random LoRA 1, train LoRA 2; measure the steps after the first."""
    from memory import RandomConditionBackend, public_unet, random_lora, reset_peak_rss, vm_kib

    from difflora_kit import plan, preset, quant
    from difflora_kit.config import TrainConfig
    from difflora_kit.model_configs import build_unet
    from difflora_kit.devices import compute_dtype
    from difflora_kit.train import train_lora

    if matmul == "bnb":  # bitsandbytes' own matmul: keeps each linear's input for the backward pass
        quant.Int8Linear.forward = quant.bnb.nn.Linear8bitLt.forward
    dev = torch.device(device)
    dtype = compute_dtype(dev)
    cfg = TrainConfig(steps=steps, batch=1, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    started = time.time()
    unet = build_unet(public_unet(model), dev).to(dtype)  # random init where it runs (fast on a GPU), then the compute dtype
    backend = RandomConditionBackend(model, unet, resolution, dev)
    preset.apply_preset(unet, random_lora(unet, cfg.rank, cfg.targets), 1.0, cfg.preset_mode)
    prepare_s = time.time() - started
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    marks = {}

    def after(step, loss):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        marks[step] = time.time()
        if step == 1:  # the first step sets up (AdamW moments, kernels): measure the ones after it
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                marks["base"] = 0
            else:
                reset_peak_rss()
                marks["base"] = vm_kib("VmRSS") * 1024

    image = np.zeros((resolution, resolution, 3), np.float32)
    result = train_lora(backend, image, "a photo", cfg, progress=False, on_step=after)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else vm_kib("VmHWM") * 1024 - marks["base"]
    step_s = float(np.median(np.diff([marks[i] for i in range(1, steps + 1)]))) if steps > 1 else float("nan")
    predicted = plan.plan_memory(model, resolution, cfg, plan.DTYPE_NAMES[dtype])
    return {"model": model, "resolution": resolution, "checkpointing": checkpointing, "matmul": matmul,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype),
            "peak": peak, "peak_kind": "max_memory_allocated" if dev.type == "cuda" else "RSS above step 1",
            "predicted_step2": predicted.step2.peak, "predicted_components": predicted.step2.components,
            "step_s": step_s, "prepare_s": prepare_s, "losses": result.losses}


def run_in_subprocess(*args) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import gpu_memory; "
            f"print('RESULT', json.dumps(gpu_memory.one_run(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": out.stderr[-2000:], "args": list(args)}
    return json.loads(lines[-1][len("RESULT "):])


def table(runs: list[dict]) -> str:
    lines = ["| model | px | checkpointing | 8-bit matmul | peak GiB | plan GiB | plan / peak | target | step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['args'][0]} | {r['args'][1]} | {r['args'][3]} | {r['args'][5]} | FAILED: "
                         f"{r['error'].strip().splitlines()[-1][:120] if r['error'].strip() else '?'} | | | | |")
            continue
        target = TARGETS_GIB.get(r["model"])
        ok = "" if r["peak_kind"] != "max_memory_allocated" or target is None else \
            (f"< {target:g}: {'yes' if r['peak'] / GiB < target else 'NO'}")
        lines.append(f"| {r['model']} | {r['resolution']} | {'on' if r['checkpointing'] else 'off'} | {r['matmul']} | "
                     f"{r['peak'] / GiB:.2f} | {r['predicted_step2'] / GiB:.2f} | {r['predicted_step2'] / r['peak']:.2f} | "
                     f"{ok} | {r['step_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sdxl,sd15")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: sdxl 1024, sd15 512)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    parser.add_argument("--compare-bnb", action="store_true", help="also run with bitsandbytes' own 8-bit matmul")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="gpu_memory", help="results file name under bench/results/")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    runs = []
    for model in args.models.split(","):
        resolution = args.resolution or {"sdxl": 1024, "sd15": 512}[model]
        for gc in [c == "on" for c in args.checkpointing.split(",")]:
            for matmul in ("kit", "bnb") if args.compare_bnb else ("kit",):
                print(f"... {model} {resolution}px checkpointing={'on' if gc else 'off'} matmul={matmul}", flush=True)
                runs.append(run_in_subprocess(model, resolution, args.steps, gc, args.device, matmul))
    text = table(runs)
    print(text)
    if not args.no_write:
        write_result(args.name, {"runs": runs}, "Step-2 training, batch 1, rank 8, preset fused "
                     "(bench/gpu_memory.py):\n\n" + text)
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
