"""The `difflora` command line. Every TrainConfig field is a flag of the same name.

    difflora train IMAGE --prompt TEXT --out LORA.safetensors [--preset-lora L1.safetensors]
    difflora pair IMAGE1 IMAGE2 --prompt TEXT --out DIR
    difflora sample --lora L.safetensors --prompt TEXT [--prompt ...] --scales -1,0,1,2 --seeds 0,1,2 --out grid.png
    difflora evaluate [--pairs METADATA] [--axis detail] --out DIR
    difflora demo [--out DIR]
    difflora make-pairs --out DIR ; difflora pretrain --out DIR
    difflora average L1.safetensors L2.safetensors ... --out AVG.safetensors [--weights 0.5,0.5] [--rank N|auto]
    difflora pairs METADATA.jsonl --out DIR [--axis detail] [--limit N] [--rank-out N|auto]
    difflora stability METADATA.jsonl | --from PAIRS_DIR --axis detail --n 1,2,4,8,16 --subsets 8 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
import warnings
from pathlib import Path

from .config import SampleConfig, TrainConfig


class UserError(Exception):
    """An error in what the user asked for: printed without a traceback."""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        elif f.name == "targets":
            parser.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x), default=None,
                                help="comma-separated module suffixes (default " + ",".join(f.default) + ")")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"(default {f.default})")


def _given_flags(args, cls) -> dict:
    """The dataclass fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def _train_cfg(args, start: TrainConfig | None = None) -> TrainConfig:
    try:
        return dataclasses.replace(start or TrainConfig(), **_given_flags(args, TrainConfig))
    except ValueError as e:
        raise UserError(str(e))


def _train_cfg_from(**fields) -> TrainConfig:
    try:
        return TrainConfig(**fields)
    except ValueError as e:
        raise UserError(str(e))


def load_lora(path, base="toy"):
    """A LoRA file in the kit's/diffusers' keys or kohya's (names resolved against `base`)."""
    from . import backends, lora

    return lora.load(path, module_names=lambda: backends.module_names(base))


def cmd_convert(args) -> None:
    from . import kohya, lora
    from .files import check_writable

    check_writable(args.out, args.force)
    the_lora = load_lora(args.lora, args.base)
    if args.to == "kohya":
        lora.save_kohya(args.out, the_lora)
    else:
        lora.save(args.out, the_lora)
    print(f"wrote {args.out} ({args.to} keys, {len(the_lora.modules())} modules, rank {the_lora.rank})")


def cmd_plan(args) -> None:
    from . import plan

    cfg = _train_cfg(args)
    result = plan.plan_memory(args.base, args.resolution, cfg, args.dtype, offload_encoders=not args.keep_encoders)
    print(plan.format_plan(result, args.gpu_memory))
    if args.gpu_memory and result.peak > 0.9 * args.gpu_memory * plan.GiB:
        print("to fit, lower one of these (predicted peak after the change):")
        print("\n".join(f"  {line}" for line in plan.advice(result)))


def _sample_cfg(args) -> SampleConfig:
    """The base's family defaults (config.sample_defaults), with the flags given on top."""
    from . import backends
    from .config import sample_defaults

    given = (("steps", args.sample_steps), ("guidance", args.guidance), ("rescale", args.rescale),
             ("lora_off_first", args.lora_off_first))
    try:
        start = sample_defaults(backends.family(getattr(args, "base", "toy")))
        return dataclasses.replace(start, **{k: v for k, v in given if v is not None})
    except ValueError as e:
        raise UserError(str(e))


def _add_sample_flags(p):
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: toy 20, SD 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: toy 2.0, SD 1.x 7.5, SDXL 5.0)")
    p.add_argument("--rescale", type=float, default=None, help="guidance rescale (default: toy 0.7, SD 0)")
    p.add_argument("--lora-off-first", type=float, default=None,
                   help="start-noise gate: fraction of the first sampling steps without the LoRA (default 0)")


