"""The memory plan against real training steps of the kit on this CPU (what tests/test_plan.py checks).

    python bench/plan_check.py            # batch 2 and 8, checkpointing off and on

A mid-size SD-1.5-like pipeline (the tiny one of difflora_kit.tiny_models with a bigger denoiser:
256 px images, 32x32 latents, activations of a few hundred MB). Measured: the peak RSS of the last
of `steps` training steps (train.train_lora, the kit's loop, 8-bit base) above the RSS the step
before it left, in a fresh process with glibc returning every large block at free
(MALLOC_MMAP_THRESHOLD_), one thread. Predicted: the plan's activations + backward workspace for
the same settings (fp32 on a CPU). On a GPU, bench/gpu_memory.py compares the whole peak with
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

MID_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=8, norm_num_groups=32)
RESOLUTION = 256


def make_mid_pipeline(folder: Path) -> Path:
    """The tiny SD 1.5 pipeline with MID_UNET as its denoiser, saved to `folder`."""
    from diffusers import UNet2DConditionModel

    from difflora_kit.tiny_models import make_tiny_pipeline

    make_tiny_pipeline("sd15", folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    cross = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
    UNet2DConditionModel(**MID_UNET, cross_attention_dim=cross).save_pretrained(folder / "unet", safe_serialization=True)
    return folder


MEASURE = r"""
import json, sys
from pathlib import Path
import numpy as np
from difflora_kit import pair, quant, train
from difflora_kit.config import TrainConfig

if sys.argv[4] == "bnb":  # bitsandbytes' own 8-bit matmul (keeps each linear's input) instead of the kit's
    quant.Int8Linear.forward = quant.bnb.nn.Linear8bitLt.forward

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

cfg = TrainConfig(**json.loads(sys.argv[2]))
backend = pair.prepare_base(sys.argv[1], cfg)
image = np.full((int(sys.argv[3]), int(sys.argv[3]), 3), 0.5, np.float32)
before = {}

def after(step, loss):  # the last step is measured: from the end of the one before it
    if step == cfg.steps - 1:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before["rss"] = kib("VmRSS")

train.train_lora(backend, image, "a photo", cfg, progress=False, on_step=after)
print("RESULT", json.dumps({"step_peak": kib("VmHWM") - before["rss"]}))
"""


def measured_step_peak(folder: Path, steps: int, batch: int, checkpointing: bool, matmul: str = "kit") -> int:
    """Bytes the last step of a real training run adds to the process at its peak, on this CPU.
    matmul "bnb": the 8-bit linears use bitsandbytes' own matmul instead of quant.FrozenInt8Matmul."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    settings = {"steps": steps, "batch": batch, "gradient_checkpointing": checkpointing}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), json.dumps(settings), str(RESOLUTION), matmul],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])["step_peak"]


def predicted_step_peak(folder: Path, batch: int, checkpointing: bool) -> int:
    from difflora_kit import plan
    from difflora_kit.config import TrainConfig

    c = plan.plan_memory(folder, RESOLUTION, TrainConfig(batch=batch, gradient_checkpointing=checkpointing),
                         "fp32").step1.components
    return c["activations kept for backward"] + c["backward workspace (estimate)"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_mid_pipeline(Path(tmp) / "mid_sd15")
        for batch in (int(b) for b in args.batches.split(",")):
            for gc in (False, True):
                m, p = measured_step_peak(folder, args.steps, batch, gc), predicted_step_peak(folder, batch, gc)
                rows.append({"batch": batch, "checkpointing": gc, "measured": m, "predicted": p,
                             "measured_bnb_matmul": measured_step_peak(folder, args.steps, batch, gc, "bnb")})
                print(rows[-1], flush=True)
    lines = ["| batch | checkpointing | measured MiB | predicted MiB | predicted / measured | measured with bitsandbytes' matmul MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {'on' if r['checkpointing'] else 'off'} | {r['measured'] / 2**20:.0f} | "
                     f"{r['predicted'] / 2**20:.0f} | {r['predicted'] / r['measured']:.2f} | {r['measured_bnb_matmul'] / 2**20:.0f} |")
    table = ("A training step's activation memory on this CPU (mid-size SD-1.5-like denoiser, 256 px, 8-bit base, "
             "fp32; bench/plan_check.py):\n\n" + "\n".join(lines))
    print(table)
    write_result("plan_check", {"rows": rows, "unet": MID_UNET, "resolution": RESOLUTION}, table)


if __name__ == "__main__":
    main()
