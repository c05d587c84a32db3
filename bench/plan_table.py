"""The memory plan's predictions for the real models (what README.md quotes), written down.

    python bench/plan_table.py

`difflora plan` for SDXL at 1024, SD 1.5 at 512 and Z-Image(-Turbo) at 1024, batch 1, rank 8, bf16 (fp16 for a T4 beside it),
with and without gradient checkpointing. Predictions from the configs (difflora_kit.plan), not
measurements: bench/gpu_memory.py measures the same settings on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import plan  # noqa: E402
from difflora_kit.config import TrainConfig  # noqa: E402


def main() -> None:
    rows = []
    for model, px in (("sdxl", 1024), ("sd15", 512), ("zimage", 1024)):
        for dtype in ("bf16", "fp16"):
            for gc in (False, True):
                p = plan.plan_memory(model, px, TrainConfig(batch=1, gradient_checkpointing=gc), dtype)
                rows.append({"model": model, "px": px, "dtype": dtype, "checkpointing": gc, "step": p.step2.peak,
                             "activations": p.step2.components["activations kept for backward"],
                             "load": p.load_peak, "encode": p.encode_peak, "peak": p.peak})
    G = 2**30
    lines = ["| model | px | dtype | checkpointing | activations | step 2 peak | loading | encoding | overall peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['px']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['activations'] / G:.2f} | {r['step'] / G:.2f} | {r['load'] / G:.2f} | {r['encode'] / G:.2f} | "
                     f"{r['peak'] / G:.2f} |")
    table = ("Predicted GiB (difflora plan; batch 1, rank 8, encoders on the CPU while training; "
             "torch.cuda.max_memory_allocated, the CUDA context not included):\n\n" + "\n".join(lines))
    print(table)
    write_result("plan_table", {"rows": rows}, table)


if __name__ == "__main__":
    main()
