"""Why average, and how many pairs: the stability curve of an average of N LoRA 2s.

One pair's LoRA 2 learns everything image 2 has that image 1 lacks: the wanted change (the axis)
and whatever else differs in that pair (a shift, a size, a shade, grain: the pair's own incidental
changes, `toy.pairs.IncidentalSpread`). Over many pairs the axis is shared and the incidental
changes have zero mean, so the exact average keeps the first and washes out the second:

    average_N = (1/N) sum_i dW_i,   dW_i = dW_axis + dW_incidental,i
    leakage(N) ~ |(1/N) sum_i incidental_i|  ->  0  like 1/sqrt(N)      effect(N) ~ effect(1)

For each N, `subsets` random subsets of N pairs are drawn from the pool (how much they overlap is
reported: from a pool of P, subsets of N > P/2 share most of their members), each is averaged
exactly (average.exact_average) and judged on the same held-out (prompt, seed) cases
(toy.effects.low_end_cases: where the base draws the axis' low end, so the LoRA has room to act):
the axis effect (mean; spread over cases x subsets; spread of the subset means), the leakage of
each incidental factor (mean |change| and its systematic part |mean change|, toy.effects), the
content kept, and what the pairs' own changes leave after averaging (|mean of the drawn values|).

    difflora stability METADATA --axis detail --n 1,2,4,8,16 --subsets 8 --out DIR   # trains the pool
    difflora stability --from PAIRS_DIR --n 1,2,4,8,16 --subsets 8 --out DIR          # a `difflora pairs` run
    -> DIR/stability.json, stability.md (table), stability.png (curves against N)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import average
from .lora import LoraFile
from .toy import effects

RGB_LEVELS = 255.0  # the drawn shades and grain are RGB in [0, 1]; the judge reads them in levels


def draw_subsets(pool: int, n: int, k: int, rng: random.Random) -> list[tuple[int, ...]]:
    """`k` distinct random subsets of `n` of range(pool) (all of them when fewer exist), sorted."""
    if not 1 <= n <= pool:
        raise ValueError(f"N = {n} pairs from a pool of {pool}: N must be between 1 and the pool size")
    if k <= 0:
        raise ValueError(f"subsets must be a positive integer, got {k}")
    if math.comb(pool, n) <= k:
        return [tuple(c) for c in itertools.combinations(range(pool), n)]
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < k:
        chosen.add(tuple(sorted(rng.sample(range(pool), n))))
    return sorted(chosen)


def mean_overlap(subsets: list[tuple[int, ...]]) -> float:
    """Mean share of members two subsets have in common (|A & B| / N over all pairs of subsets; 0 for one)."""
    pairs = list(itertools.combinations(subsets, 2))
    if not pairs:
        return 0.0
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in pairs]))


def drawn_changes(incidental: dict) -> dict[str, float]:
    """A realistic pair's drawn changes (metadata "incidental") in the judge's units: px and RGB levels.
    Grain is signed by where it is: + on image 2 (LoRA 2 learns to add it), - on image 1 (to remove it)."""
    if not incidental:
        return {}
    out = {f: float(incidental[f]) for f in ("shift_x", "shift_y", "size")}
    out.update({f: float(incidental[f]) * RGB_LEVELS for f in ("fg_shade", "bg_shade")})
    out["grain"] = float(incidental["grain"]) * RGB_LEVELS * (1 if incidental["grain_on"] == 2 else -1)
    return out


def leftover(drawn: list[dict[str, float]], subset: tuple[int, ...]) -> dict[str, float]:
    """|mean of the drawn changes| over a subset, per factor: what the pairs' own changes leave in an average."""
    if not drawn or not drawn[0]:
        return {}
    return {f: abs(float(np.mean([drawn[i][f] for i in subset]))) for f in drawn[0]}