def _model_size(base) -> int:
    from . import backends

    return backends.sample_size(base)


def _finish(path: Path, the_lora, checkpoint: Path) -> None:
    """Write the finished LoRA, then drop its checkpoint (in that order: a kill between the two
    leaves a finished LoRA and a stale checkpoint, never a lost run)."""
    from . import lora

    lora.save(path, the_lora)
    checkpoint.unlink(missing_ok=True)


def _health(plain_base, lora2, prompt: str, image2) -> dict:
    """LoRA 2's health report on the plain base (difflora_kit.health), stamped into its metadata."""
    from . import health

    report = health.report(plain_base, lora2, prompt, image2)
    health.stamp(lora2, report)
    return report


def _write_report(path: Path, report: dict, tag: str = "LoRA 2", shown: str | None = None) -> None:
    """Write the report (atomically) and print its verdict line and advice; `shown`: the path printed."""
    from . import health

    health.save(path, report)
    print(f"{tag} health: {report['line']} [{report['seconds']:.1f} s; {shown or path}]\n  try: {report['advice']}")


def cmd_train(args) -> None:
    from . import pair
    from .checkpoint import checkpoint_path
    from .files import check_writable
    from .images import load_image

    check_writable(args.out, args.force)
    report_path = Path(args.out).with_suffix(".report.json") if args.preset_lora and not args.no_report else None
    if report_path is not None:
        check_writable(report_path, args.force)
    image = load_image(args.image, _model_size(args.base), args.resize)
    preset = load_lora(args.preset_lora, args.base) if args.preset_lora else None
    ckpt = checkpoint_path(args.out)
    cfg = _train_cfg(args)
    result = pair.train_stage(image, args.prompt, cfg, args.base, preset, checkpoint=ckpt, resume=args.resume)
    report = _health(pair.prepare_base(args.base, cfg), result.lora, args.prompt, image) if report_path else None
    _finish(args.out, result.lora, ckpt)
    print(f"wrote {args.out} (stage {result.lora.meta['stage']}, {len(result.losses)} steps in {result.seconds:.1f} s, "
          f"final loss {result.losses[-1]:.4f})")
    if report is not None:
        _write_report(report_path, report)


def cmd_pair(args) -> None:
    from . import pair
    from .checkpoint import checkpoint_path
    from .files import check_writable
    from .images import check_pair, load_image

    out = Path(args.out)
    paths = out / "lora1.safetensors", out / "lora2.safetensors"
    report_path = None if args.no_report else out / "report.json"
    step1_done = args.resume and paths[0].is_file()  # resuming after step 1 finished: keep its LoRA
    for path in [*paths[1 if step1_done else 0:], *([report_path] if report_path else [])]:
        check_writable(path, args.force)
    size = _model_size(args.base)
    image1, image2 = load_image(args.image1, size, args.resize), load_image(args.image2, size, args.resize)
    check_pair(image1, image2)
    cfg = _train_cfg(args)
    if step1_done:
        lora1 = load_lora(paths[0], args.base)
        print(f"resuming: {paths[0]} is finished, step 1 skipped")
    else:
        step1 = pair.train_stage(image1, args.prompt, cfg, args.base, None, checkpoint=checkpoint_path(paths[0]),
                                 resume=args.resume)
        lora1 = step1.lora
        _finish(paths[0], lora1, checkpoint_path(paths[0]))
    step2 = pair.train_stage(image2, args.prompt, cfg, args.base, lora1, checkpoint=checkpoint_path(paths[1]),
                             resume=args.resume)
    step2.lora.meta["image1_digest"] = lora1.meta.get("image_digest", "")
    report = _health(pair.prepare_base(args.base, cfg), step2.lora, args.prompt, image2) if report_path else None
    _finish(paths[1], step2.lora, checkpoint_path(paths[1]))
    print(f"wrote {paths[0]} and {paths[1]} (step 2 {step2.seconds:.1f} s)")
    if report is not None:
        _write_report(report_path, report)


