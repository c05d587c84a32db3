"""The health report of a LoRA 2: does it change other prompts, and does it drag them to image 2?

Measured right after step 2, with LoRA 2 on the *plain* base (LoRA 1 dropped), as it will be used.
No judge, no sampling loop: a handful of denoiser calls on any base (toy, SD 1.x, SDXL, FLUX).

    prompt p, seed -> eps -> x_T -> base(x_T, T-1, p) -> x0_hat      (the base's own one-step guess)
    x0_hat + fresh noise at high levels t (0.8 T, 0.95 T) -> x_t       (probes the base itself made)
    one batched call, LoRA at strength 0 | 1 -> x0_off, x0_on          (the same rows, LoRA off and on)

    change(p) = RMS(x0_on - x0_off) / scale          scale = RMS(z2 - mean z2), z2 = image 2's latent
    drag(p)   = (d(x0_off, z2) - d(x0_on, z2)) / d(x0_off, z2)   share of the way to image 2 closed

    own_change: p = the LoRA's own prompt        other_change: mean over other prompts
    transfer = other_change / own_change         drag: mean over other prompts

    along(p)  = <D(p), D(own)> / |D(own)|^2      D: the change of content-free statistics (descriptor:
    across(p) = |D(p) - along D(own)| / |D(own)|     per channel mean, spread, fine detail), LoRA on - off
    leak      = drag - drag toward image 2 rolled by half its size (same statistics, content moved away)

along and leak are measured (and recorded) but do not decide the verdict yet: issue 20 calibrates them.

Why drag: a LoRA trained on image 2 alone (the control) learns image 2's *content* and pulls every
prompt toward it; a healthy LoRA 2 learned only the difference between image 1 and image 2, so it
changes other prompts without closing their distance to image 2. The control is the model of a
leaky LoRA 2 (it scores a high drag); a LoRA 2 that changes nothing (other_change ~ 0) is a dud too.

    label = DRAGS      if drag > drags_above
            NO_EFFECT  elif other_change < no_effect_below
            TRANSFERS  otherwise                              (Thresholds: set on the toy, see there)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import diffusion, sample
from .files import atomic_file
from .lora import LoraFile
from .plan import OutOfMemoryAdvice, error_line

TRANSFERS = "transfers"
NO_EFFECT = "no effect on other prompts"
DRAGS = "drags image 2's content"

ADVICE = {
    TRANSFERS: "average it with more pairs of the same axis for a steadier effect",
    NO_EFFECT: "train longer or with a higher --lr; check that image 1 and image 2 differ in the wanted way; "
               "or leave it out of an average (difflora pairs --duds drop)",
    DRAGS: "image 1 and image 2 differ in more than the wanted change, or LoRA 1 did not overfit image 1 "
           "(train step 1 longer); average more pairs; use a lower strength",
}

GENERIC_PROMPTS = (
    "a photo of a dog on a beach",
    "a portrait of an old man",
    "a bowl of fruit on a table",
    "a city street at night",
    "a red car parked in front of a house",
    "a mountain lake at sunrise",
    "a cat sleeping on a sofa",
    "a bicycle leaning against a brick wall",
)
"""The other prompts on a real base (SD 1.x, SDXL, FLUX: natural-image models take the same list)."""


@dataclasses.dataclass
class Thresholds:
    """Where the verdict's labels change. Set on a calibration set of 20 toy LoRAs labelled by the judge
    and checked on 20 others (bench/health_validation.py, bench/results/health_validation.md: 75%
    agreement on validation, the goal was 90%); not calibrated on SD, SDXL or FLUX."""

    no_effect_below: float = 0.136
    """other_change under this: "no effect on other prompts" (a change of 13.6% of image 2's latent spread)."""
    drags_above: float = 0.021
    """drag over this: "drags image 2's content" (LoRA 2 closes more than 2.1% of other prompts' distance
    to image 2; clean toy LoRA 2s measured -0.04 to +0.04, controls +0.12 to +0.27). Checked first: a
    dragging LoRA changes other prompts too."""


@dataclasses.dataclass
class HealthConfig:
    """What the report measures on."""

    prompts: int = 8
    """Other prompts (the toy: its held-out captions; other families: GENERIC_PROMPTS)."""
    seeds: int = 2
    """Noise seeds per prompt."""
    levels: tuple[float, ...] = (0.8, 0.95)
    """Noise levels of the probes, as fractions of the training schedule's T: high noise, where a LoRA
    that learned image 2's content moves the composition (chosen over (0.5, 0.8) on the calibration
    set: 85% against 75% agreement)."""
    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
    max_batch: int | None = None
    """Most rows per denoiser call (LoRA off and on halves together). None: sized to the device
    (report_rows: sample.MAX_BATCH on the CPU, what fits in the free memory on a GPU). The batching does
    not change the figures."""

    def __post_init__(self):
        if self.prompts < 1 or self.seeds < 1 or not self.levels or (self.max_batch is not None and self.max_batch < 2):
            raise ValueError("a health report needs at least one other prompt, one seed, one level and max_batch >= 2")
        if not all(0.0 < float(f) < 1.0 for f in self.levels):
            raise ValueError(f"levels are fractions of the schedule in (0, 1), got {self.levels!r}")
        self.levels = tuple(float(f) for f in self.levels)


def other_prompts(backend, own: str, n: int) -> list[str]:
    """Up to n prompts other than `own`: the toy's held-out captions, or GENERIC_PROMPTS (`backend`: a
    backend or a backends.Base: only its family is read)."""
    if backend.family.toy_world:
        from .evaluate import other_prompts as held_out  # the toy's held-out captions, as the claims use them

        return [scene.caption for scene in held_out(n, exclude=own)]
    return [c for c in GENERIC_PROMPTS if c != own][:n]


def report_encodes(base, prompt: str, image2: np.ndarray, cfg: HealthConfig = HealthConfig()):
    """What the report on the plain base encodes (pair.prepare_base's `encode`, so the encoders leave the
    GPU before the denoiser arrives): image 2, its prompt and the other prompts (they depend on the
    family alone: `base` is a backends.Base or a backend)."""
    from . import backends
    from .pair import Encodes

    base = backends.resolve_base(base) if isinstance(base, (str, Path)) else base
    return Encodes((image2,), (prompt, *other_prompts(base, prompt, cfg.prompts)))


def report_rows(backend, cfg: HealthConfig = HealthConfig()) -> int:
    """Rows per denoiser call of the report on `backend`: cfg.max_batch, or (None) sample.batch_size's
    for rows without decoding: sample.MAX_BATCH on the CPU, on a GPU as many as the memory free now takes
    (at least 2: one probe, LoRA off and on)."""
    return cfg.max_batch or sample.batch_size(backend, rows_per_item=1, decode=False, least=2)


class ReportOutOfMemory(OutOfMemoryAdvice):
    """The GPU ran out of memory during a health report; the message says what to lower."""


def out_of_memory_message(rows: int, error: BaseException) -> str:
    """What to do after the report's denoiser calls of up to `rows` rows ran out of GPU memory."""
    first = error_line(error)
    return (f"the GPU ran out of memory in the health report's denoiser calls of up to {rows} rows: {first}. Run it "
            f"with fewer rows per call (health.HealthConfig(max_batch={max(2, rows // 2)}), 2 at the least), on a GPU "
            "with nothing else on it; or leave it out (--no-report).")


def _chunks(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _probes(backend, prompts: list[str], cfg: HealthConfig, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, states) of every probe: rows ordered (level, prompt, seed), L * P * S of them (`rows` per call)."""
    scheduler, device = backend.scheduler, backend.device
    T, P, S, L = scheduler.config.num_train_timesteps, len(prompts), cfg.seeds, len(cfg.levels)
    noise = torch.stack([torch.randn((1 + L, *backend.latent_shape), generator=torch.Generator().manual_seed(s))
                         for s in range(S)]).to(device)  # (S, 1 + L, C, H, W), drawn on the CPU: same on any device
    states = backend.encode_prompts([p for p in prompts for _ in range(S)])  # (P * S, T_text, D)
    eps = noise[:, 0].repeat(P, 1, 1, 1)  # row p * S + s: seed s
    t_top = torch.full((P * S,), T - 1, dtype=torch.long, device=device)
    x_top = diffusion.noisy_and_target(scheduler, torch.zeros_like(eps), eps, t_top)[0]
    x0_hat = torch.cat([diffusion.predicted_x0(scheduler, x_top[c], backend.denoiser(x_top[c], t_top[c], states[c]), t_top[c])
                        for c in _chunks(P * S, rows)])  # the base's one-step clean guess, cond only
    xs, ts = [], []
    for k, frac in enumerate(cfg.levels):
        t = torch.full((P * S,), min(T - 1, int(round(frac * T))), dtype=torch.long, device=device)
        xs.append(diffusion.noisy_and_target(scheduler, x0_hat, noise[:, 1 + k].repeat(P, 1, 1, 1), t)[0])
        ts.append(t)
    return torch.cat(xs), torch.cat(ts), states.repeat(L, 1, 1)


def _off_on(backend, lora2: LoraFile, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
            max_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_off, x0_on): the clean estimates with LoRA 2 at strength 0 and 1, each probe's two rows in one call."""
    offs, ons = [], []
    with sample.lora_loaded(backend.unet, lora2) as adapter:
        for c in _chunks(x.shape[0], max_batch // 2):
            k = c.stop - c.start
            xx, tt = torch.cat([x[c], x[c]]), torch.cat([t[c], t[c]])
            strengths = torch.cat([torch.zeros(k), torch.ones(k)])  # (2k,): rows 0..k-1 off, k..2k-1 on
            with sample.per_sample_strength(backend.unet, adapter, strengths):  # on the device once per call
                out = backend.denoiser(xx, tt, torch.cat([states[c], states[c]]))
            off, on = diffusion.predicted_x0(backend.scheduler, xx, out, tt).float().chunk(2)
            offs.append(off)
            ons.append(on)
    return torch.cat(offs), torch.cat(ons)


def descriptor(x: torch.Tensor) -> torch.Tensor:
    """(rows, 3C) content-free statistics of x (rows, C, H, W): per channel its mean, its spread and its
    fine detail (RMS of x minus its 3x3 box blur). Where things are drops out: another prompt's change can
    be compared with the LoRA's change on its own prompt (a brighter, warmer, sharper image moves them alike)."""
    x = x.float()
    mean = x.mean((2, 3))  # (rows, C)
    spread = x.std((2, 3))  # (rows, C)
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    detail = (x - blur).pow(2).mean((2, 3)).sqrt()  # (rows, C)
    return torch.cat([mean, spread, detail], dim=1)


def along_own(change: torch.Tensor, own: torch.Tensor) -> tuple[float, float]:
    """(along, across) of a prompt's descriptor change `change` (3C,) against the LoRA's change on its own
    prompt `own` (3C,): along = <change, own> / |own|^2 (1: the same change as on its own prompt, 0: none
    of it), across = |change - along * own| / |own| (what it changes besides, in the same units)."""
    norm2 = float(own.pow(2).sum())
    if norm2 == 0.0:
        return 0.0, 0.0
    along = float((change * own).sum()) / norm2
    return along, float((change - along * own).norm()) / math.sqrt(norm2)


def shifted(z: torch.Tensor) -> torch.Tensor:
    """z (1, C, H, W) rolled by half its size both ways: the same colours and detail, the content moved away
    (the cheap control target of `drag_control`)."""
    return torch.roll(z, shifts=(z.shape[-2] // 2, z.shape[-1] // 2), dims=(-2, -1))


def _rms(ms: torch.Tensor) -> float:
    """RMS from per-row mean squares (pooled over the rows)."""
    return math.sqrt(float(ms.mean()))


@torch.no_grad()
def measure(backend, lora2: LoraFile, prompt: str, image2: np.ndarray, cfg: HealthConfig = HealthConfig()) -> dict:
    """The figures (no verdict) of LoRA 2 on `backend`, the plain base (pair.prepare_base(base, cfg)).
    `prompt`: LoRA 2's own prompt; `image2` [H, W, 3] in [0, 1]: the image it was trained on."""
    started = time.time()
    others = other_prompts(backend, prompt, cfg.prompts)
    prompts = [prompt] + others
    P, S = len(prompts), cfg.seeds
    per_call = report_rows(backend, cfg)
    try:
        x, t, states = _probes(backend, prompts, cfg, per_call)
        off, on = _off_on(backend, lora2, x, t, states, per_call)
    except torch.OutOfMemoryError as e:
        raise ReportOutOfMemory(out_of_memory_message(per_call, e)) from e
    z2 = backend.encode_images(np.asarray(image2)[None]).float()  # (1, C, H, W)
    scale = max(math.sqrt(float((z2 - z2.mean()).pow(2).mean())), 1e-6)
    change_ms = (on - off).pow(2).flatten(1).mean(1)  # (rows,) mean squares
    off_ms, on_ms = ((off - z2).pow(2).flatten(1).mean(1), (on - z2).pow(2).flatten(1).mean(1))
    prompt_of = (torch.arange(x.shape[0], device=change_ms.device) % (P * S)) // S  # rows: (level, prompt, seed)
    changes, drags = [], []
    for p in range(P):
        rows = prompt_of == p
        changes.append(_rms(change_ms[rows]) / scale)
        d_off, d_on = _rms(off_ms[rows]), _rms(on_ms[rows])
        drags.append((d_off - d_on) / d_off if d_off > 0 else 0.0)
    own_change, other_change, drag = changes[0], float(np.mean(changes[1:])), float(np.mean(drags[1:]))
    # direction: each prompt's change of content-free statistics, against the change on LoRA 2's own prompt
    moved = descriptor(on) - descriptor(off)  # (rows, 3C)
    per_prompt = [moved[prompt_of == p].mean(0) for p in range(P)]  # (3C,) each
    alongs = [along_own(per_prompt[p], per_prompt[0]) for p in range(1, P)]
    # leak against a control made from the same probes: the distance closed to image 2, minus the distance
    # closed to image 2 moved away (same colours and detail): what is left is image 2's content, placed
    z2s = shifted(z2)
    ctrl_off, ctrl_on = (off - z2s).pow(2).flatten(1).mean(1), (on - z2s).pow(2).flatten(1).mean(1)
    controls = []
    for p in range(1, P):
        rows = prompt_of == p
        d_off, d_on = _rms(ctrl_off[rows]), _rms(ctrl_on[rows])
        controls.append((d_off - d_on) / d_off if d_off > 0 else 0.0)
    T = backend.scheduler.config.num_train_timesteps
    return {
        "own_change": own_change, "other_change": other_change,
        "transfer": other_change / own_change if own_change > 0 else 0.0,
        "drag": drag, "own_drag": drags[0],
        "along": float(np.mean([a for a, _ in alongs])), "across": float(np.mean([c for _, c in alongs])),
        "drag_control": float(np.mean(controls)), "leak": drag - float(np.mean(controls)),
        "other_changes": changes[1:], "other_drags": drags[1:],
        "prompt": prompt, "other_prompts": others, "seeds": S, "levels": list(cfg.levels),
        "timesteps": [min(T - 1, int(round(f * T))) for f in cfg.levels], "scale": scale,
        "probes": int(x.shape[0]), "rows_per_call": per_call, "seconds": time.time() - started,
    }


def verdict(figures: dict, thresholds: Thresholds = Thresholds()) -> tuple[str, str]:
    """(label, one line with its numbers): TRANSFERS, NO_EFFECT or DRAGS. `figures` needs "drag" and
    "other_change" (measure's dict, or any dict with them); the line shows the other figures it has."""
    th = thresholds
    if figures["drag"] > th.drags_above:
        label, why = DRAGS, f"drag {figures['drag']:.3f} > {th.drags_above:g}"
    elif figures["other_change"] < th.no_effect_below:
        label, why = NO_EFFECT, f"other_change {figures['other_change']:.3f} < {th.no_effect_below:g}"
    else:
        label, why = TRANSFERS, (f"other_change {figures['other_change']:.3f} >= {th.no_effect_below:g}, "
                                 f"drag {figures['drag']:.3f} <= {th.drags_above:g}")
    shown = [f"{k} {figures[k]:{fmt}}" for k, fmt in (("own_change", ".3f"), ("other_change", ".3f"), ("transfer", ".2f"),
                                                      ("drag", "+.3f"), ("own_drag", "+.3f")) if k in figures]
    return label, f"{label} ({why}; {', '.join(shown)})"


def report(backend, lora2: LoraFile, prompt: str, image2: np.ndarray, cfg: HealthConfig = HealthConfig()) -> dict:
    """measure + verdict: the figures, "verdict" (the label), "line", "advice", the thresholds used."""
    started = time.time()
    figures = measure(backend, lora2, prompt, image2, cfg)
    label, line = verdict(figures, cfg.thresholds)
    return {**figures, "verdict": label, "line": line, "advice": ADVICE[label],
            "thresholds": dataclasses.asdict(cfg.thresholds), "seconds": time.time() - started}


def stamp(lora2: LoraFile, report: dict) -> None:
    """Put the verdict and its main figures into LoRA 2's metadata (lora.save writes them as strings)."""
    lora2.meta["health_verdict"] = report["verdict"]
    for key in ("other_change", "drag", "transfer"):
        lora2.meta[f"health_{key}"] = f"{report[key]:.4g}"


def save(path: Path, report: dict) -> None:
    """Write a report as JSON, atomically (temp name, then rename)."""
    with atomic_file(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