def summarize(n: int, subsets: list[tuple[int, ...]], judged: list[dict], drawn: list[dict]) -> dict:
    """One row of the curve: the judged subsets of N pairs."""
    effects_all = np.concatenate([np.array(j["effect"]) for j in judged])  # (subsets * cases,)
    means = np.array([j["effect_mean"] for j in judged])  # (subsets,)
    factors = list(judged[0]["leakage"])
    rests = [leftover(drawn, s) for s in subsets]
    return {
        "n": n, "subsets": len(subsets), "overlap": mean_overlap(subsets),
        "effect_mean": float(means.mean()),
        "effect_spread": float(effects_all.std()),  # over cases x subsets
        "effect_subset_std": float(means.std()),  # of the subset means
        "content_kept": float(np.mean([j["content_kept"] for j in judged])),
        "scene_kept": float(np.mean([j["scene_kept"] for j in judged])),
        "leakage": {f: float(np.nanmean([j["leakage"][f] for j in judged])) for f in factors},
        "leakage_systematic": {f: float(np.nanmean([abs(j["leakage_signed"][f]) for j in judged])) for f in factors},
        "leftover": {f: float(np.mean([r[f] for r in rests])) for f in rests[0]} if rests and rests[0] else {},
        "members": [list(s) for s in subsets],
        "subset_effects": means.tolist(),
    }


