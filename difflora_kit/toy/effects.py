"""What a LoRA does to prompts it never saw, read by the judge: its axis effect, its leakage, the content kept.

Measured where the LoRA can act, not where the base already did it: at s = 0 the toy base draws the
high end of an axis for about half of the seeds (detail score 0.59 on average), so there a LoRA
that pushes toward the high end has nothing to do and the per-sample effect is 0 or 1 at random.
`low_end_cases` therefore samples the base on many seeds per held-out prompt once and keeps, for
each prompt, the seeds whose s = 0 image is at the axis' low end (score < 0.5). Every LoRA is then
judged on those same (prompt, seed) cases:

    effect       axis score at s - at s = 0, per case                     (axis units: 0 low end .. 1 high end)
    leakage f    |reading_f at s - reading_f at s = 0|, per case, for each incidental factor f
                 of world.Incidental (judge.INCIDENTAL_FACTORS: position, size, shades, grain),
                 over the cases whose content is kept (else the readings are of another shape)
    content kept the judge reads the same shape and colours as at s = 0
    scene kept   ... and the same size and position template too
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import sample
from ..config import SampleConfig
from ..evaluate import other_prompts
from ..lora import LoraFile
from . import judge, world

LOW_END = 0.5  # an s = 0 axis score below this is the axis' low end


@dataclasses.dataclass
class Cases:
    """The (prompt, seed) cases a LoRA is judged on, with the judge's readings of the base at s = 0."""

    axis: str
    scenes: list[world.Scene]  # one per case (its prompt's scene)
    seeds: list[int]
    base_readings: list[judge.Reading]
    low_end_share: float  # share of the candidate seeds whose s = 0 sample was at the low end
    sample: SampleConfig

    @property
    def cases(self) -> list[tuple[str, int]]:
        return [(sc.caption, seed) for sc, seed in zip(self.scenes, self.seeds)]


def low_end_cases(backend, axis: str, prompts: int = 8, seeds: int = 4, candidates: int = 16,
                  cfg: SampleConfig | None = None, first_seed: int = 1000, low_end: bool = True) -> Cases:
    """Sample the base for `candidates` seeds per held-out prompt (one batched pass) and keep, per prompt,
    the first `seeds` seeds at the axis' low end (`low_end=False`: the first `seeds`, whatever they draw)."""
    if axis not in world.AXES:
        raise ValueError(f"unknown style axis {axis!r}; the judge scores {', '.join(world.AXES)}")
    cfg = cfg or backend.family.sample_config()  # None: the family's defaults, as sample.sweep's
    scenes = other_prompts(prompts)  # the held-out captions
    candidate_seeds = list(range(first_seed, first_seed + candidates))
    images = sample.sweep(backend, None, [s.caption for s in scenes], candidate_seeds, [0.0], cfg)[:, :, 0]  # (P, C, ...)
    keep_scenes, keep_seeds, keep_readings, low = [], [], [], 0
    for p, scene in enumerate(scenes):
        readings = [judge.read(im) for im in images[p]]
        at_low = [r.score(axis) < LOW_END for r in readings]
        low += sum(at_low)
        chosen = [c for c in range(candidates) if at_low[c] or not low_end][:seeds]
        for c in chosen:
            keep_scenes.append(scene)
            keep_seeds.append(candidate_seeds[c])
            keep_readings.append(readings[c])
    if not keep_seeds:
        raise ValueError(f"the base drew the low end of {axis!r} for none of {candidates} seeds x {prompts} prompts: "
                         "raise `candidates`")
    return Cases(axis, keep_scenes, keep_seeds, keep_readings, low / (len(scenes) * candidates), cfg)


def _kept(a: judge.Reading, b: judge.Reading) -> bool:
    return (a.shape, a.foreground, a.background) == (b.shape, b.foreground, b.background)


def judge_lora(backend, lora: LoraFile | None, cases: Cases, strengths: tuple[float, ...] = (1.0,)) -> dict:
    """The judge's figures of base + s * LoRA on `cases`, per strength s (s = 0 is the cases' own base images).

    Returns per strength: effect (per case and mean), leakage (per factor: mean |change|, mean signed change),
    content kept, scene kept; and the images [N, K, H, W, 3]."""
    images = sample.sweep_cases(backend, lora, cases.cases, list(strengths), cases.sample)  # (N, K, H, W, 3)
    out = {"strengths": list(strengths), "cases": len(cases.seeds), "per_strength": [], "images": images}
    for k, s in enumerate(strengths):
        readings = [judge.read(im) for im in images[:, k]]
        out["per_strength"].append(compare(cases.base_readings, readings, cases.axis) | {"strength": s})
    return out


def compare(before: list[judge.Reading], after: list[judge.Reading], axis: str) -> dict:
    """Readings at s against readings at s = 0, case by case."""
    effect = np.array([b.score(axis) - a.score(axis) for a, b in zip(before, after)])  # (N,)
    kept = np.array([_kept(a, b) for a, b in zip(before, after)])
    scene_kept = np.array([a.scene == b.scene for a, b in zip(before, after)])
    leakage, signed = {}, {}
    for factor, (field, _) in judge.INCIDENTAL_FACTORS.items():
        change = np.array([getattr(b, field) - getattr(a, field) for a, b, k in zip(before, after, kept) if k])
        leakage[factor] = float(np.abs(change).mean()) if change.size else float("nan")
        signed[factor] = float(change.mean()) if change.size else float("nan")
    return {"effect": effect.tolist(), "effect_mean": float(effect.mean()), "effect_std": float(effect.std()),
            "content_kept": float(kept.mean()), "scene_kept": float(scene_kept.mean()),
            "leakage": leakage, "leakage_signed": signed}


def factor_units() -> dict[str, str]:
    return {f: unit for f, (_, unit) in judge.INCIDENTAL_FACTORS.items()}
