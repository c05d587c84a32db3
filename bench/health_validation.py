"""Does the health report (no judge) say what the judge says? Thresholds set on one set, agreement on another.

    python bench/health_validation.py [--pools out/bench]

The LoRAs (the kit's default schedule, toy model):
  - LoRA 2s of clean detail, realistic detail and clean vivid pairs (the pools of
    bench/stability_curve.py and bench/vivid_ablation.py, trained by `difflora pairs`);
  - controls: a LoRA trained on image 2 alone (step 1 on image 2), 4 detail and 4 vivid pairs:
    the model of a leaky LoRA;
  - duds: step 2 trained on image 1 again (a "pair" whose images do not differ), and step 2 cut
    to 4 steps, on top of the pools' own LoRA 1s.
Split: every second LoRA of each kind goes to the calibration set, the others to validation.

The judge's label, fixed before any report was computed (on the axis' low-end held-out cases,
toy.effects, at s = 1): "drags image 2's content" if content kept < 80%; else "no effect on other
prompts" if the axis effect < 0.3; else "transfers".

The report's two thresholds (health.Thresholds: drag above which it drags, other-prompt change
below which it has no effect) and its noise levels (LEVELS: two candidate pairs of fractions of T)
are chosen on the calibration set (the best agreement over a grid of the observed values'
midpoints); the agreement and confusion matrix are then read on validation, for the chosen
setting only.
Writes bench/results/health_validation.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit import health, lora, stability  # noqa: E402
from difflora_kit.config import SampleConfig, TrainConfig  # noqa: E402
from difflora_kit.images import load_image  # noqa: E402
from difflora_kit.pair import prepare_base, train_stage  # noqa: E402
from difflora_kit.toy import effects  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = (health.TRANSFERS, health.NO_EFFECT, health.DRAGS)
KEPT_BELOW, EFFECT_BELOW = 0.8, 0.3  # the judge's label rule (fixed before the reports)
LEVELS = ((0.5, 0.8), (0.8, 0.95))  # candidate probe noise levels (health.HealthConfig.levels)


def judge_label(judged: dict) -> str:
    if judged["content_kept"] < KEPT_BELOW:
        return health.DRAGS
    if judged["effect_mean"] < EFFECT_BELOW:
        return health.NO_EFFECT
    return health.TRANSFERS


def extra_loras(pools: Path, cfg: TrainConfig) -> list[dict]:
    """Controls and duds, trained once into POOLS/health_extra/ (reused when there)."""
    folder = pools / "health_extra"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for axis in ("detail", "vivid"):
        _, rows, index = stability.read_pool(pools / f"clean_{axis}")
        for i, row in enumerate(rows[:4]):
            kinds = [("control", None, row["image2"], cfg)]
            if i < 2:
                kinds.append(("dud: image 2 = image 1", "lora1", row["image1"], cfg))
            else:
                kinds.append(("dud: 4 steps", "lora1", row["image2"], TrainConfig(steps=4)))
            for kind, preset, image, kind_cfg in kinds:
                path = folder / f"{axis}_{i}_{kind.split(':')[0]}{'' if kind == 'control' else '_' + str(i % 2)}.safetensors"
                if not path.is_file():
                    preset_lora = lora.load(pools / f"clean_{axis}" / index["pairs"][i]["dir"] / "lora1.safetensors") \
                        if preset else None
                    result = train_stage(load_image(image), row["prompt"], kind_cfg, "toy", preset_lora, progress=False)
                    lora.save(path, result.lora)
                out.append({"kind": kind, "axis": axis, "prompt": row["prompt"], "image2": image, "path": path})
    return out


def pool_loras(pools: Path) -> list[dict]:
    out = []
    for name, axis, count in (("clean_detail", "detail", 8), ("realistic_detail", "detail", 8), ("clean_vivid", "vivid", 8)):
        _, rows, index = stability.read_pool(pools / name)
        for row, entry in list(zip(rows, index["pairs"]))[:count]:
            out.append({"kind": f"LoRA 2, {name.replace('_', ' ')}", "axis": axis, "prompt": row["prompt"],
                        "image2": row["image2"], "path": pools / name / entry["dir"] / "lora2.safetensors"})
    return out


def fit_thresholds(rows: list[dict]) -> health.Thresholds:
    """The thresholds with the best agreement on `rows` (midpoints of the observed values)."""
    def mids(values):
        v = sorted(set(values))
        return [(a + b) / 2 for a, b in zip(v, v[1:])] or v

    best, best_t = -1, None
    for drag, change in itertools.product(mids([r["drag"] for r in rows]), mids([r["other_change"] for r in rows])):
        t = health.Thresholds(no_effect_below=change, drags_above=drag)
        hits = sum(health.verdict(r, t)[0] == r["label"] for r in rows)
        if hits > best:
            best, best_t = hits, t
    return best_t


def confusion(rows: list[dict], t: health.Thresholds) -> tuple[np.ndarray, float]:
    m = np.zeros((3, 3), int)  # [judge label, report verdict]
    for r in rows:
        m[LABELS.index(r["label"]), LABELS.index(health.verdict(r, t)[0])] += 1
    return m, float(np.trace(m) / max(m.sum(), 1))


def matrix_table(m: np.ndarray) -> str:
    lines = ["| judge \\ report | " + " | ".join(LABELS) + " |", "|---|---|---|---|"]
    lines += [f"| {LABELS[i]} | " + " | ".join(str(x) for x in m[i]) + " |" for i in range(3)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=Path, default=ROOT / "out/bench")
    parser.add_argument("--seeds-per-prompt", type=int, default=3)
    args = parser.parse_args()
    cfg = TrainConfig()
    started = time.time()
    items = pool_loras(args.pools) + extra_loras(args.pools, cfg)
    trained = time.time() - started
    backend = prepare_base("toy", cfg)
    cases = {axis: effects.low_end_cases(backend, axis, 8, args.seeds_per_prompt, 16, SampleConfig())
             for axis in ("detail", "vivid")}
    rows, report_seconds = [], []
    for item in items:
        l2 = lora.load(item["path"])
        judged = effects.judge_lora(backend, l2, cases[item["axis"]])["per_strength"][0]
        row = {**{k: str(v) if k == "path" else v for k, v in item.items()},
               "label": judge_label(judged), "effect": judged["effect_mean"], "content_kept": judged["content_kept"]}
        for levels in LEVELS:
            t0 = time.time()
            figures = health.measure(backend, l2, item["prompt"], load_image(item["image2"]), health.HealthConfig(levels=levels))
            report_seconds.append(time.time() - t0)
            row[str(levels)] = {k: figures[k] for k in ("own_change", "other_change", "transfer", "drag", "own_drag")}
        rows.append(row)
    kinds = sorted({r["kind"] for r in rows})
    calibration = [r for k in kinds for r in [x for x in rows if x["kind"] == k][0::2]]
    validation = [r for k in kinds for r in [x for x in rows if x["kind"] == k][1::2]]
    fits = {}
    for levels in LEVELS:
        cal = [{**r, **r[str(levels)]} for r in calibration]
        t = fit_thresholds(cal)
        fits[levels] = (confusion(cal, t)[1], t)
    levels = max(LEVELS, key=lambda lv: fits[lv][0])  # the first (the default) on a tie
    t = fits[levels][1]
    calibration = [{**r, **r[str(levels)]} for r in calibration]
    validation = [{**r, **r[str(levels)]} for r in validation]
    m_cal, acc_cal = confusion(calibration, t)
    m_val, acc_val = confusion(validation, t)
    lines = ["Calibration agreement by probe levels: " + ", ".join(f"{lv}: {fits[lv][0]:.0%}" for lv in LEVELS)
             + f"; chosen: levels {levels}.", "",
             f"Thresholds set on the calibration set ({len(calibration)} LoRAs): drag above {t.drags_above:.3f} -> "
             f"drags; other-prompt change below {t.no_effect_below:.3f} -> no effect. Agreement with the judge: "
             f"calibration {acc_cal:.0%}, **validation {acc_val:.0%}** ({len(validation)} LoRAs).", "",
             "Validation (rows: the judge's label; columns: the report's verdict):", "", matrix_table(m_val), "",
             "Calibration:", "", matrix_table(m_cal), "",
             "| set | kind | axis | judge: effect, content kept -> label | report: other change, drag -> verdict |",
             "|---|---|---|---|---|"]
    for name, subset in (("cal", calibration), ("val", validation)):
        for r in subset:
            lines.append(f"| {name} | {r['kind']} | {r['axis']} | {r['effect']:+.2f}, {r['content_kept']:.0%} -> {r['label']} | "
                         f"{r['other_change']:.3f}, {r['drag']:+.3f} -> {health.verdict(r, t)[0]} |")
    lines += ["", f"Report time: median {np.median(report_seconds):.2f} s per LoRA and setting (toy, 8-bit base, this CPU); "
              f"training the extra LoRAs took {trained:.0f} s."]
    write_result("health_validation", {"levels": list(levels),
                                       "thresholds": {"no_effect_below": t.no_effect_below, "drags_above": t.drags_above},
                                       "agreement": {"calibration": acc_cal, "validation": acc_val},
                                       "confusion_validation": m_val.tolist(), "confusion_calibration": m_cal.tolist(),
                                       "labels": LABELS, "rows": rows, "report_seconds": report_seconds},
                 "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