def curve(backend, lora2s: list[LoraFile], cases: effects.Cases, ns: list[int], subsets: int = 8,
          drawn: list[dict] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """The stability curve: for each N in `ns`, `subsets` exact averages of N LoRA 2s, judged on `cases`."""
    if not lora2s:
        raise ValueError("the pool is empty: give at least one LoRA 2")
    too_big = [n for n in ns if n > len(lora2s)]
    if too_big:
        raise ValueError(f"--n {','.join(map(str, too_big))}: the pool holds only {len(lora2s)} LoRA 2s; "
                         f"lower N or train more pairs")
    rng = random.Random(seed)
    drawn = drawn or [{} for _ in lora2s]
    plan = [(n, draw_subsets(len(lora2s), n, subsets, rng)) for n in ns]
    bar = tqdm(total=sum(len(s) for _, s in plan), desc="stability: averages judged", disable=not progress)
    rows = []
    for n, chosen in plan:
        judged = []
        for subset in chosen:
            avg = average.exact_average([lora2s[i] for i in subset]) if n > 1 else lora2s[subset[0]]
            judged.append(effects.judge_lora(backend, avg, cases)["per_strength"][0])
            bar.update()
        rows.append(summarize(n, chosen, judged, drawn))
    bar.close()
    return {"axis": cases.axis, "pool": len(lora2s), "cases": len(cases.seeds), "low_end_share": cases.low_end_share,
            "units": effects.factor_units(), "rows": rows, "goals": goals(rows)}


def _row(rows: list[dict], n: int) -> dict | None:
    return next((r for r in rows if r["n"] == n), None)


def goals(rows: list[dict], small: int = 1, large: int = 8) -> dict:
    """The issue's goals, checked on the measured rows (None where N = small or large was not measured):
    leakage at N = 8 at most half of N = 1 (per factor), the effect at N = 8 at least 80% of N = 1,
    the spread across subsets falling with N."""
    a, b = _row(rows, small), _row(rows, large)
    out = {"spread_falls": all(x["effect_subset_std"] >= y["effect_subset_std"] - 1e-9 for x, y in zip(rows, rows[1:]))}
    if a is None or b is None:
        return out
    out["effect_ratio"] = b["effect_mean"] / a["effect_mean"] if a["effect_mean"] else float("nan")
    out["leakage_ratio"] = {f: b["leakage"][f] / a["leakage"][f] if a["leakage"][f] else float("nan") for f in a["leakage"]}
    out["systematic_ratio"] = {f: b["leakage_systematic"][f] / a["leakage_systematic"][f]
                               if a["leakage_systematic"][f] else float("nan") for f in a["leakage_systematic"]}
    out["effect_kept"] = out["effect_ratio"] >= 0.8
    out["leakage_halved"] = {f: r <= 0.5 for f, r in out["leakage_ratio"].items()}
    return out


def table(result: dict) -> str:
    """The curve as a Markdown table (one row per N)."""
    units = result["units"]
    factors = list(units)
    head = ["N", "subsets (overlap)", "effect", "spread (cases x subsets)", "spread of subset means", "content kept"]
    head += [f"leak {f} ({units[f]})" for f in factors]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [str(r["n"]), f"{r['subsets']} ({r['overlap']:.0%})", f"{r['effect_mean']:+.2f}", f"{r['effect_spread']:.2f}",
                 f"{r['effect_subset_std']:.3f}", f"{r['content_kept']:.0%}"]
        for f in factors:
            rest = r["leftover"].get(f)
            cells.append(f"{r['leakage'][f]:.2f} (sys. {r['leakage_systematic'][f]:.2f}"
                         + (f", pairs' own {rest:.2f})" if rest is not None else ")"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_goals(result: dict) -> str:
    g = result["goals"]
    lines = [f"spread of the subset means falls with N: {'yes' if g['spread_falls'] else 'NO'}"]
    if "effect_ratio" in g:
        lines.append(f"effect at N = 8 / N = 1: {g['effect_ratio']:.2f} (goal >= 0.80: {'met' if g['effect_kept'] else 'NOT met'})")
        lines.append("leakage at N = 8 / N = 1 (goal <= 0.50): " + ", ".join(
            f"{f} {r:.2f}{'' if g['leakage_halved'][f] else ' (not met)'}" for f, r in g["leakage_ratio"].items()))
        lines.append("systematic part, N = 8 / N = 1: " + ", ".join(f"{f} {r:.2f}" for f, r in g["systematic_ratio"].items()))
    return "\n".join(lines)


def figure(result: dict):
    """Curves against N: effect, spreads, leakage per factor (relative to N = 1), content kept."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ns = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ax = axes[0]
    ax.errorbar(ns, [r["effect_mean"] for r in rows], yerr=[r["effect_subset_std"] for r in rows], marker="o",
                capsize=3, label="effect (bars: spread of subset means)")
    ax.plot(ns, [r["content_kept"] for r in rows], marker="s", label="content kept")
    ax.set(xscale="log", xlabel="N pairs averaged", title=f"{result['axis']} effect at s = 1", ylim=(0, 1.15))
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(ns, [r["effect_subset_std"] for r in rows], marker="o", label="spread of subset means")
    ax.plot(ns, [r["effect_spread"] for r in rows], marker="s", label="spread over cases x subsets")
    ax.set(xscale="log", xlabel="N pairs averaged", title="spread of the effect")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=7)
    ax = axes[2]
    first = rows[0]
    for f in first["leakage"]:
        ax.plot(ns, [r["leakage"][f] / max(first["leakage"][f], 1e-9) for r in rows], marker="o", label=f)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="N pairs averaged", ylabel=f"leakage / leakage at N = {first['n']}",
           title="leakage of the incidental changes")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write(out: Path, result: dict) -> None:
    """stability.json, stability.md and stability.png into the folder `out` (which exists)."""
    from .plots import save_figure

    out = Path(out)
    (out / "stability.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "stability.md").write_text(f"{table(result)}\n\n{describe_goals(result)}\n")
    save_figure(figure(result), out / "stability.png")


def read_pool(folder: Path) -> tuple[list[LoraFile], list[dict], dict]:
    """The LoRA 2s of a `difflora pairs` folder, their metadata rows (with "incidental" for realistic
    pairs, read back from the metadata file the run names), and its index."""
    from . import lora
    from .toy.pairs import read_pairs

    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} is not the folder of a `difflora pairs` run (no index.json there)")
    index = json.loads(index_path.read_text())
    by_images = {}
    metadata = Path(index.get("metadata", ""))
    if metadata.is_file():
        by_images = {(r["image1"], r["image2"]): r for r in read_pairs(metadata)}
    rows = [by_images.get((e["image1"], e["image2"]), e) for e in index["pairs"]]
    lora2s = [lora.load(folder / e["dir"] / "lora2.safetensors") for e in index["pairs"]]
    return lora2s, rows, index


def train_pool(rows: list[dict], cfg, base, folder: Path, metadata: Path, progress: bool = True) -> list[LoraFile]:
    """Train LoRA 1 and 2 for every row into `folder` as `difflora pairs` lays it out (pair_XXX/,
    index.json without an average), so that a later `--from folder` reuses them."""
    from . import pair
    from .images import load_image

    entries, lora2s = [], []
    for i, row in enumerate(tqdm(rows, desc="stability: pairs trained", disable=not progress)):
        result = pair.train_pair(load_image(row["image1"]), load_image(row["image2"]), row["prompt"], cfg, base, False)
        pair.save_pair(result, folder / f"pair_{i:03d}")
        entries.append(pair.index_entry(i, row, result))
        lora2s.append(result.lora2)
    index = {"metadata": str(metadata), "axis": rows[0].get("axis", ""), "base": str(base),
             "config": dataclasses.asdict(cfg), "pairs": entries}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return lora2s


def run(out: Path, metadata: Path | None = None, from_dir: Path | None = None, axis: str | None = None,
        ns: tuple[int, ...] = (1, 2, 4, 8, 16), subsets: int = 8, cfg=None, base: str = "toy", prompts: int = 8,
        seeds: int = 4, candidates: int = 16, sample_cfg=None, limit: int | None = None, seed: int = 0,
        force: bool = False, progress: bool = True) -> dict:
    """Train the pool (from `metadata`) or read it (`from_dir`, a `difflora pairs` folder), measure the
    curve, write DIR/stability.{json,md,png} (and DIR/pairs/ when it trained) atomically; returns the result."""
    import time

    from . import backends
    from .config import TrainConfig
    from .files import atomic_directory, check_writable
    from .pair import prepare_base
    from .toy.pairs import read_pairs

    started = time.time()
    out = Path(out)
    check_writable(out, force)
    if (metadata is None) == (from_dir is None):
        raise ValueError("give either a pairs METADATA file (the pool is trained) or --from DIR (a `difflora pairs` folder)")
    if from_dir is not None:
        lora2s, rows, index = read_pool(from_dir)
        base, axis = index.get("base", base), axis or index.get("axis")
        cfg = cfg or TrainConfig(**{k: tuple(v) if k == "targets" else v for k, v in index.get("config", {}).items()})
    else:
        rows = [r for r in read_pairs(metadata) if axis is None or r.get("axis") == axis]
        if not rows:
            raise ValueError(f"no pair on axis {axis!r} in {metadata}")
        rows = rows[:limit] if limit else rows
        axis = axis or rows[0].get("axis")
    if not backends.resolve_base(base, configs_only=True).family.toy_world:
        raise ValueError(f"--base {base}: the stability curve is read by the toy world's judge, so it runs on the toy "
                         "model only; on other bases the health report (`difflora pair`) says whether a LoRA 2 transfers")
    if max(ns) > len(rows):
        raise ValueError(f"--n up to {max(ns)} but the pool holds {len(rows)} pairs: lower --n or give more pairs")
    cfg = cfg or TrainConfig()
    with atomic_directory(out) as tmp:
        if from_dir is None:
            (tmp / "pairs").mkdir()
            lora2s = train_pool(rows, cfg, base, tmp / "pairs", metadata, progress)
        trained = time.time()
        backend = prepare_base(base, cfg)  # the 8-bit base LoRA 2 is used on
        cases = effects.low_end_cases(backend, axis, prompts, seeds, candidates, sample_cfg)
        drawn = [drawn_changes(r.get("incidental", {})) for r in rows]
        result = curve(backend, lora2s, cases, list(ns), subsets, drawn, seed, progress)
        result.update({"source": str(from_dir or metadata), "base": str(base), "train_config": dataclasses.asdict(cfg),
                       "judged_on": {"prompts": prompts, "seeds_per_prompt": seeds, "candidates": candidates,
                                     "sample": dataclasses.asdict(cases.sample)},
                       "seconds": {"training": round(trained - started, 1), "total": round(time.time() - started, 1)}})
        write(tmp, result)
    return result
