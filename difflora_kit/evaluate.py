"""The technique's claims, measured on the toy model by the judge.

1. base + LoRA 1 draws image 1 for every seed             (scene match rate, PSNR; vs the base)
2. base + LoRA 1 + LoRA 2 draws image 2                   (vs base + LoRA 1)
3. base + s * LoRA 2 on other prompts: the axis score grows with s, the content stays
4. the exact average of N LoRA 2s: a steadier effect across prompts and seeds
5. the control (a LoRA trained on image 2 alone) changes the content far more than LoRA 2

"Content kept" at strength s: the judge reads the same shape and colours as at s = 0 for the
same prompt and seed. "Content right": the judge reads the prompted shape and colours.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import average, sample
from .config import SampleConfig, TrainConfig
from .lora import LoraFile
from .backends.registry import TOY
from .pair import prepare_base
from .toy import judge, world


@dataclasses.dataclass
class EvalConfig:
    """What the claims are measured on."""

    seeds: int = 8
    """Seeds for reproduction (claims 1 and 2)."""
    prompts: int = 4
    """Other prompts (held-out captions) for the strength sweeps (claims 3 to 5)."""
    sweep_seeds: int = 4
    """Seeds per prompt in the sweeps."""
    strengths: tuple[float, ...] = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0)
    """Strengths s of base + s * LoRA 2 (0 must be among them)."""
    sample: SampleConfig = dataclasses.field(default_factory=TOY.sample_config)
    """The toy's sampling defaults (its registry row: UniPC, 10 steps)."""

    def __post_init__(self):
        if 0.0 not in self.strengths:
            raise ValueError("strengths must include 0 (the reference for 'content kept')")


def other_prompts(n: int, exclude: str = "") -> list[world.Scene]:
    return [world.Scene(*c) for c in world.held_out_captions() if world.Scene(*c).caption != exclude][:n]


def reproduction(backend, lora: LoraFile | None, prompt: str, target: np.ndarray, seeds: list[int],
                 cfg: SampleConfig, base_images: sample.BaseImages | None = None) -> dict:
    """How well base (+ LoRA) draws `target` from `prompt`, over seeds (the base's own images from
    `base_images` when the LoRA is None and it is given)."""
    images = sample.sweep(backend, lora, [prompt], seeds, [1.0], cfg, base_images=base_images)[0, :, 0]  # (S, H, W, 3)
    want = judge.read(target)
    readings = judge.read_batch(images)
    return {
        "match": float(np.mean([r.same_scene(want) for r in readings])),
        "psnr": float(np.mean([judge.psnr(im, target) for im in images])),
        "images": images,
    }


def strength_effect(backend, lora: LoraFile, scenes: list[world.Scene], seeds: list[int],
                    strengths: tuple[float, ...], axis: str, cfg: SampleConfig,
                    base_images: sample.BaseImages | None = None) -> dict:
    """Judge readings of base + s * LoRA over prompts x seeds x strengths, summarised per s (the
    s = 0 images from `base_images` when given: shared by every LoRA measured on that backend)."""
    images = sample.sweep(backend, lora, [s.caption for s in scenes], seeds, list(strengths), cfg,
                          base_images=base_images)  # (P, S, K, ...)
    P, S, K = images.shape[:3]
    readings = [[[judge.read(images[p, s, k]) for k in range(K)] for s in range(S)] for p in range(P)]
    zero = list(strengths).index(0.0)
    score = np.array([[[r.score(axis) for r in row] for row in seed_rows] for seed_rows in readings])  # (P, S, K)
    right = np.array([[[r.content_right(sc.shape, sc.foreground, sc.background) for r in row]
                       for row in seed_rows] for sc, seed_rows in zip(scenes, readings)])
    kept = np.array([[[(r.shape, r.foreground, r.background) == (row[zero].shape, row[zero].foreground, row[zero].background)
                       for r in row] for row in seed_rows] for seed_rows in readings])
    effect = score - score[:, :, zero : zero + 1]  # (P, S, K): change of the axis score from s = 0
    return {
        "strengths": list(strengths),
        "score_mean": score.mean((0, 1)).tolist(),
        "score_std": score.std((0, 1)).tolist(),
        "effect_mean": effect.mean((0, 1)).tolist(),
        "effect_std": effect.std((0, 1)).tolist(),
        "content_right": right.mean((0, 1)).tolist(),
        "content_kept": kept.mean((0, 1)).tolist(),
        "images": images,
    }


def spread_at(effect: dict, strength: float = 1.0) -> dict:
    """Mean, std and relative spread (std / |mean|) of the effect at one strength."""
    k = effect["strengths"].index(strength)
    mean, std = effect["effect_mean"][k], effect["effect_std"][k]
    return {"mean": mean, "std": std, "relative": std / max(abs(mean), 1e-6),
            "score_mean": effect["score_mean"][k], "score_std": effect["score_std"][k]}


