"""Pretrain the toy base model on a mix of all styles (style never captioned).

    python -m difflora_kit.toy.pretrain --out data_samples/toy_base --steps 3000

Scenes are drawn fresh every step from the training captions (the held-out captions are never
seen), each in a random style; 10% of captions are dropped for classifier-free guidance. The
weights kept are an EMA of the trained ones. Every `eval_every` steps the EMA model is scored
by the judge on the held-out captions and the folder is written (atomically), so a stopped run
leaves its last good checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import diffusion
from ..files import atomic_directory
from . import judge, model, world
from ..backends.toy import ToyBackend

CAPTION_DROPOUT = 0.1


def scene_batch(rng: random.Random, batch: int) -> tuple[torch.Tensor, list[str]]:
    """(images (B, 3, H, W) in [-1, 1], captions) drawn from the training captions, random styles."""
    captions, images = [], []
    for _ in range(batch):
        scene = world.random_scene(rng, world.training_captions())
        style = world.Style(rng.randint(0, 1), rng.randint(0, 1))
        images.append(world.render(scene, style))
        captions.append("" if rng.random() < CAPTION_DROPOUT else scene.caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    return x * 2 - 1, captions


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p, 1 - decay)


def held_out_quality(backend: ToyBackend, per_caption: int = 4, seed: int = 0) -> dict:
    """Share of held-out samples whose shape and both colours the judge reads as prompted."""
    scenes = [world.Scene(*c) for c in world.held_out_captions() for _ in range(per_caption)]
    images = backend.generate([s.caption for s in scenes], seeds=list(range(seed, seed + len(scenes))))
    readings = judge.read_batch(images)
    right = [r.content_right(s.shape, s.foreground, s.background) for r, s in zip(readings, scenes)]
    return {
        "held_out_samples": len(scenes),
        "content_right": float(np.mean(right)),
        "shape_right": float(np.mean([r.shape == s.shape for r, s in zip(readings, scenes)])),
        "foreground_right": float(np.mean([r.foreground == s.foreground for r, s in zip(readings, scenes)])),
        "background_right": float(np.mean([r.background == s.background for r, s in zip(readings, scenes)])),
    }


def pretrain(out: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0, eval_every: int = 500,
             init: Path | None = None) -> dict:
    """Pretrain from scratch, or continue from the weights of a saved toy model (`init`)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init is not None:
        start = ToyBackend.load(init)
        tokenizer, text_encoder, unet = start.tokenizer, start.text_encoder.requires_grad_(True), start.unet
        history_before = start.info.get("pretraining", {}).get("steps", 0)
    else:
        tokenizer = model.build_tokenizer()
        text_encoder = model.build_text_encoder(len(tokenizer))
        unet = model.build_unet()
        history_before = 0
    unet.train()
    text_encoder.train()
    scheduler = model.training_scheduler()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    history, started = [], time.time()
    for step in tqdm(range(steps), desc="pretrain"):
        x0, captions = scene_batch(rng, batch)
        ids = tokenizer(captions, padding="max_length", max_length=model.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        states = text_encoder(ids).last_hidden_state  # (B, T, D)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        x_t, target = diffusion.noisy_and_target(scheduler, x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(x_t, t, states).sample, target)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        history.append(float(loss))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            backend = ToyBackend(ema_unet, ema_text, tokenizer, scheduler)
            quality = held_out_quality(backend)
            record = {"step": step + 1, "minutes": (time.time() - started) / 60,
                      "loss_recent": float(np.mean(history[-100:])), **quality}
            print(json.dumps(record), flush=True)
            backend.save(out, extra={"pretraining": {"steps": history_before + step + 1, "batch": batch, "lr": lr, "seed": seed,
                                                     "minutes": record["minutes"], "held_out_quality": quality}})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved toy model")
    args = parser.parse_args()
    pretrain(args.out, args.steps, args.batch, args.lr, args.seed, args.eval_every, args.init)


if __name__ == "__main__":
    main()
