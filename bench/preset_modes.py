"""The three ways to apply LoRA 1 in step 2 (fuse, requant, adapter), measured on the toy model.

    python bench/preset_modes.py [--pair 0] [--seeds 8]

One LoRA 1 is trained (step 1, kit defaults, shipped detail pair). Then, for each mode:
- the error of the effective update of the preset's int8 linears, against the full-precision
  target W + D and against what step 1 trained LoRA 1 on, Q(W) + D:
      ||W_eff - (W + D)|| / ||D||      and      ||W_eff - (Q(W) + D)|| / ||D||     (all layers pooled)
- claim 1 survives: the step-2 base alone (base + LoRA 1 as applied) draws image 1 over the seeds
  (scene match and PSNR), beside base + LoRA 1 as in step 1;
- step 2 itself: seconds per training step, then claim 2 (base + LoRA 1 + LoRA 2 draws image 2) and
  LoRA 2's effect on other prompts at s = 1 (detail score change, content kept).
Peak memory per mode is in bench/memory.py (each mode needs a fresh process to measure it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import backends, lora, preset, quant  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.demo import DEFAULT_PAIRS  # noqa: E402
from difflora_kit.evaluate import other_prompts, reproduction, strength_effect  # noqa: E402
from difflora_kit.images import load_image  # noqa: E402
from difflora_kit.pair import prepare_base, train_stage  # noqa: E402
from difflora_kit.toy.pairs import read_pairs  # noqa: E402
from difflora_kit.train import train_lora  # noqa: E402


def pooled_relative_error(effective: dict, target: dict) -> float:
    """sqrt(sum ||eff - target||^2) / sqrt(sum ||target||^2) over layers."""
    num = sum(float((effective[n] - target[n]).pow(2).sum()) for n in target)
    den = sum(float(target[n].pow(2).sum()) for n in target)
    return (num / den) ** 0.5


def reference_weights(lora1: lora.LoraFile, strength: float):
    """Per preset linear: W (fp32), Q(W) dequantized, and the exact update D."""
    fp = backends.load_backend("toy").unet
    names = [n for n in lora1.modules() if type(fp.get_submodule(n)) is torch.nn.Linear]
    W = {n: fp.get_submodule(n).weight.detach().float().clone() for n in names}
    q = quant.quantize_linears(fp)
    QW = {n: quant.dequantized_weight(q.get_submodule(n)) for n in names}
    D = {n: d.to(W[n].device) for n, d in lora.module_deltas(lora1, strength).items() if n in W}  # LoRA files are CPU tensors
    return W, QW, D


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--sweep-seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the kit's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    row = read_pairs(DEFAULT_PAIRS)[args.pair]
    image1, image2, prompt = load_image(row["image1"]), load_image(row["image2"]), row["prompt"]
    cfg = TrainConfig(**({"steps": args.steps} if args.steps else {}))
    sample_cfg, seeds = SampleConfig(), list(range(100, 100 + args.seeds))
    lora1 = train_stage(image1, prompt, cfg, progress=False).lora
    W, QW, D = reference_weights(lora1, cfg.preset_scale)
    plain = prepare_base("toy", cfg)
    step1_model = reproduction(plain, lora1, prompt, image1, seeds, sample_cfg)
    scenes = other_prompts(args.prompts, exclude=prompt)
    sweep_seeds = list(range(200, 200 + args.sweep_seeds))

    rows, lora2s = [], {}
    for mode in preset.PRESET_MODES:
        mode_cfg = TrainConfig(**{**cfg.__dict__, "preset_mode": mode})
        started = time.time()
        base = prepare_base("toy", mode_cfg, lora1)
        prepare_s = time.time() - started
        effective = preset.effective_deltas(base.unet, W)  # W_eff - W
        err_fp = pooled_relative_error(effective, D)
        err_step1 = pooled_relative_error({n: effective[n] + W[n] - QW[n] for n in D}, D)  # W_eff - Q(W) vs D
        claim1 = reproduction(base, None, prompt, image1, seeds, sample_cfg)
        step2 = train_lora(base, image2, prompt, mode_cfg, {"stage": 2}, progress=False)
        claim2 = reproduction(prepare_base("toy", mode_cfg, lora1), step2.lora, prompt, image2, seeds, sample_cfg)
        effect = strength_effect(plain, step2.lora, scenes, sweep_seeds, (0.0, 1.0), "detail", sample_cfg)
        lora2s[mode] = lora.module_deltas(step2.lora)
        first = lora2s[preset.PRESET_MODES[0]]  # how far this mode's LoRA 2 is from the default mode's
        lora2_diff = pooled_relative_error(lora2s[mode], first)
        rows.append({"mode": mode, "err_vs_fp": err_fp, "err_vs_step1": err_step1, "prepare_s": prepare_s,
                     "claim1_match": claim1["match"], "claim1_psnr": claim1["psnr"],
                     "step_s": float(sorted(step2.step_seconds[1:])[len(step2.step_seconds[1:]) // 2]), "final_loss": step2.losses[-1],
                     "claim2_match": claim2["match"], "claim2_psnr": claim2["psnr"],
                     "effect_s1": effect["effect_mean"][1], "effect_std_s1": effect["effect_std"][1],
                     "content_kept_s1": effect["content_kept"][1], "lora2_diff_vs_fuse": lora2_diff})
        print(rows[-1], flush=True)

    lines = [f"Pair {args.pair} ({prompt!r}, detail axis), {cfg.steps} steps per LoRA, rank {cfg.rank}; "
             f"{len(seeds)} seeds for claims 1-2; effect over {len(scenes)} other prompts x {len(sweep_seeds)} seeds. "
             f"Step 1's own model (8-bit base + LoRA 1 as an adapter) draws image 1 in "
             f"{step1_model['match']:.0%} of seeds at {step1_model['psnr']:.1f} dB.", "",
             "| mode | err vs W+D | err vs Q(W)+D (step 1's model) | prepare s | claim 1: match, dB | step-2 s/step | "
             "claim 2: match, dB | LoRA 2 alone at s=1: detail +, content kept | LoRA 2's delta-W vs fuse's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['err_vs_fp']:.4f} | {r['err_vs_step1']:.4f} | {r['prepare_s']:.2f} | "
                     f"{r['claim1_match']:.0%}, {r['claim1_psnr']:.2f} | {r['step_s']:.3f} | "
                     f"{r['claim2_match']:.0%}, {r['claim2_psnr']:.2f} | "
                     f"{r['effect_s1']:+.3f} (sd {r['effect_std_s1']:.3f}), {r['content_kept_s1']:.0%} | "
                     f"{r['lora2_diff_vs_fuse']:.4f} |")
    table = "\n".join(lines)
    print(table)
    write_result("preset_modes", {"pair": row, "train_config": cfg.__dict__, "step1_model": {
        "match": step1_model["match"], "psnr": step1_model["psnr"]}, "rows": rows}, table)


if __name__ == "__main__":
    main()