def measure_claims(pair, image1: np.ndarray, image2: np.ndarray, prompt: str, axis: str, train_cfg: TrainConfig,
                   control: LoraFile, extra_lora2s: list[LoraFile], cfg: EvalConfig = EvalConfig(),
                   base="toy") -> dict:
    """All five claims for one trained pair (+ its control and more LoRA 2s of the same axis)."""
    seeds = list(range(100, 100 + cfg.seeds))
    plain = prepare_base(base, train_cfg)  # the 8-bit base that LoRA 2 is used on
    plain_images = sample.BaseImages(plain)  # s = 0 of every sweep below: sampled once
    c1_base = reproduction(plain, None, prompt, image1, seeds, cfg.sample, plain_images)
    c1_lora = reproduction(plain, pair.lora1, prompt, image1, seeds, cfg.sample)
    preset = prepare_base(base, train_cfg, pair.lora1)  # [base + LoRA 1] fused, 8-bit
    c2_preset = reproduction(preset, None, prompt, image2, seeds, cfg.sample)
    c2_both = reproduction(preset, pair.lora2, prompt, image2, seeds, cfg.sample)

    scenes = other_prompts(cfg.prompts, exclude=prompt)
    sweep_seeds = list(range(200, 200 + cfg.sweep_seeds))
    c3 = strength_effect(plain, pair.lora2, scenes, sweep_seeds, cfg.strengths, axis, cfg.sample, plain_images)
    c5 = strength_effect(plain, control, scenes, sweep_seeds, cfg.strengths, axis, cfg.sample, plain_images)

    singles = [pair.lora2, *extra_lora2s]
    at = (0.0, 1.0)
    single_effects = [c3] + [strength_effect(plain, l2, scenes, sweep_seeds, at, axis, cfg.sample, plain_images)
                             for l2 in extra_lora2s]
    averaged = average.exact_average(singles)
    c4_avg = strength_effect(plain, averaged, scenes, sweep_seeds, at, axis, cfg.sample, plain_images)
    return {
        "axis": axis,
        "claim1": {"base": _strip(c1_base), "base+lora1": _strip(c1_lora)},
        "claim2": {"base+lora1": _strip(c2_preset), "base+lora1+lora2": _strip(c2_both)},
        "claim3": _strip(c3),
        "claim4": {"singles": [spread_at(e) for e in single_effects], "average": spread_at(c4_avg), "n": len(singles)},
        "claim5": _strip(c5),
        "images": {"claim1": c1_lora["images"], "claim2": c2_both["images"], "claim3": c3["images"], "claim5": c5["images"]},
    }


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "images"}


def claims_table(claims: dict) -> str:
    """The measured claims as a Markdown table."""
    c1, c2, c3, c4, c5 = (claims[f"claim{i}"] for i in range(1, 6))
    s = c3["strengths"]
    k1, kn = s.index(1.0), s.index(min(s))
    singles_rel = float(np.mean([x["relative"] for x in c4["singles"]]))
    singles_std = float(np.mean([x["std"] for x in c4["singles"]]))
    rows = [
        ("1. base + LoRA 1 draws image 1", f"scene match {c1['base+lora1']['match']:.0%}, PSNR {c1['base+lora1']['psnr']:.1f} dB",
         f"base alone: {c1['base']['match']:.0%}, {c1['base']['psnr']:.1f} dB"),
        ("2. base + LoRA 1 + LoRA 2 draws image 2", f"scene match {c2['base+lora1+lora2']['match']:.0%}, PSNR {c2['base+lora1+lora2']['psnr']:.1f} dB",
         f"base + LoRA 1: {c2['base+lora1']['match']:.0%}, {c2['base+lora1']['psnr']:.1f} dB"),
        (f"3. s * LoRA 2 on other prompts: {claims['axis']} score by s = {', '.join(f'{x:g}' for x in s)}",
         ", ".join(f"{x:.2f}" for x in c3["score_mean"]),
         f"content kept at s=1: {c3['content_kept'][k1]:.0%}, content right: {c3['content_right'][k1]:.0%} "
         f"(s=0: {c3['content_right'][s.index(0.0)]:.0%}); s={min(s):g}: score {c3['score_mean'][kn]:.2f}, kept {c3['content_kept'][kn]:.0%}"),
        (f"4. average of {c4['n']} LoRA 2s: effect at s=1 (std across prompts x seeds)",
         f"{c4['average']['mean']:.2f} +- {c4['average']['std']:.2f} (relative {c4['average']['relative']:.2f}); "
         f"score at s=1: {c4['average']['score_mean']:.2f} +- {c4['average']['score_std']:.2f}",
         f"single pairs: +- {singles_std:.2f} (relative {singles_rel:.2f}); each: "
         + ", ".join(f"{x['mean']:.2f}+-{x['std']:.2f} (score {x['score_mean']:.2f}+-{x['score_std']:.2f})" for x in c4["singles"])),
        ("5. control (LoRA on image 2 alone): content kept by s",
         ", ".join(f"{x:.0%}" for x in c5["content_kept"]),
         "LoRA 2: " + ", ".join(f"{x:.0%}" for x in c3["content_kept"])),
    ]
    lines = ["| claim | measured | against |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
