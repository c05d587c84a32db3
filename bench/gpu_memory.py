"""Step-2 training of the full-size SDXL and SD 1.5 denoisers on a GPU: peak GPU memory, host memory and
step time, against the memory plan's prediction (difflora_kit.plan).

    python bench/gpu_memory.py                                  # sdxl@1024, sd15@512; batch 1; checkpointing off/on
    python bench/gpu_memory.py --models sd15 --resolution 512 --steps 4 --name gpu_memory_sd15
    python bench/gpu_memory.py --models sd15 --checkpointing on --offload-blocks 0,4 --steps 3 \
        --no-write --json "$OUT/memory.json" --timeout 80    # what bench/gpu_check.sh runs
    python bench/gpu_memory.py --dry-run --models sd15,sdxl --checkpointing on --offload-blocks 0,4   # list the runs
    python bench/gpu_memory.py --device cpu --models sd15 --resolution 64 --steps 2 --no-write   # smoke run

Targets (the real-models issue): SDXL step 2 at 1024x1024, batch 1, under 10 GB peak (a 12 GB card);
SD 1.5 at 512 under 6 GB.

Each (model, checkpointing, offload, matmul) runs in its own process: the denoiser is built from its
public config (difflora_kit.model_configs; random weights, nothing downloaded) in the compute dtype
(bf16 on sm80+, fp16 before), a random rank-8 LoRA 1 is fused in as step 2's preset (the merge
kernels: Triton on sm80+), LoRA 2 is trained by the kit's own loop (train.train_lora) on a random
latent with random text conditioning of the real shapes. Peak: torch.cuda.max_memory_allocated over
the steps after the first (reset when the first ends), against the plan's step-2 peak (encoders
offloaded: none here). With `--offload-blocks N` (block swap, needs checkpointing) that many blocks
wait in pinned host memory: the plan predicts their bytes (MemoryPlan.block_swap(N).offloaded); the
run measures the process' resident memory added between the start of training and the end of step 1
(VmRSS: the pinned copies are resident) and the pinned allocator's own count
(torch.cuda.host_memory_stats, which rounds each block up to a power of two).
`--compare-bnb` adds a run per model where the 8-bit linears use bitsandbytes' own matmul (which keeps
every linear's input for the backward pass) instead of the kit's FrozenInt8Matmul.
On a CPU the same runs measure the process' peak RSS above its level after the first step (a smoke
run: the plan's comparison there is tests/test_plan.py). `--dry-run` builds no model: it checks the
settings and lists the runs (what bench/gpu_check.sh's dry mode runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

GiB = 2**30
TARGETS_GIB = {"sdxl": 10.0, "sd15": 6.0}
DEFAULT_RESOLUTION = {"sdxl": 1024, "sd15": 512}


def train_config(steps: int, checkpointing: bool, offload: int):
    """The run's TrainConfig: batch 1, the kit's rank and targets (offload needs checkpointing: TrainConfig says so)."""
    from difflora_kit.config import TrainConfig

    return TrainConfig(steps=steps, batch=1, gradient_checkpointing=checkpointing, offload_blocks=offload)


def predicted(model: str, resolution: int, cfg, dtype_name: str) -> dict:
    """The plan's step-2 peak, its components and (block swap) the host bytes it predicts."""
    from difflora_kit import plan

    p = plan.plan_memory(model, resolution, cfg, dtype_name)
    host = p.block_swap(cfg.offload_blocks).offloaded if cfg.offload_blocks else 0
    return {"predicted_step2": p.step2.peak, "predicted_components": p.step2.components, "predicted_host": host}


