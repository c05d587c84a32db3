"""Pilot: do the health report's new figures (along, leak) separate the labels of the natural-dud set?

    python bench/health_directional_pilot.py

Reads bench/results/health_natural_set.json (bench/health_natural.py: the LoRAs, their labels, their split by
pair), measures each LoRA 2 again with health.measure (the same probes as the current report, now also
along / across / drag_control / leak), and prints, per label, the spread of each figure on the calibration
set; then a two-threshold rule chosen on calibration only (leak above X -> drags; else along below Y ->
no effect; else transfers: the best agreement over the observed values' midpoints) and its agreement and
confusion matrix on validation, per set. A pilot on an incomplete set (issue 20 asks for 60 LoRAs, 10 per
label): its thresholds are not the kit's.
Writes bench/results/health_directional_pilot.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import health, lora  # noqa: E402
from difflora_kit.config import TrainConfig  # noqa: E402
from difflora_kit.images import load_image  # noqa: E402
from difflora_kit.pair import prepare_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = (health.TRANSFERS, health.NO_EFFECT, health.DRAGS)
FIGURES = ("other_change", "drag", "along", "across", "drag_control", "leak")


def rule(fig: dict, leak_above: float, along_below: float) -> str:
    if fig["leak"] > leak_above:
        return health.DRAGS
    return health.NO_EFFECT if fig["along"] < along_below else health.TRANSFERS


def midpoints(values) -> list[float]:
    v = sorted(set(values))
    return [(a + b) / 2 for a, b in zip(v, v[1:])] or v


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """(leak_above, along_below, agreement) best on `rows` (ties: the first found)."""
    best = (0.0, 0.0, -1.0)
    for x in midpoints(r["new"]["leak"] for r in rows):
        for y in midpoints(r["new"]["along"] for r in rows):
            agree = np.mean([rule(r["new"], x, y) == r["label"] for r in rows])
            if agree > best[2]:
                best = (x, y, float(agree))
    return best


def confusion(rows: list[dict], x: float, y: float) -> list[list[int]]:
    return [[sum(1 for r in rows if r["label"] == a and rule(r["new"], x, y) == b) for b in LABELS] for a in LABELS]


def main() -> None:
    started = time.time()
    data = json.loads((ROOT / "bench/results/health_natural_set.json").read_text())
    backend = prepare_base("toy", TrainConfig())
    rows = []
    for item in data["rows"]:
        l2 = lora.load(ROOT / item["path"])
        new = health.measure(backend, l2, item["prompt"], load_image(ROOT / item["trained_on"]))
        rows.append({**{k: item[k] for k in ("set", "pair", "kind", "split", "label", "effect", "content_kept")},
                     "current": item["current"]["verdict"], "new": {k: new[k] for k in FIGURES}})
    cal = [r for r in rows if r["split"] == "calibration"]

    def current(subset):  # the current report's verdict (stored by bench/health_natural.py) against the label
        return float(np.mean([r["current"] == r["label"] for r in subset]))

    val = [r for r in rows if r["split"] != "calibration"]
    x, y, cal_agree = fit(cal)
    val_agree = float(np.mean([rule(r["new"], x, y) == r["label"] for r in val]))
    spread = {lab: {f: [round(min(r["new"][f] for r in cal if r["label"] == lab), 3),
                        round(float(np.median([r["new"][f] for r in cal if r["label"] == lab])), 3),
                        round(max(r["new"][f] for r in cal if r["label"] == lab), 3)] for f in FIGURES}
              for lab in LABELS if any(r["label"] == lab for r in cal)}
    sets = sorted({r["set"] for r in rows})
    per_set = {s: float(np.mean([rule(r["new"], x, y) == r["label"] for r in val if r["set"] == s]))
               for s in sets if any(r["set"] == s for r in val)}
    result = {"rows": rows, "leak_above": x, "along_below": y, "calibration_agreement": cal_agree,
              "validation_agreement": val_agree, "validation_per_set": per_set, "calibration_spread": spread,
              "validation_confusion": confusion(val, x, y), "sizes": {"calibration": len(cal), "validation": len(val)},
              "seconds": round(time.time() - started, 1)}
    lines = [f"Pilot on {len(rows)} LoRAs of bench/results/health_natural_set.md (calibration {len(cal)}, validation "
             f"{len(val)}, split by pair). New figures measured with health.measure's default probes.", "",
             "Calibration spread per label (min / median / max):", "",
             "| label | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
    lines += [f"| {lab} | " + " | ".join(f"{a:+.3f} / {m:+.3f} / {b:+.3f}" for a, m, b in (spread[lab][f] for f in FIGURES))
              + " |" for lab in spread]
    lines += ["", f"Rule fitted on calibration: leak > {x:.4f} -> drags; else along < {y:.4f} -> no effect; else transfers. "
              f"Agreement: calibration {cal_agree:.0%}, **validation {val_agree:.0%}**; the current report on the same "
              f"split: calibration {current(cal):.0%}, validation {current(val):.0%}.", "",
              "Validation per set: " + ", ".join(f"{s} {a:.0%}" for s, a in per_set.items()), "",
              "Validation (rows: label; columns: the rule's verdict):", "",
              "| label \\ rule | " + " | ".join(LABELS) + " |", "|---|---|---|---|"]
    lines += [f"| {lab} | " + " | ".join(map(str, row)) + " |" for lab, row in zip(LABELS, confusion(val, x, y))]
    lines += ["", f"Wall time {result['seconds']} s (measuring every LoRA again, toy base)."]
    print("\n".join(lines))
    write_result("health_directional_pilot", result, "\n".join(lines))


if __name__ == "__main__":
    main()
