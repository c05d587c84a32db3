"""Multistep solvers at fewer steps against DDIM 20: do the demo's claim figures hold?

    python bench/solver_eval.py [--settings ddim:20,ddim:40,dpmpp:10,unipc:10,...] [--threads 1]

Trains what `difflora demo` trains (one detail pair, its control, two more pairs for the average;
the default TrainConfig) once, then measures the demo's five claims (evaluate.measure_claims, the
default EvalConfig) with each sampler setting on the same LoRAs, seeds and prompts. Per setting:
the largest change against DDIM 20 of any judge score (claim 3's score by s, claim 4's effects and
scores) and of any rate (claims 1 and 2's scene match, claim 3's content kept and right, claim 5's
content kept), and the seconds of measuring the claims. The rule (issue 13): a setting may become
the sampling default if every score stays within 0.05 and every rate within 5 points. DDIM 40 is
the yardstick: how far the figures move when only the discretization gets finer.

The trained LoRAs are kept in .cache/solver_eval/ (a rerun measures only); --retrain trains anew.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import lora  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.demo import DEFAULT_PAIRS, train_for_claims  # noqa: E402
from difflora_kit.evaluate import EvalConfig, measure_claims  # noqa: E402
from difflora_kit.images import load_image  # noqa: E402
from difflora_kit.toy.pairs import read_pairs  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "solver_eval"
NAMES = ("lora1", "lora2", "control", "extra1", "extra2")


def trained_loras(retrain: bool) -> dict[str, lora.LoraFile]:
    """The demo's LoRAs (demo.train_for_claims: detail axis, n_average 3, default TrainConfig), cached."""
    if not retrain and all((CACHE / f"{n}.safetensors").is_file() for n in NAMES):
        return {n: lora.load(CACHE / f"{n}.safetensors") for n in NAMES}
    t = train_for_claims(progress=False)
    out = {"lora1": t["main"].lora1, "lora2": t["main"].lora2, "control": t["control"].lora,
           "extra1": t["extra"][0].lora2, "extra2": t["extra"][1].lora2}
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, the_lora in out.items():
        lora.save(CACHE / f"{name}.safetensors", the_lora)
    return out


def figures(claims: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(scores, rates) of the demo's claims, flat and named."""
    c1, c2, c3, c4, c5 = (claims[f"claim{i}"] for i in range(1, 6))
    s = c3["strengths"]
    scores = {f"claim3 score s={x:g}": v for x, v in zip(s, c3["score_mean"])}
    scores |= {"claim4 average effect": c4["average"]["mean"], "claim4 average score": c4["average"]["score_mean"]}
    scores |= {f"claim4 pair {i} effect": x["mean"] for i, x in enumerate(c4["singles"])}
    rates = {"claim1 base match": c1["base"]["match"], "claim1 base+lora1 match": c1["base+lora1"]["match"],
             "claim2 base+lora1 match": c2["base+lora1"]["match"],
             "claim2 base+lora1+lora2 match": c2["base+lora1+lora2"]["match"]}
    rates |= {f"claim3 kept s={x:g}": v for x, v in zip(s, c3["content_kept"])}
    rates |= {f"claim3 right s={x:g}": v for x, v in zip(s, c3["content_right"])}
    rates |= {f"claim5 kept s={x:g}": v for x, v in zip(s, c5["content_kept"])}
    return scores, rates


def largest(a: dict[str, float], b: dict[str, float]) -> tuple[str, float]:
    name = max(a, key=lambda k: abs(a[k] - b[k]))
    return name, abs(a[name] - b[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="ddim:20,ddim:40,dpmpp:10,unipc:10,dpmpp:8,unipc:8,ddim:10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings.split(",")]
    if settings[0] != ("ddim", 20):
        settings.insert(0, ("ddim", 20))  # the reference comes first

    started = time.time()
    loras = trained_loras(args.retrain)
    train_seconds = time.time() - started
    pair = SimpleNamespace(lora1=loras["lora1"], lora2=loras["lora2"])  # what measure_claims reads of a pair
    row = read_pairs(DEFAULT_PAIRS)[0]
    image1, image2 = load_image(row["image1"]), load_image(row["image2"])
    results = []
    for solver, steps in settings:
        eval_cfg = EvalConfig(sample=SampleConfig(steps=steps, solver=solver))
        t0 = time.time()
        claims = measure_claims(pair, image1, image2, row["prompt"], "detail", TrainConfig(), loras["control"],
                                [loras["extra1"], loras["extra2"]], eval_cfg)
        seconds = time.time() - t0
        scores, rates = figures(claims)
        results.append({"solver": solver, "steps": steps, "seconds": seconds, "scores": scores, "rates": rates})
        print(f"{solver} {steps}: {seconds:.1f} s", flush=True)

    ref = results[0]
    lines = ["| sampler | steps | claims measured in | vs DDIM 20 | largest score change | largest rate change | within the rule |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        (sn, sd), (rn, rd) = largest(r["scores"], ref["scores"]), largest(r["rates"], ref["rates"])
        r["largest_score"], r["largest_rate"] = [sn, sd], [rn, rd]
        r["within"] = sd <= 0.05 and rd <= 0.05 + 1e-9
        lines.append(f"| {r['solver']} | {r['steps']} | {r['seconds']:.1f} s | {ref['seconds'] / r['seconds']:.2f}x | "
                     f"{sd:.3f} ({sn}) | {100 * rd:.1f} pts ({rn}) | {'yes' if r['within'] else 'no'} |")
    lines += ["", f"Same LoRAs for every row (the demo's: default TrainConfig; trained in {train_seconds:.0f} s, or read from "
              f"the cache), default EvalConfig; torch threads {args.threads}. Rates are over 8 seeds (claims 1-2) or "
              "4 prompts x 4 seeds (claims 3, 5): one sample is 12.5 or 6.25 points.", "",
              "| figure | " + " | ".join(f"{r['solver']} {r['steps']}" for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for name in ref["scores"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['scores'][name]:.3f}" for r in results) + " |")
    for name in ref["rates"]:
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['rates'][name]:.0f}%" for r in results) + " |")
    table = "\n".join(lines)
    print(table)
    print("wrote", write_result("solver_eval", {"threads": args.threads, "train_seconds": train_seconds,
                                                 "results": results}, table))


if __name__ == "__main__":
    main()
