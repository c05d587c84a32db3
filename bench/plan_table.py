"""The memory plan's predictions for the real models (what README.md quotes), written down.

    python bench/plan_table.py

`difflora plan` for SDXL at 1024, SD 1.5 at 512, Z-Image(-Turbo) and FLUX.1-dev at 1024, batch 1,
rank 8, bf16 (fp16 for a T4 beside it), with and without gradient checkpointing: every phase of a
stage (encoding first, then loading the 8-bit denoiser, the training steps, sampling), the overall
peak, its phase and its largest component. Predictions from the public configs (difflora_kit.plan),
not measurements: bench/gpu_memory.py measures a training step on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import plan  # noqa: E402
from difflora_kit.config import TrainConfig  # noqa: E402

MODELS = (("sdxl", 1024), ("sd15", 512), ("zimage", 1024), ("flux", 1024))


def main() -> None:
    rows = []
    for model, px in MODELS:
        for dtype in ("bf16", "fp16"):
            for gc in (False, True):
                p = plan.plan_memory(model, px, TrainConfig(batch=1, gradient_checkpointing=gc), dtype)
                _, part, size = p.in_the_way
                rows.append({"model": model, "px": px, "dtype": dtype, "checkpointing": gc,
                             "activations": p.step2.components["activations kept for backward"],
                             **{name: ph.peak for name, ph in p.phases.items()}, "peak": p.peak,
                             "peak_phase": " and ".join(p.peak_phases), "in_the_way": part, "in_the_way_bytes": size,
                             "components": {name: ph.components for name, ph in p.phases.items()}})
                print(model, px, dtype, gc, f"{p.peak / 2**30:.2f} GiB in {' and '.join(p.peak_phases)}", flush=True)
    G = 2**30
    lines = ["| model | px | dtype | checkpointing | activations | encoding | loading | step 2 | sampling | "
             "overall peak | in | largest part of it |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['px']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['activations'] / G:.2f} | {r['encoding'] / G:.2f} | {r['loading'] / G:.2f} | "
                     f"{r['step 2'] / G:.2f} | {r['sampling'] / G:.2f} | **{r['peak'] / G:.2f}** | {r['peak_phase']} | "
                     f"{r['in_the_way']} {r['in_the_way_bytes'] / G:.2f} |")
    table = ("Predicted GiB (difflora plan; batch 1, rank 8; encode first: the encoders and the VAE encode before "
             "the denoiser is loaded and are on the CPU while it trains, the VAE back for sampling's decode; "
             f"sampling {plan.SAMPLE_ROWS} rows; torch.cuda.max_memory_allocated, the CUDA context not included):\n\n"
             + "\n".join(lines))
    print(table)
    write_result("plan_table", {"rows": rows}, table)


if __name__ == "__main__":
    main()