def host_pinned() -> dict:
    """The CUDA pinned (host) allocator's byte counts, where this torch has them ({} otherwise)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return {}
    try:
        return {k: int(v) for k, v in stats().items() if "bytes" in k and ("current" in k or "peak" in k)}
    except RuntimeError:  # no pinned allocation yet in some versions
        return {}


def one_run(model: str, resolution: int, steps: int, checkpointing: bool, device: str, matmul: str,
            offload: int = 0) -> dict:
    """In its own process: build, fuse a random LoRA 1, train LoRA 2; measure the steps after the first."""
    from memory import RandomConditionBackend, public_unet, random_lora, reset_peak_rss, vm_kib

    from difflora_kit import plan, preset, quant
    from difflora_kit.devices import compute_dtype
    from difflora_kit.model_configs import build_unet
    from difflora_kit.train import train_lora

    if matmul == "bnb":  # bitsandbytes' own matmul: keeps each linear's input for the backward pass
        quant.Int8Linear.forward = quant.bnb.nn.Linear8bitLt.forward
    dev = torch.device(device)
    dtype = compute_dtype(dev)
    cfg = train_config(steps, checkpointing, offload)
    torch.manual_seed(0)
    started = time.time()
    unet = build_unet(public_unet(model), dev).to(dtype)  # random init where it runs (fast on a GPU), then the compute dtype
    backend = RandomConditionBackend(model, unet, resolution, dev)
    preset.apply_preset(unet, random_lora(unet, cfg.rank, cfg.targets), 1.0, cfg.preset_mode)
    prepare_s = time.time() - started
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    marks = {"rss_before_training": vm_kib("VmRSS") * 1024}

    def after(step, loss):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        marks[step] = time.time()
        if step == 1:  # the first step sets up (AdamW moments, kernels, block swap): measure the ones after it
            marks["rss_after_step1"] = vm_kib("VmRSS") * 1024
            marks["pinned_after_step1"] = host_pinned()
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
    return {"model": model, "resolution": resolution, "checkpointing": checkpointing, "matmul": matmul,
            "offload_blocks": offload,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype),
            "peak": peak, "peak_kind": "max_memory_allocated" if dev.type == "cuda" else "RSS above step 1",
            "host_added": marks["rss_after_step1"] - marks["rss_before_training"],
            "host_peak_rss": vm_kib("VmHWM") * 1024, "pinned": marks["pinned_after_step1"],
            **predicted(model, resolution, cfg, plan.DTYPE_NAMES[dtype]),
            "step_s": step_s, "prepare_s": prepare_s, "losses": result.losses}


def run_in_subprocess(*args, timeout: float | None = None) -> dict:
    """one_run(*args) in a fresh Python; {"error": ..., "args": [...]} when it fails or runs past `timeout` s."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import gpu_memory; "
            f"print('RESULT', json.dumps(gpu_memory.one_run(*{args!r})))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return {"error": f"ran past {timeout:g} s and was stopped\n"
                         f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}", "args": list(args)}
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": out.stderr[-2000:], "args": list(args)}
    return json.loads(lines[-1][len("RESULT "):])


def gib(x) -> str:
    return f"{x / GiB:.2f}"


