"""The main job: differential LoRA end to end on the toy model, with the claims measured.

    difflora demo --out out/demo

trains LoRA 1 and LoRA 2 on one shipped pair, the control (a LoRA on image 2 alone) and
LoRA 2s of more pairs of the same axis for the average, then writes into the output folder
(all at once, atomically):
    lora1.safetensors  lora2.safetensors  control.safetensors  lora2_average.safetensors
    strength_grid.png  (rows: s; LoRA 2 on other prompts beside the control)
    claims.md  claims.json  losses.png  timings.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from . import average, lora, plots
from .config import SampleConfig, TrainConfig
from .evaluate import EvalConfig, claims_table, measure_claims
from .files import atomic_directory, check_writable
from .images import load_image
from .pair import train_pair, train_stage
from .backends.toy import DATA_SAMPLES
from .toy import world
from .toy.pairs import read_pairs

DEFAULT_PAIRS = DATA_SAMPLES / "pairs" / "metadata.jsonl"
REALISTIC_PAIRS = DATA_SAMPLES / "pairs_realistic" / "metadata.jsonl"  # image 2 also differs by incidental changes


def quick_configs() -> tuple[TrainConfig, EvalConfig]:
    """Short schedules for smoke runs and tests: same code path, fewer steps and seeds."""
    return TrainConfig(steps=60), EvalConfig(seeds=4, prompts=4, sweep_seeds=3, strengths=(-1.0, 0.0, 1.0, 2.0),
                                             sample=SampleConfig(steps=12))


def train_for_claims(pairs: Path | None = None, axis: str = "detail", n_average: int = 3,
                     cfg: TrainConfig | None = None, base="toy", progress: bool = True) -> dict:
    """What the claims are measured on: the first pair of `axis` (its images, LoRA 1 and LoRA 2), its
    control (a LoRA on image 2 alone) and the LoRA 2s of the next n_average - 1 pairs."""
    if axis not in world.AXES:
        raise ValueError(f"unknown style axis {axis!r}: the judge scores {', '.join(world.AXES)}")
    rows = [r for r in read_pairs(pairs or DEFAULT_PAIRS) if r.get("axis", axis) == axis]
    if len(rows) < n_average:
        raise ValueError(f"{len(rows)} pairs on axis {axis!r}, {n_average} needed for the average")
    cfg = cfg or TrainConfig()
    first = rows[0]
    image1, image2 = load_image(first["image1"]), load_image(first["image2"])
    started = time.time()
    main = train_pair(image1, image2, first["prompt"], cfg, base, progress)
    pair_seconds = time.time() - started
    control = train_stage(image2, first["prompt"], cfg, base, None, progress)
    control.lora.meta["stage"] = "control"
    extra = [train_pair(load_image(r["image1"]), load_image(r["image2"]), r["prompt"], cfg, base, progress)
             for r in rows[1:n_average]]
    return {"pair": first, "image1": image1, "image2": image2, "main": main, "control": control, "extra": extra,
            "pair_seconds": pair_seconds}


def run_claims(pairs: Path | None = None, axis: str = "detail", n_average: int = 3, cfg: TrainConfig | None = None,
               eval_cfg: EvalConfig | None = None, base="toy", progress: bool = True) -> dict:
    """Train everything the claims need and measure them; returns LoRAs, losses, timings, claims."""
    cfg = cfg or TrainConfig()
    eval_cfg = eval_cfg or EvalConfig()
    started = time.time()
    trained = train_for_claims(pairs, axis, n_average, cfg, base, progress)
    first, main, control, extra = trained["pair"], trained["main"], trained["control"], trained["extra"]
    pair_seconds = trained["pair_seconds"]
    claims = measure_claims(main, trained["image1"], trained["image2"], first["prompt"], axis, cfg, control.lora,
                            [p.lora2 for p in extra], eval_cfg, base)
    return {
        "pair": first, "main": main, "control": control, "extra": extra, "claims": claims,
        "timings": {"pair_seconds": pair_seconds, "step1_seconds": main.step1.seconds,
                    "step2_seconds": main.step2.seconds, "total_seconds": time.time() - started},
        "train_config": dataclasses.asdict(cfg), "eval_config": dataclasses.asdict(eval_cfg),
    }


def strength_grid(claims: dict) -> np.ndarray:
    """[K, 2 * P, H, W, 3]: rows = strengths; columns = LoRA 2 on P prompts (seed 0), then the control."""
    lora2 = claims["images"]["claim3"][:, 0]  # (P, K, H, W, 3)
    control = claims["images"]["claim5"][:, 0]
    return np.concatenate([lora2, control], 0).transpose(1, 0, 2, 3, 4)


def write_outputs(result: dict, out: Path) -> None:
    """Everything into `out` (a fresh folder)."""
    claims = result["claims"]
    lora.save(out / "lora1.safetensors", result["main"].lora1)
    lora.save(out / "lora2.safetensors", result["main"].lora2)
    lora.save(out / "control.safetensors", result["control"].lora)
    members = [result["main"].lora2] + [p.lora2 for p in result["extra"]]
    lora.save(out / "lora2_average.safetensors", average.exact_average(members))
    strengths = claims["claim3"]["strengths"]
    P = claims["images"]["claim3"].shape[0]
    plots.save_grid(strength_grid(claims), out / "strength_grid.png", [f"s={s:g}" for s in strengths],
                    [f"LoRA 2 #{i}" for i in range(P)] + [f"control #{i}" for i in range(P)],
                    title=f"base + s * LoRA ({claims['axis']} pair: {result['pair']['prompt']})")
    curves = {"step 1": result["main"].step1.losses, "step 2": result["main"].step2.losses,
              "control": result["control"].losses}
    plots.save_figure(plots.loss_figure(curves), out / "losses.png")
    table = claims_table(claims)
    (out / "claims.md").write_text(table + "\n")
    serial = {k: v for k, v in claims.items() if k != "images"}
    (out / "claims.json").write_text(json.dumps({"claims": serial, "timings": result["timings"],
                                                 "train_config": result["train_config"],
                                                 "eval_config": result["eval_config"], "pair": result["pair"]},
                                                indent=1, default=str) + "\n")


def run(out: Path, pairs: Path | None = None, axis: str = "detail", n_average: int = 3, cfg: TrainConfig | None = None,
        quick: bool = False, force: bool = False, base="toy") -> dict:
    out = Path(out)
    check_writable(out, force)
    quick_train, quick_eval = quick_configs()
    cfg = cfg or (quick_train if quick else TrainConfig())
    eval_cfg = quick_eval if quick else EvalConfig()
    result = run_claims(pairs, axis, n_average, cfg, eval_cfg, base)
    with atomic_directory(out) as tmp:
        write_outputs(result, tmp)
    print(claims_table(result["claims"]))
    t = result["timings"]
    print(f"\none pair (step 1 + step 2): {t['pair_seconds']:.1f} s; everything: {t['total_seconds']:.1f} s; outputs in {out}")
    return result
