"""One pair (step 1 + step 2) on the toy model: the kit against a plain diffusers + peft loop.

    python bench/pair_speed.py [--pair 0] [--max-steps 2000]

The kit: `train_pair` with its defaults (8-bit base, stratified batch of noise levels, cached
text states). The plain loop is what a user writes without the kit, DiffSynth-Studio style: fp32
base, the same LoRA (rank, alpha, targets, AdamW, learning rate), one image and one random
timestep per step, the prompt encoded each step, LoRA 1 fused for step 2 with peft's merge
(`merge_and_unload`). It trains until it reproduces the image as well as the kit did (judge scene
match over 8 seeds >= the kit's, PSNR within 0.5 dB), checked every `--check-every` steps;
sampling for those checks is not timed. Both run in this one process, one after the other.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import backends, diffusion  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.demo import DEFAULT_PAIRS  # noqa: E402
from difflora_kit.evaluate import reproduction  # noqa: E402
from difflora_kit.images import load_image  # noqa: E402
from difflora_kit.lora import peft_config  # noqa: E402
from difflora_kit.pair import prepare_base, train_pair  # noqa: E402
from difflora_kit.toy.pairs import read_pairs  # noqa: E402

SEEDS = list(range(100, 108))


def plain_stage(image, prompt, cfg: TrainConfig, target_quality: dict, max_steps: int, check_every: int,
                preset_state: dict | None = None):
    """A plain loop; returns (seconds of training, steps, quality reached, adapter state)."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    backend = backends.load_backend("toy")  # fp32
    unet = backend.unet
    if preset_state is not None:  # LoRA 1 fused with peft's merge
        unet.add_adapter(peft_config(cfg.rank, cfg.alpha, cfg.targets), adapter_name="lora1")
        set_peft_model_state_dict(unet, preset_state, adapter_name="lora1")
        unet.fuse_lora(adapter_names=["lora1"])  # peft's LoraLayer.merge under the hood
        unet.delete_adapters("lora1")  # the merged weight stays
    unet.add_adapter(peft_config(cfg.rank, cfg.alpha, cfg.targets), adapter_name="lora")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    x0 = backend.encode_images(image[None])  # (1, C, H, W)
    torch.manual_seed(cfg.seed)
    seconds, steps, quality = 0.0, 0, None
    while steps < max_steps:
        unet.train()
        started = time.time()
        for _ in range(check_every):
            ids = backend.tokenizer([prompt], padding="max_length", max_length=backend.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                states = backend.text_encoder(ids).last_hidden_state
            noise = torch.randn_like(x0)
            t = torch.randint(0, backend.scheduler.config.num_train_timesteps, (1,))
            x_t, target = diffusion.noisy_and_target(backend.scheduler, x0, noise, t)
            loss = torch.nn.functional.mse_loss(unet(x_t, t, states).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.time() - started
        steps += check_every
        unet.eval()
        quality = reproduction(backend, None, prompt, image, SEEDS, SampleConfig())
        print(f"  plain loop: {steps} steps, {seconds:.1f} s, match {quality['match']:.0%}, PSNR {quality['psnr']:.1f} dB", flush=True)
        if quality["match"] >= target_quality["match"] and quality["psnr"] >= target_quality["psnr"] - 0.5:
            break
    state = get_peft_model_state_dict(unet, adapter_name="lora")
    return seconds, steps, quality, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--check-every", type=int, default=50)
    args = ap.parse_args()
    row = [r for r in read_pairs(DEFAULT_PAIRS) if r["axis"] == "detail"][args.pair]
    image1, image2, prompt = load_image(row["image1"]), load_image(row["image2"]), row["prompt"]
    cfg = TrainConfig()

    started = time.time()
    kit = train_pair(image1, image2, prompt, cfg, progress=False)
    kit_seconds = time.time() - started
    kit_q1 = reproduction(prepare_base("toy", cfg), kit.lora1, prompt, image1, SEEDS, SampleConfig())
    kit_q2 = reproduction(prepare_base("toy", cfg, kit.lora1), kit.lora2, prompt, image2, SEEDS, SampleConfig())
    print(f"kit: {kit_seconds:.1f} s (step 1 {kit.step1.seconds:.1f} s, step 2 {kit.step2.seconds:.1f} s); "
          f"step 1 match {kit_q1['match']:.0%} {kit_q1['psnr']:.1f} dB; step 2 match {kit_q2['match']:.0%} {kit_q2['psnr']:.1f} dB")

    s1, n1, q1, state1 = plain_stage(image1, prompt, cfg, kit_q1, args.max_steps, args.check_every)
    s2, n2, q2, _ = plain_stage(image2, prompt, cfg, kit_q2, args.max_steps, args.check_every, preset_state=state1)
    plain_seconds = s1 + s2
    reached = (q1["match"] >= kit_q1["match"] and q1["psnr"] >= kit_q1["psnr"] - 0.5
               and q2["match"] >= kit_q2["match"] and q2["psnr"] >= kit_q2["psnr"] - 0.5)
    speedup = plain_seconds / kit_seconds
    table = "\n".join([
        "| one pair, toy model | training time | steps (step 1 + 2) | step 1: match, PSNR | step 2: match, PSNR |",
        "|---|---|---|---|---|",
        f"| difflora-kit (8-bit base, batch of {cfg.batch} noise levels) | {kit_seconds:.1f} s | {cfg.steps} + {cfg.steps} | "
        f"{kit_q1['match']:.0%}, {kit_q1['psnr']:.1f} dB | {kit_q2['match']:.0%}, {kit_q2['psnr']:.1f} dB |",
        f"| plain diffusers + peft loop (fp32, 1 timestep/step) | {plain_seconds:.1f} s{'' if reached else ' (cap, quality not reached)'} | "
        f"{n1} + {n2} | {q1['match']:.0%}, {q1['psnr']:.1f} dB | {q2['match']:.0%}, {q2['psnr']:.1f} dB |",
        "",
        f"Speed-up of the kit: {speedup:.2f}x{'' if reached else ' (at least: the plain loop hit its step cap)'}; "
        f"kit pair time {kit_seconds:.1f} s against the 60 s target.",
    ])
    print(table)
    write_result("pair_speed", {"kit_seconds": kit_seconds, "kit_step1": kit.step1.seconds, "kit_step2": kit.step2.seconds,
                                "kit_quality": [kit_q1["match"], kit_q1["psnr"], kit_q2["match"], kit_q2["psnr"]],
                                "plain_seconds": plain_seconds, "plain_steps": [n1, n2], "plain_reached": reached,
                                "plain_quality": [q1["match"], q1["psnr"], q2["match"], q2["psnr"]],
                                "speedup": speedup, "pair": row, "config": vars(cfg)}, table)


if __name__ == "__main__":
    main()
