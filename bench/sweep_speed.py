"""Strength sweeps: one batched pass against one pass per strength; and whether the start-noise gate helps.

    python bench/sweep_speed.py [--repeats 3] [--gates 0,0.25,0.5]

Speed: a sweep of 8 strengths x 4 seeds on the toy model, sampled (a) in ONE batched call of
`sample.sweep` (per-sample LoRA scale, batch 32) and (b) as 8 calls of 4 seeds, one per strength,
the way a loop over `set_adapters(..., [s])` would. Same LoRA, same sampler settings; median of
--repeats, interleaved. Target (issue 4): batched >= 2x faster on this CPU.

The gate: LoRA 2 of one trained pair, on 4 other prompts x 3 seeds at s = 0, 1, 2, with the LoRA
off for the first 0 / 25% / 50% of the steps: the judge's detail score change and content kept.
The kit's default (0) follows these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import sample  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.demo import DEFAULT_PAIRS  # noqa: E402
from difflora_kit.evaluate import other_prompts, strength_effect  # noqa: E402
from difflora_kit.images import load_image  # noqa: E402
from difflora_kit.pair import prepare_base, train_pair  # noqa: E402
from difflora_kit.toy.pairs import read_pairs  # noqa: E402

STRENGTHS = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
SEEDS = [0, 1, 2, 3]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gates", default="0,0.25,0.5")
    parser.add_argument("--pair", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the sweeps run (cuda: the GPU figure; training stays on the CPU)")
    parser.add_argument("--name", default="sweep_speed", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    row = read_pairs(DEFAULT_PAIRS)[args.pair]
    pair = train_pair(load_image(row["image1"]), load_image(row["image2"]), row["prompt"], TrainConfig(), progress=False)
    plain = prepare_base("toy", TrainConfig(), device=args.device)
    cfg = SampleConfig()
    prompt = [row["prompt"]]

    def batched():
        sample.sweep(plain, pair.lora2, prompt, SEEDS, STRENGTHS, cfg)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def per_strength():
        for s in STRENGTHS:
            sample.sweep(plain, pair.lora2, prompt, SEEDS, [s], cfg)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    batched()  # warm-up (first-call allocations)
    times = {"batched": [], "per_strength": []}
    for _ in range(args.repeats):
        times["batched"].append(timed(batched))
        times["per_strength"].append(timed(per_strength))
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["per_strength"] / med["batched"]

    scenes = other_prompts(4, exclude=row["prompt"])
    gates = []
    for gate in (float(g) for g in args.gates.split(",")):
        e = strength_effect(plain, pair.lora2, scenes, [200, 201, 202], (0.0, 1.0, 2.0), "detail",
                            SampleConfig(lora_off_first=gate))
        gates.append({"gate": gate, "effect": e["effect_mean"], "effect_std": e["effect_std"],
                      "content_kept": e["content_kept"]})

    lines = [f"Sweep of {len(STRENGTHS)} strengths x {len(SEEDS)} seeds, toy model, {cfg.steps} DDIM steps, "
             f"guidance {cfg.guidance} (batch {2 * len(STRENGTHS) * len(SEEDS)} with the unconditional half); "
             f"median of {args.repeats}.", "",
             "| how | seconds | images/s |", "|---|---|---|",
             f"| one batched call (per-sample LoRA scale) | {med['batched']:.2f} | "
             f"{len(STRENGTHS) * len(SEEDS) / med['batched']:.1f} |",
             f"| {len(STRENGTHS)} calls of {len(SEEDS)} seeds | {med['per_strength']:.2f} | "
             f"{len(STRENGTHS) * len(SEEDS) / med['per_strength']:.1f} |",
             "", f"Batched is **{speedup:.2f}x** faster (target >= 2x): **{'PASS' if speedup >= 2 else 'FAIL'}**.", "",
             f"Start-noise gate, LoRA 2 of pair {args.pair} on {len(scenes)} other prompts x 3 seeds "
             "(detail score change from s = 0, mean (sd); content kept):", "",
             "| LoRA off for the first | effect at s=1 | effect at s=2 | content kept s=1 | content kept s=2 |",
             "|---|---|---|---|---|"]
    for g in gates:
        lines.append(f"| {g['gate']:.0%} of steps | {g['effect'][1]:+.2f} ({g['effect_std'][1]:.2f}) | "
                     f"{g['effect'][2]:+.2f} ({g['effect_std'][2]:.2f}) | {g['content_kept'][1]:.0%} | "
                     f"{g['content_kept'][2]:.0%} |")
    table = "\n".join(lines)
    print(table)
    write_result(args.name, {"times": times, "median": med, "speedup": speedup, "gates": gates,
                                 "strengths": STRENGTHS, "seeds": SEEDS, "pair": row}, table)


if __name__ == "__main__":
    main()