def cmd_sample(args) -> None:
    from . import lora, pair, plots, sample
    from .files import atomic_directory, check_writable
    from .images import save_png

    check_writable(args.out, args.force)
    if args.images:
        check_writable(args.images, args.force)
    prompts = args.prompt
    if any(not p.strip() for p in prompts):
        raise UserError("a --prompt is empty: give a caption, e.g. --prompt 'a red circle on a blue background'")
    the_lora = load_lora(args.lora, args.base) if args.lora else None
    preset = load_lora(args.preset_lora, args.base) if args.preset_lora else None
    backend = pair.prepare_base(args.base, _train_cfg_from(eight_bit=args.eight_bit, preset_mode=args.preset_mode), preset)
    images = sample.sweep(backend, the_lora, prompts, args.seeds, args.scales, _sample_cfg(args))  # (P, S, K, H, W, 3)
    P, S, K = images.shape[:3]
    grid = images.transpose(2, 0, 1, 3, 4, 5).reshape(K, P * S, *images.shape[3:])  # rows: scales
    cols = [f"p{p} seed {s}" for p in range(P) for s in args.seeds]
    plots.save_grid(grid, args.out, [f"s={k:g}" for k in args.scales], cols, title=" | ".join(prompts))
    if args.images:
        with atomic_directory(args.images) as tmp:
            index = []
            for p in range(P):
                for si, seed in enumerate(args.seeds):
                    for k, scale in enumerate(args.scales):
                        name = f"p{p}_seed{seed}_s{scale:+g}.png"
                        save_png(images[p, si, k], tmp / name)
                        index.append({"file": name, "prompt": prompts[p], "seed": seed, "scale": scale})
            (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {args.out}" + (f" and {len(args.seeds) * P * K} images in {args.images}" if args.images else ""))


def cmd_evaluate(args) -> None:
    from .demo import run

    from .demo import quick_configs

    cfg = _train_cfg(args, quick_configs()[0] if args.quick else None)
    run(args.out, pairs=args.pairs, axis=args.axis, n_average=args.n_average, cfg=cfg,
        quick=args.quick, force=args.force, base=args.base)


def cmd_demo(args) -> None:
    from .demo import run

    run(args.out, quick=args.quick, force=args.force, base=args.base)


def cmd_make_pairs(args) -> None:
    from .toy.pairs import make_pairs

    print(f"wrote {make_pairs(args.out, args.per_axis, args.seed, args.force, args.realistic)}")


def cmd_pretrain(args) -> None:
    from .files import check_writable
    from .toy.pretrain import pretrain

    check_writable(args.out, args.force)
    pretrain(args.out, args.steps, args.batch, args.lr, args.seed, args.eval_every)


def _rank_arg(text: str | None, flag: str) -> int | str | None:
    """'auto', a positive integer, or None (not given)."""
    if text is None or text == "auto":
        return text
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank <= 0:
        raise UserError(f"{flag} must be a positive integer or 'auto', got {text!r}")
    return rank


def _rank_energy(rank_text: str | None, energy: float | None, flag: str) -> tuple[int | str | None, float]:
    """(rank, energy) of an SVD-compressed average; --energy alone means --rank auto."""
    rank = _rank_arg(rank_text, flag)
    if energy is not None:
        if not 0 < energy <= 1:
            raise UserError(f"--energy must be in (0, 1] (the fraction of ||dW||^2 kept per layer), got {energy!r}")
        if rank is None:
            rank = "auto"
        elif rank != "auto":
            raise UserError(f"--energy sets what {flag} auto keeps; it does not apply to a fixed {flag} {rank}")
    return rank, 0.99 if energy is None else energy


def cmd_average(args) -> None:
    from . import average, lora
    from .files import check_writable

    if args.out.suffix != ".safetensors":
        raise UserError(f"--out {args.out}: LoRA files are written as .safetensors; name it e.g. average.safetensors")
    check_writable(args.out, args.force)
    rank, energy = _rank_energy(args.rank, args.energy, "--rank")
    members = [lora.load(p) for p in args.loras]
    result = average.average(members, args.weights, rank, energy, args.compare_naive)
    lora.save(args.out, result.lora)
    print(average.format_report(result))
    print(f"wrote {args.out}")


def _select_pairs(rows: list[dict], axis: str | None, limit: int | None) -> list[dict]:
    axes = sorted({r.get("axis") or "" for r in rows})
    if axis is not None:
        rows = [r for r in rows if r.get("axis") == axis]
        if not rows:
            raise UserError(f"no pair on axis {axis!r} in the metadata (axes there: {', '.join(a for a in axes if a) or 'none'})")
    elif len(axes) > 1:
        raise UserError(f"the metadata holds pairs of several axes ({', '.join(a or '(none)' for a in axes)}): choose one "
                        "with --axis (an average of LoRA 2s of different axes mixes their effects)")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    if not rows:
        raise UserError("the metadata holds no pair")
    return rows[:limit] if limit else rows


def _dud_members(entries: list[dict], mode: str, dud_weight: float) -> tuple[list[int], list[float] | None, dict, str]:
    """Which LoRA 2s the average takes, under --duds keep|drop|down-weight (a dud: a health verdict other
    than "transfers"): (their positions in `entries`, weights (None: 1/N each), index.json's record, a line)."""
    from .health import TRANSFERS

    everyone = list(range(len(entries)))
    record = {"duds": mode, "left_out": [], "down_weighted": [], "kept_duds": []}
    if any("verdict" not in e for e in entries):
        return everyone, None, {**record, "duds": "keep"}, "no health reports (--no-report): every LoRA 2 is averaged"
    duds = [k for k, e in enumerate(entries) if e["verdict"] != TRANSFERS]
    named = ", ".join(f"{entries[k]['dir']} ({entries[k]['verdict']})" for k in duds)
    if not duds:
        return everyone, None, record, f"duds (--duds {mode}): none, every LoRA 2's verdict is '{TRANSFERS}'"
    of = f"{len(duds)} of {len(entries)} LoRA 2s"
    if mode == "keep":
        record["kept_duds"] = [{"dir": entries[k]["dir"], "verdict": entries[k]["verdict"]} for k in duds]
        return everyone, None, record, f"duds (--duds keep): {of} averaged at full weight although not '{TRANSFERS}': {named}"
    if mode == "drop":
        members = [k for k in everyone if k not in duds]
        if not members:
            raise UserError(f"--duds drop leaves nothing to average: every LoRA 2 is a dud ({named}). Use --duds keep "
                            "(or --duds down-weight) to average them anyway, or train longer / check the pairs "
                            "(each pair_XXX/report.json says what to try)")
        record["left_out"] = [{"dir": entries[k]["dir"], "verdict": entries[k]["verdict"],
                               "reason": f"health verdict '{entries[k]['verdict']}' (--duds drop)"} for k in duds]
        return members, None, record, f"duds (--duds drop): left out {of} from the average: {named}"
    raw = [dud_weight if k in duds else 1.0 for k in everyone]
    weights = [w / sum(raw) for w in raw]
    record["down_weighted"] = [{"dir": entries[k]["dir"], "verdict": entries[k]["verdict"], "weight": round(weights[k], 6),
                                "reason": f"health verdict '{entries[k]['verdict']}' (--duds down-weight, "
                                          f"--dud-weight {dud_weight:g} before normalising)"} for k in duds]
    return everyone, weights, record, (f"duds (--duds down-weight): {of} at weight {dud_weight:g} before normalising "
                                       f"({weights[duds[0]]:.3g} after, the others {max(weights):.3g}): {named}")


def cmd_pairs(args) -> None:
    from . import average, distributed, lora, pair
    from .files import atomic_directory, check_writable
    from .images import load_image
    from .toy.pairs import read_pairs

    check_writable(args.out, args.force)
    rank, energy = _rank_energy(args.rank_out, args.energy, "--rank-out")
    cfg = _train_cfg(args)
    if args.no_report and args.duds != "keep":
        raise UserError(f"--duds {args.duds} reads the LoRA 2s' health reports: leave out --no-report (or use --duds keep)")
    if not 0 < args.dud_weight <= 1:
        raise UserError(f"--dud-weight must be in (0, 1] (--duds drop leaves duds out), got {args.dud_weight!r}")
    rows = _select_pairs(read_pairs(args.metadata), args.axis, args.limit)
    size = _model_size(args.base)
    images = [(load_image(r["image1"], size, args.resize), load_image(r["image2"], size, args.resize)) for r in rows]

    def train_share(group, tmp: Path) -> dict[int, tuple[dict, lora.LoraFile]]:
        """Train and write this process' pairs (all of them for one process): {i: (index entry, LoRA 2)},
        each LoRA 2 with its health report (on this process' plain base, loaded once)."""
        done, plain = {}, None
        for i in distributed.shard(len(rows), group.processes, group.index):
            row, (image1, image2) = rows[i], images[i]
            if not tmp.is_dir():  # removed: another process failed; train and write nothing more
                raise distributed.PeerFailedError(f"process {group.index} of {group.processes}: the temp folder "
                                                  f"{tmp} is gone: another process failed (its error is above)")
            print(f"pair {i + 1}/{len(rows)}{group.tag}: {row['prompt']!r}")
            result = pair.train_pair(image1, image2, row["prompt"], cfg, args.base)
            report = None
            if not args.no_report:
                plain = pair.prepare_base(args.base, cfg) if plain is None else plain
                report = _health(plain, result.lora2, row["prompt"], image2)  # stamped before the LoRA is saved
            pair.save_pair(result, tmp / f"pair_{i:03d}")
            done[i] = (pair.index_entry(i, row, result), result.lora2)
            if report is not None:
                done[i][0].update(verdict=report["verdict"], other_change=float(f"{report['other_change']:.4g}"),
                                  drag=float(f"{report['drag']:.4g}"))
                _write_report(tmp / f"pair_{i:03d}" / "report.json", report, f"pair {i + 1}/{len(rows)} LoRA 2",
                              f"pair_{i:03d}/report.json")
        return done

    # One process, or under accelerate launch / torchrun a share of the pairs each (difflora_kit.distributed).
    try:
        with distributed.launched() as group:
            if not group.is_main:  # train into the main process' temp folder, report, exit
                tmp = group.share_folder(None)
                with distributed.discarded_on_error(tmp):
                    done = train_share(group, tmp)
                    group.gather({i: entry for i, (entry, _) in done.items()})
                return
            with atomic_directory(args.out) as tmp:  # DIR appears whole at the end, or not at all
                done = train_share(group, group.share_folder(tmp))
                shares = group.gather({i: entry for i, (entry, _) in done.items()})  # waits for every process
                indexed = sorted((i, e) for share in shares for i, e in share.items())  # pair order, not process order
                entries = [e for _, e in indexed]
                members, weights, duds, dud_note = _dud_members(entries, args.duds, args.dud_weight)
                # the members' LoRA 2s; another process' from the file it wrote
                lora2s = [done[i][1] if i in done else lora.load(tmp / e["dir"] / "lora2.safetensors")
                          for i, e in (indexed[k] for k in members)]
                avg = average.average(lora2s, weights, rank, energy)
                lora.save(tmp / "average.safetensors", avg.lora)
                summary = {"file": "average.safetensors", "method": avg.method,
                           "members": [entries[k]["lora2_digest"] for k in members],
                           "weights": [round(w, 6) for w in avg.weights], **duds,
                           "rank": max(average.module_ranks(avg.lora).values()),
                           "rank_setting": rank if rank is not None else "exact",
                           "energy_kept": avg.svd.energy if avg.svd else 1.0}
                index = {"metadata": str(args.metadata), "axis": args.axis or rows[0].get("axis", ""),
                         "base": str(args.base), "config": dataclasses.asdict(cfg), "pairs": entries,
                         "average": summary, **({"processes": group.processes} if group.processes > 1 else {})}
                (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    except distributed.PeerFailedError as e:
        raise UserError(str(e)) from None
    print(dud_note)
    print(average.format_report(avg))
    print(f"wrote {len(rows)} pairs (pair_000 ...), average.safetensors and index.json in {args.out}"
          + (f" ({group.processes} processes)" if group.processes > 1 else ""))


def cmd_stability(args) -> None:
    from . import stability
    from .config import SampleConfig

    if (args.metadata is None) == (args.from_dir is None):
        raise UserError("give a pairs METADATA file (its pairs are trained) or --from DIR (the folder of a "
                        "`difflora pairs` run, whose LoRA 2s are reused), not both")
    ns = sorted(set(args.n))
    if not ns or ns[0] < 1:
        raise UserError(f"--n takes pair counts >= 1, e.g. 1,2,4,8,16; got {args.n}")
    cfg = _train_cfg(args) if args.metadata is not None else None
    result = stability.run(args.out, args.metadata, args.from_dir, args.axis, tuple(ns), args.subsets, cfg, args.base,
                           args.prompts, args.seeds_per_prompt, args.candidates, SampleConfig(steps=args.sample_steps),
                           args.limit, args.seed_subsets, args.force)
    print(stability.table(result))
    print(stability.describe_goals(result))
    print(f"wrote stability.json, stability.md and stability.png in {args.out}")


def _add_stability_parser(sub, common) -> None:
    p = sub.add_parser("stability", help="why average: the effect, leakage and spread of averages of N LoRA 2s, against N",
                       epilog="Toy model only (the judge reads effect and leakage). Example: difflora stability "
                              "data_samples/pairs_realistic/metadata.jsonl --axis detail --n 1,4,8 --subsets 4 --out DIR")
    p.add_argument("metadata", type=Path, nargs="?", default=None, help="pairs metadata.jsonl: its pairs are trained")
    p.add_argument("--from", dest="from_dir", type=Path, default=None,
                   help="the folder of a `difflora pairs` run: reuse its LoRA 2s instead of training")
    p.add_argument("--out", type=Path, required=True, help="DIR: stability.json, stability.md, stability.png")
    p.add_argument("--axis", default=None, help="the pairs' style axis (detail or vivid; default: the pool's)")
    p.add_argument("--n", type=_ints, default=[1, 2, 4, 8, 16], help="pair counts N to average, e.g. 1,2,4,8,16")
    p.add_argument("--subsets", type=int, default=8, help="random subsets of N pairs per N (their overlap is reported)")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs of the metadata")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts the averages are judged on")
    p.add_argument("--seeds-per-prompt", type=int, default=4, help="seeds per prompt, where the base draws the axis' low end")
    p.add_argument("--candidates", type=int, default=16, help="seeds per prompt sampled to find those")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the judged samples")
    p.add_argument("--seed-subsets", type=int, default=0, help="seed of the subset draw")
    _add_dataclass_flags(p, TrainConfig)
    common(p)
    p.set_defaults(func=cmd_stability)


def _add_average_parsers(sub, common) -> None:
    p = sub.add_parser("average", help="average LoRAs exactly in delta-W space (optionally SVD to a lower rank)")
    p.add_argument("loras", type=Path, nargs="+", help="LoRA files (.safetensors) of one base and targets")
    p.add_argument("--out", type=Path, required=True, help="the averaged LoRA (.safetensors)")
    p.add_argument("--weights", type=_floats, default=None, help="one weight per LoRA, e.g. 0.5,0.5 (default 1/N each)")
    p.add_argument("--rank", default=None, help="N or auto: truncated SVD of each layer's average (default: exact, rank sum r_i)")
    p.add_argument("--energy", type=float, default=None, help="with --rank auto: energy kept per layer (default 0.99)")
    p.add_argument("--compare-naive", action="store_true",
                   help="also report the error of averaging A and B separately (the wrong way; equal ranks)")
    common(p, base=False)
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("pairs", help="train LoRA 1 and 2 for every pair of a metadata file; average the LoRA 2s",
                       epilog="Several GPUs: accelerate launch --multi_gpu --num_processes N -m difflora_kit.cli "
                              "pairs ... (or torchrun --nproc-per-node N -m difflora_kit.cli pairs ...): process k "
                              "trains the pairs i with i % N == k, the main process averages; same result as one "
                              "process.")
    p.add_argument("metadata", type=Path, help="pairs metadata.jsonl (image1, image2, prompt[, axis])")
    p.add_argument("--out", type=Path, required=True, help="DIR: pair_XXX/lora1|lora2.safetensors, average.safetensors, index.json")
    p.add_argument("--axis", default=None, help="only the pairs of this axis (needed when the file holds several)")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    p.add_argument("--rank-out", default=None, help="N or auto: SVD-compress the average (default: exact)")
    p.add_argument("--energy", type=float, default=None, help="with --rank-out auto: energy kept per layer (default 0.99)")
    p.add_argument("--resize", action="store_true", help="resize the images to the model's size")
    p.add_argument("--no-report", action="store_true", help="skip the LoRA 2s' health reports (pair_XXX/report.json)")
    p.add_argument("--duds", choices=("keep", "drop", "down-weight"), default="keep",
                   help="LoRA 2s whose health verdict is not 'transfers': averaged like the others (keep, default), "
                        "left out (drop) or given --dud-weight (down-weight); index.json records which and why")
    p.add_argument("--dud-weight", type=float, default=0.25,
                   help="with --duds down-weight: a dud's weight before the weights are normalised (default 0.25)")
    _add_dataclass_flags(p, TrainConfig)
    common(p)
    p.set_defaults(func=cmd_pairs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflora", description="Differential LoRA training for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, base=True):
        if base:
            p.add_argument("--base", default="toy", help="base model: 'toy' (built in) or a model folder")
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    p = sub.add_parser("train", help="train one LoRA (step 1; step 2 with --preset-lora)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint a killed run left (train with --checkpoint-every N)")
    p.add_argument("image", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset-lora", "--preset_lora_path", dest="preset_lora", type=Path, default=None,
                   help="LoRA 1: fused into the base first, which makes this step 2")
    p.add_argument("--resize", action="store_true", help="resize the image to the model's size")
    p.add_argument("--no-report", action="store_true",
                   help="with --preset-lora: skip LoRA 2's health report (OUT with .report.json for .safetensors)")
    _add_dataclass_flags(p, TrainConfig)
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pair", help="step 1 on IMAGE1, then step 2 on IMAGE2: DIR/lora1, DIR/lora2")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint a killed run left (train with --checkpoint-every N)")
    p.add_argument("image1", type=Path)
    p.add_argument("image2", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resize", action="store_true", help="resize both images to the model's size")
    p.add_argument("--no-report", action="store_true",
                   help="skip LoRA 2's health report (DIR/report.json: does it change other prompts, does it drag "
                        "them to image 2)")
    _add_dataclass_flags(p, TrainConfig)
    common(p)
    p.set_defaults(func=cmd_pair)

    p = sub.add_parser("sample", help="a strength sweep of one LoRA, as a grid (and single images)")
    p.add_argument("--lora", type=Path, default=None)
    p.add_argument("--preset-lora", "--preset_lora_path", dest="preset_lora", type=Path, default=None,
                   help="a LoRA fused into the base before sampling (e.g. LoRA 1 to check step 2)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--scales", type=_floats, default=[0.0, 1.0])
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--out", type=Path, required=True, help="grid PNG")
    p.add_argument("--images", type=Path, default=None, help="folder for one PNG per prompt/seed/scale + index.json")
    p.add_argument("--eight-bit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--preset-mode", default="fuse", help="how --preset-lora enters the base: fuse | requant | adapter")
    _add_sample_flags(p)
    common(p)
    p.set_defaults(func=cmd_sample)

    for name, func, helptext in (("evaluate", cmd_evaluate, "train a pair, its control and more LoRA 2s; measure the claims"),
                                 ("demo", cmd_demo, "the main job: one pair on the toy model, grid and claims table")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", type=Path, default=Path("out/demo" if name == "demo" else "out/evaluate"))
        p.add_argument("--quick", action="store_true", help="short schedules and fewer seeds (a smoke run, ~2 min)")
        if name == "evaluate":
            p.add_argument("--pairs", type=Path, default=None, help="pairs metadata.jsonl (default: the shipped pairs)")
            p.add_argument("--axis", default="detail")
            p.add_argument("--n-average", type=int, default=3, help="LoRA 2s averaged for claim 4")
            _add_dataclass_flags(p, TrainConfig)
        common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("plan", help="predicted peak GPU memory of step 1 and step 2, by component")
    p.add_argument("--base", default="sdxl", help="sd15, sdxl (public configs), toy, a model folder or a hub id")
    p.add_argument("--resolution", type=int, default=None, help="training image size in pixels (default: the base's own)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="compute dtype: bf16 on sm80+ (A100, RTX 30xx/40xx), fp16 on a T4 (sm75)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB of your GPU: says whether it fits, and what to lower")
    p.add_argument("--keep-encoders", action="store_true", help="count the text encoders and VAE as kept on the GPU")
    _add_dataclass_flags(p, TrainConfig, skip=("seed", "lr", "steps", "checkpoint_every", "preset_scale"))
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("convert", help="a LoRA in other keys: kohya (ComfyUI, A1111) or the kit's diffusers keys")
    p.add_argument("lora", type=Path)
    p.add_argument("--to", choices=("kohya", "diffusers"), required=True)
    p.add_argument("--out", type=Path, required=True)
    common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("make-pairs", help="write toy image pairs + metadata.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-axis", type=int, default=24)
    p.add_argument("--realistic", action="store_true",
                   help="image 2 also differs by incidental changes drawn per pair (shift, size, shades, grain; "
                        "zero mean over pairs), recorded in each row and in pairs.json")
    p.add_argument("--seed", type=int, default=0)
    common(p, base=False)
    p.set_defaults(func=cmd_make_pairs)

    p = sub.add_parser("pretrain", help="pretrain a toy base model (the shipped one took this command)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    common(p, base=False)
    p.set_defaults(func=cmd_pretrain)
    _add_average_parsers(sub, common)
    _add_stability_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # "--scales -1,0,1": a value that starts with "-" is not an option here
        if argv[i] in ("--scales", "--seeds", "--weights") and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"{argv[i]}={argv[i + 1]}", ""]
    args = build_parser().parse_args([a for a in argv if a != ""])
    from .files import OutputExistsError
    from .images import ImageInputError
    from .lora import LoraMismatchError
    from .plan import OutOfMemoryAdvice
    from .train import NonFiniteLossError

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"difflora: note: {msg}", file=sys.stderr)
        try:
            args.func(args)
        except (UserError, OutputExistsError, ImageInputError, LoraMismatchError, NonFiniteLossError, OutOfMemoryAdvice,
                FileNotFoundError, NotImplementedError, ValueError) as e:
            print(f"difflora: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
