"""Why average, and how many pairs: the stability curve on realistic pairs, against clean pairs.

    python bench/stability_curve.py [--axis detail] [--n 1,2,4,8,16] [--subsets 8] [--pools out/bench]

1. The pools (trained once, reused when their folder exists), with the kit's default schedule,
   by the same command a user runs, on 2 processes of one thread each when there are 2 cores:
       difflora pairs data_samples/pairs_realistic/metadata.jsonl --axis AXIS --out POOLS/realistic_AXIS   (32 pairs)
       difflora pairs data_samples/pairs/metadata.jsonl --axis AXIS --limit 8 --out POOLS/clean_AXIS
2. One set of judged cases (toy.effects.low_end_cases: 8 held-out prompts x 4 seeds where the base
   draws the axis' low end), then the curve of the realistic pool (stability.curve) and N = 1 of the
   clean pool (its 8 LoRA 2s one by one): how much more a realistic pair's LoRA 2 leaks.
3. Why the effect is read on low-end cases only: 4 clean LoRA 2s judged also on cases chosen
   whatever the base drew at s = 0 (the first 4 seeds per prompt).

Writes bench/results/stability_<axis>.{json,md,png} with the machine and date (and the PNG to
docs/images/ for the README).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

from difflora_kit import stability  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.pair import prepare_base  # noqa: E402
from difflora_kit.plots import save_figure  # noqa: E402
from difflora_kit.toy import effects  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"realistic": (ROOT / "data_samples/pairs_realistic/metadata.jsonl", None),
         "clean": (ROOT / "data_samples/pairs/metadata.jsonl", 8)}


def train_pool(name: str, axis: str, folder: Path) -> float:
    """`difflora pairs` for one pool (skipped when it exists); returns the wall seconds it took (0: reused)."""
    if (folder / "index.json").is_file():
        return 0.0
    metadata, limit = POOLS[name]
    args = ["-m", "difflora_kit.cli", "pairs", str(metadata), "--axis", axis, "--out", str(folder)]
    args += ["--limit", str(limit)] if limit else []
    procs = min(2, os.cpu_count() or 1)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)] if procs > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    subprocess.run(launch + args, check=True, env=env)
    return time.time() - started


def conditioning(backend, lora2s, cases_low, cases_all) -> dict:
    """The clean LoRA 2s' effect on low-end cases against cases taken whatever the base drew."""
    out = {}
    for name, cases in (("low_end", cases_low), ("any", cases_all)):
        judged = [effects.judge_lora(backend, l2, cases)["per_strength"][0] for l2 in lora2s]
        per_case = np.concatenate([j["effect"] for j in judged])
        out[name] = {"effect_mean": float(per_case.mean()), "effect_std": float(per_case.std()),
                     "share_near_0_or_1": float(np.mean((np.abs(per_case) < 0.15) | (np.abs(per_case - 1) < 0.15))),
                     "base_score_at_0": float(np.mean([r.score(cases.axis) for r in cases.base_readings])),
                     "per_lora": [round(j["effect_mean"], 3) for j in judged]}
    return out


def report(result: dict, clean: dict, cond: dict, timings: dict) -> str:
    r1 = result["rows"][0]
    c1 = clean["rows"][0]
    factors = list(result["units"])
    lines = [f"Realistic pairs ({result['pool']} in the pool, axis {result['axis']}), judged on {result['cases']} cases "
             f"(held-out prompts x seeds where the base draws the low end; {result['low_end_share']:.0%} of candidate "
             "seeds did). Leak: mean |reading at s = 1 - at s = 0| over cases whose content is kept; sys.: "
             "|mean change| (the systematic part); pairs' own: |mean of the drawn changes| over the subset.", "",
             stability.table(result), "", stability.describe_goals(result), "",
             "**Realistic against clean pairs, N = 1** (8 single LoRA 2s each; leak, RGB levels or px):", "",
             "| factor | realistic | clean | ratio | systematic: realistic | clean | ratio |", "|---|---|---|---|---|---|---|"]
    for f in factors:
        a, b = r1["leakage"][f], c1["leakage"][f]
        sa, sb = r1["leakage_systematic"][f], c1["leakage_systematic"][f]
        lines.append(f"| {f} ({result['units'][f]}) | {a:.2f} | {b:.2f} | {a / max(b, 1e-9):.1f}x | {sa:.2f} | {sb:.2f} | "
                     f"{sa / max(sb, 1e-9):.1f}x |")
    lines += ["", f"Clean pairs N = 1: effect {c1['effect_mean']:+.2f}, content kept {c1['content_kept']:.0%}.", "",
              "**Why low-end cases** (4 clean LoRA 2s at s = 1):", "",
              "| cases | base score at s = 0 | effect mean | effect std | share of effects within 0.15 of 0 or 1 |",
              "|---|---|---|---|---|"]
    for name, c in cond.items():
        lines.append(f"| {name} | {c['base_score_at_0']:.2f} | {c['effect_mean']:+.2f} | {c['effect_std']:.2f} | "
                     f"{c['share_near_0_or_1']:.0%} |")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--axis", default="detail")
    parser.add_argument("--n", default="1,2,4,8,16")
    parser.add_argument("--subsets", type=int, default=8)
    parser.add_argument("--pools", type=Path, default=ROOT / "out/bench")
    parser.add_argument("--smoke", action="store_true", help="2 prompts x 1 seed, 4 sampling steps; results named *_smoke")
    args = parser.parse_args()
    prompts, seeds, candidates, sample_cfg = (2, 1, 2, SampleConfig(steps=4)) if args.smoke else (8, 4, 16, SampleConfig())
    ns = [int(x) for x in args.n.split(",")]
    timings = {}
    folders = {name: args.pools / f"{name}_{args.axis}" for name in POOLS}
    for name, folder in folders.items():
        timings[f"training the {name} pool"] = train_pool(name, args.axis, folder)
    pools = {name: stability.read_pool(folder) for name, folder in folders.items()}

    started = time.time()
    backend = prepare_base("toy", TrainConfig())
    cases = effects.low_end_cases(backend, args.axis, prompts, seeds, candidates, sample_cfg)
    cases_all = effects.low_end_cases(backend, args.axis, prompts, seeds, seeds, sample_cfg, low_end=False)
    timings["finding the cases"] = time.time() - started

    started = time.time()
    lora2s, rows, _ = pools["realistic"]
    drawn = [stability.drawn_changes(r.get("incidental", {})) for r in rows]
    result = stability.curve(backend, lora2s, cases, ns, args.subsets, drawn)
    timings["the realistic curve"] = time.time() - started
    started = time.time()
    clean_loras = pools["clean"][0]
    clean = stability.curve(backend, clean_loras, cases, [1], len(clean_loras))
    timings["clean N = 1"] = time.time() - started
    started = time.time()
    cond = conditioning(backend, clean_loras[:4], cases, cases_all)
    timings["low-end against any cases"] = time.time() - started

    name = f"stability_{args.axis}" + ("_smoke" if args.smoke else "")
    md = write_result(name, {"realistic": result, "clean": clean, "conditioning": cond, "timings": timings},
                      report(result, clean, cond, timings))
    save_figure(stability.figure(result), RESULTS / f"{name}.png")
    if not args.smoke:
        shutil.copy(RESULTS / f"{name}.png", ROOT / "docs/images" / f"{name}.png")
    print(md.read_text())


if __name__ == "__main__":
    main()