def table(runs: list[dict]) -> str:
    lines = ["| model | px | checkpointing | offload blocks | 8-bit matmul | peak GiB | plan GiB | plan / peak | target | "
             "host added GiB | pinned GiB | plan host GiB | step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            a = r["args"]
            why = r["error"].strip().splitlines()[-1][:120] if r["error"].strip() else "?"
            lines.append(f"| {a[0]} | {a[1]} | {a[3]} | {a[6] if len(a) > 6 else 0} | {a[5]} | FAILED: {why} "
                         "| | | | | | | |")
            continue
        target = TARGETS_GIB.get(r["model"])
        ok = "" if r["peak_kind"] != "max_memory_allocated" or target is None else \
            (f"< {target:g}: {'yes' if r['peak'] / GiB < target else 'NO'}")
        pinned = r.get("pinned") or {}
        pinned_bytes = next((v for k, v in sorted(pinned.items()) if k.startswith("allocated_bytes") and "current" in k),
                            None)
        lines.append(f"| {r['model']} | {r['resolution']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r.get('offload_blocks', 0)} | {r['matmul']} | {gib(r['peak'])} | {gib(r['predicted_step2'])} | "
                     f"{r['predicted_step2'] / r['peak']:.2f} | {ok} | {gib(r['host_added'])} | "
                     f"{'-' if pinned_bytes is None else gib(pinned_bytes)} | {gib(r['predicted_host'])} | "
                     f"{r['step_s']:.3f} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Run:
    model: str
    resolution: int
    checkpointing: bool
    offload: int
    matmul: str


def runs_wanted(models: str, resolution: int | None, checkpointing: str, offloads: str, compare_bnb: bool) -> list[Run]:
    """Every (model, checkpointing, offload, matmul) asked for; block swap only with checkpointing (the kit
    refuses it without). A bad name or value raises ValueError naming it."""
    out = []
    for model in models.split(","):
        if model not in DEFAULT_RESOLUTION:
            raise ValueError(f"--models: {model!r} is not one of {', '.join(DEFAULT_RESOLUTION)}")
        for gc in checkpointing.split(","):
            if gc not in ("on", "off"):
                raise ValueError(f"--checkpointing: {gc!r} is not on or off")
            for n in (int(x) for x in offloads.split(",")):
                if n and gc == "off":
                    continue
                for matmul in ("kit", "bnb") if compare_bnb else ("kit",):
                    out.append(Run(model, resolution or DEFAULT_RESOLUTION[model], gc == "on", n, matmul))
    return out


def dry_run(wanted: list[Run], steps: int) -> str:
    """The runs that would be made, each one's settings checked (TrainConfig refuses a bad combination);
    no model is built and nothing is planned (tests/test_plan.py checks the plan)."""
    lines = ["| model | px | checkpointing | offload blocks | 8-bit matmul | steps |", "|---|---|---|---|---|---|"]
    for r in wanted:
        train_config(steps, r.checkpointing, r.offload)  # raises on a combination the kit refuses
        lines.append(f"| {r.model} | {r.resolution} | {'on' if r.checkpointing else 'off'} | {r.offload} | "
                     f"{r.matmul} | {steps} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sdxl,sd15")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: sdxl 1024, sd15 512)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    parser.add_argument("--offload-blocks", default="0", help="block swap: 0, N or 0,N (needs checkpointing on)")
    parser.add_argument("--compare-bnb", action="store_true", help="also run with bitsandbytes' own 8-bit matmul")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="gpu_memory", help="results file name under bench/results/")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write every run so far to this file, after each run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run (its process is stopped after)")
    parser.add_argument("--dry-run", action="store_true", help="check the settings and list the runs; build nothing")
    args = parser.parse_args(argv)
    try:
        wanted = runs_wanted(args.models, args.resolution, args.checkpointing, args.offload_blocks, args.compare_bnb)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        try:
            listed = dry_run(wanted, args.steps)
        except ValueError as e:  # a combination TrainConfig refuses
            parser.error(str(e))
        print(f"dry run: {len(wanted)} runs would be made (no model built)\n" + listed)
        if args.json:  # the same file a real run writes, holding the runs it would make
            args.json.write_text(json.dumps({"dry_run": True, "runs": [dataclasses.asdict(r) for r in wanted]},
                                            indent=1) + "\n")
        return
    runs = []
    for r in wanted:
        print(f"... {r.model} {r.resolution}px checkpointing={'on' if r.checkpointing else 'off'} "
              f"offload_blocks={r.offload} matmul={r.matmul}", flush=True)
        runs.append(run_in_subprocess(r.model, r.resolution, args.steps, r.checkpointing, args.device, r.matmul,
                                      r.offload, timeout=args.timeout))
        print(table(runs[-1:]).splitlines()[-1], flush=True)
        if args.json:  # as each run ends: a run stopped later still leaves the earlier ones
            args.json.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1, default=str) + "\n")
    text = table(runs)
    print(text)
    if not args.no_write:
        write_result(args.name, {"runs": runs}, "Step-2 training, batch 1, rank 8, preset fused "
                     "(bench/gpu_memory.py):\n\n" + text)
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
