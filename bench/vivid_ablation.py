"""Why the vivid LoRA 2s disagree: each one pushes its own pair's colours, not "more vivid".

    python bench/vivid_ablation.py [--pool out/bench/clean_vivid]

README claim 4 measured three vivid LoRA 2s with effects +0.48, -0.03 and -0.39 at s = 1. The
hypothesis tested here: dull -> vivid is, in RGB, a move along the chroma vector of the pair's own
colours (c - luma(c), scaled by 1 - DULL_KEEP), and a LoRA 2 trained on one pair learns that move,
a colour shift, rather than the non-linear "away from grey" that vivid means. On a prompt whose
foreground chroma points the same way the shift saturates it (effect > 0); pointing elsewhere it
desaturates or changes the hue (effect <= 0). So the effect on a held-out case should follow the
cosine between the training pair's foreground chroma and the case's; and an average over pairs of
many colours keeps less of any one shift.

The ablation (pairs, the kit's default schedule; the pool trained by `difflora pairs
data_samples/pairs/metadata.jsonl --axis vivid --limit 8 --out POOL`): every LoRA 2 of the pool is
judged on the same low-end (dull at s = 0) held-out cases; per (LoRA 2, case) the effect against
that cosine; per LoRA 2 its mean effect against its mean cosine over the cases; then the exact
average of all of them. Writes bench/results/vivid_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import average, stability  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.pair import prepare_base  # noqa: E402
from difflora_kit.toy import effects, judge, world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def chroma(name: str) -> np.ndarray:
    """The foreground colour's chroma vector c - luma(c): (3,)."""
    c = np.array(world.FOREGROUNDS[name], dtype=np.float32)
    return c - c @ judge.LUMA


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=Path, default=ROOT / "out/bench/clean_vivid")
    args = parser.parse_args()
    lora2s, rows, _ = stability.read_pool(args.pool)
    backend = prepare_base("toy", TrainConfig())
    cases = effects.low_end_cases(backend, "vivid", 8, 4, 16, SampleConfig())
    per_lora, xs, ys = [], [], []
    for l2, row in zip(lora2s, rows):
        scene = row["prompt"].split()  # "a(n) <fg> <shape> on a <bg> background"
        fg, bg = scene[1], scene[-2]
        judged = effects.judge_lora(backend, l2, cases)["per_strength"][0]
        cos = [cosine(chroma(fg), chroma(sc.foreground)) for sc in cases.scenes]
        xs += cos
        ys += judged["effect"]
        per_lora.append({"prompt": row["prompt"], "foreground": fg, "background": bg,
                         "effect": judged["effect_mean"], "mean_cosine": float(np.mean(cos)),
                         "same_way": float(np.mean([e for e, c in zip(judged["effect"], cos) if c > 0.5] or [np.nan])),
                         "other_way": float(np.mean([e for e, c in zip(judged["effect"], cos) if c < 0] or [np.nan])),
                         "content_kept": judged["content_kept"]})
    xs, ys = np.array(xs), np.array(ys)
    avg = effects.judge_lora(backend, average.exact_average(lora2s), cases)["per_strength"][0]
    r_case = float(np.corrcoef(xs, ys)[0, 1])
    r_lora = float(np.corrcoef([p["mean_cosine"] for p in per_lora], [p["effect"] for p in per_lora])[0, 1])
    same, other = ys[xs > 0.5], ys[xs < 0]
    lines = ["| pair (training prompt) | effect at s = 1 | on cases of a similar chroma (cos > 0.5) | "
             "of another (cos < 0) | mean cos | content kept |", "|---|---|---|---|---|---|"]
    for p in per_lora:
        lines.append(f"| {p['prompt']} | {p['effect']:+.2f} | {p['same_way']:+.2f} | {p['other_way']:+.2f} | "
                     f"{p['mean_cosine']:+.2f} | {p['content_kept']:.0%} |")
    lines += ["", f"Per case ({len(ys)} = {len(lora2s)} LoRA 2s x {len(cases.seeds)} cases): correlation of the effect "
              f"with the cosine between the pair's and the case's foreground chroma r = {r_case:+.2f}; effect "
              f"{same.mean():+.2f} on cases of a similar chroma ({len(same)}), {other.mean():+.2f} on the others "
              f"({len(other)}). Per LoRA 2: r = {r_lora:+.2f} between its mean effect and its mean cosine.",
              f"The exact average of the {len(lora2s)}: effect {avg['effect_mean']:+.2f} (spread {avg['effect_std']:.2f}), "
              f"content kept {avg['content_kept']:.0%}; the singles' mean {np.mean([p['effect'] for p in per_lora]):+.2f}."]
    write_result("vivid_ablation", {"per_lora": per_lora, "r_case": r_case, "r_lora": r_lora,
                                    "same_way": float(same.mean()), "other_way": float(other.mean()),
                                    "average": {k: avg[k] for k in ("effect_mean", "effect_std", "content_kept")},
                                    "cases": len(cases.seeds)}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
