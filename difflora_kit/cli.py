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
    difflora inspect LORA.safetensors [--base BASE]
    difflora convert LORA.safetensors --to kohya|diffusers|diffsynth --out OUT.safetensors [--base BASE]

Bad input that needs no model (missing or unreadable files, an existing output without --force, a
setting TrainConfig refuses) is refused by _check_inputs before torch or diffusers is imported. Ctrl-C
while training prints one line: the checkpoint a `--resume` continues from, and that command (exit 130).

Each command parses its flags, resolves --base once (backends.resolve_base) and passes that down,
calls the library (pair_files.train_stage_to_file, pair_files.train_pair_to_folder, many_pairs.run, sample,
demo, stability, plan) and prints what it returns. A flag's help is its TrainConfig field's docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import ast
import dataclasses
import inspect
import json
import os
import shlex
import sys
import textwrap
import typing
import warnings
from pathlib import Path

from .config import SOLVERS, SampleConfig, TrainConfig


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


def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} of a dataclass: the string right under each field in its source, on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field, under in zip(body, body[1:]):  # `name: type = default`, then a string expression
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(under, ast.Expr)
                and isinstance(under.value, ast.Constant) and isinstance(under.value.value, str)):
            docs[field.target.id] = " ".join(under.value.value.split())
    return docs


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """A flag per field of `cls`; its help: the field's docstring, then its default."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse fills in %(default)s and the like
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{doc} (default {f.default})".lstrip())
        elif f.name == "targets":
            parser.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x), default=None,
                                help=f"{doc} Comma-separated (default {','.join(f.default)})".lstrip())
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{doc} (default {f.default})".lstrip())


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


def cmd_convert(args) -> None:
    from . import backends, lora, pair
    from .files import check_writable

    check_writable(args.out, args.force)
    base = backends.resolve_base(args.base, configs_only=True)  # kohya keys need the module names alone
    the_lora = pair.load_lora(args.lora, base)
    if args.to == "kohya":
        lora.save_kohya(args.out, the_lora)
    elif args.to == "diffsynth":
        lora.save_diffsynth(args.out, the_lora)
    else:
        lora.save(args.out, the_lora)
    print(f"wrote {args.out} ({args.to} keys, {len(the_lora.modules())} modules, rank {the_lora.rank})")


def cmd_doctor(args) -> int:
    from .doctor import run

    return run(args.device)


def cmd_inspect(args) -> int:
    from .inspect_lora import run

    return run(args.lora, args.base)


def cmd_plan(args) -> None:
    from . import backends, plan
    from .backends import registry

    cfg = _train_cfg(args)
    # a family key with public configs is planned from them (nothing fetched); anything else is a base
    base = args.base if registry.public_config(args.base) else backends.resolve_base(args.base, configs_only=True)
    result = plan.plan_memory(base, args.resolution, cfg, args.dtype, offload_encoders=not args.keep_encoders)
    print(plan.format_plan(result, args.gpu_memory))
    if args.gpu_memory and result.peak > 0.9 * args.gpu_memory * plan.GiB:
        print("to fit, lower one of these (predicted peak after the change):")
        print("\n".join(f"  {line}" for line in plan.advice(result)))


def _sample_cfg(args, base=None) -> SampleConfig:
    """The base's family defaults (its registry row's sampling), with the flags given on top;
    `base`: the resolved base (None: args.base)."""
    from . import backends

    given = (("steps", args.sample_steps), ("guidance", args.guidance), ("rescale", args.rescale),
             ("lora_off_first", args.lora_off_first), ("solver", args.solver))
    try:
        start = backends.resolve_base(base if base is not None else getattr(args, "base", "toy"),
                                      configs_only=True).family.sample_config()
        return dataclasses.replace(start, **{k: v for k, v in given if v is not None})
    except ValueError as e:
        raise UserError(str(e))


def _add_sample_flags(p):
    p.add_argument("--sample-steps", type=int, default=None, help="solver steps (default: the family's, e.g. toy 20, SD 30)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="sampler of the toy and SD families: ddim, dpmpp (DPM-Solver++ 2M), unipc (default: the family's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: toy 2.0, SD 1.x 7.5, SDXL 5.0)")
    p.add_argument("--rescale", type=float, default=None, help="guidance rescale (default: toy 0.7, SD 0)")
    p.add_argument("--lora-off-first", type=float, default=None,
                   help="start-noise gate: fraction of the first sampling steps without the LoRA (default 0)")


def cmd_train(args) -> None:
    from . import backends, pair_files

    base = backends.resolve_base(args.base)
    written = pair_files.train_stage_to_file(args.out, args.image, args.prompt, _train_cfg(args), base, args.preset_lora,
                                             report=not args.no_report, resume=args.resume, force=args.force,
                                             resize=args.resize)
    result = written.result
    print(f"wrote {args.out} (stage {result.lora.meta['stage']}, {len(result.losses)} steps in {result.seconds:.1f} s, "
          f"final loss {result.losses[-1]:.4f})")
    if written.report is not None:
        print(pair_files.report_line(written.report, written.report_path))


def cmd_pair(args) -> None:
    from . import backends, pair_files

    base = backends.resolve_base(args.base)
    written = pair_files.train_pair_to_folder(args.out, args.image1, args.image2, args.prompt, _train_cfg(args), base,
                                              report=not args.no_report, resume=args.resume, force=args.force,
                                              resize=args.resize)
    print(f"wrote {written.paths[0]} and {written.paths[1]} (step 2 {written.step2.seconds:.1f} s)")
    if written.report is not None:
        print(pair_files.report_line(written.report, written.report_path))


def cmd_sample(args) -> None:
    from . import backends, pair, plots, sample
    from .files import atomic_directory, check_writable
    from .images import save_png

    check_writable(args.out, args.force)
    if args.images:
        check_writable(args.images, args.force)
    prompts = args.prompt
    _check_prompts(prompts)
    base = backends.resolve_base(args.base)
    the_lora = pair.load_lora(args.lora, base) if args.lora else None
    preset = pair.load_lora(args.preset_lora, base) if args.preset_lora else None
    backend = pair.prepare_base(base, _train_cfg_from(eight_bit=args.eight_bit, preset_mode=args.preset_mode), preset,
                                encode=pair.Encodes(prompts=tuple(prompts)))
    images = sample.sweep(backend, the_lora, prompts, args.seeds, args.scales, _sample_cfg(args, base),
                          args.max_batch)  # (P, S, K, H, W, 3); a GPU out of memory: SampleOutOfMemory says what to lower
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
    from . import backends
    from .demo import quick_configs, run

    cfg = _train_cfg(args, quick_configs()[0] if args.quick else None)
    run(args.out, pairs=args.pairs, axis=args.axis, n_average=args.n_average, cfg=cfg,
        quick=args.quick, force=args.force, base=backends.resolve_base(args.base))


def cmd_demo(args) -> None:
    from . import backends
    from .demo import run

    run(args.out, quick=args.quick, force=args.force, base=backends.resolve_base(args.base))


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
    members = _average_members(args.loras, args.base)
    result = average.average(members, args.weights, rank, energy, args.compare_naive)
    written = lora.save_files(args.out, result.lora)  # SD 1.x / SDXL: its kohya copy beside it
    print(average.format_report(result))
    print("wrote " + " and ".join(map(str, written)))


def _average_members(paths, base):
    """The LoRAs to average: as they are without --base (the kit's and diffusers' keys); with it, any format
    (kohya, DiffSynth: names resolved against it), each refused unless every module fits the base."""
    from . import backends, lora, pair

    if base is None:
        return [lora.load(p) for p in paths]
    base = backends.resolve_base(base, configs_only=True)
    shapes, members = backends.weight_shapes(base), []
    for path in paths:
        member = pair.load_lora(path, base)
        try:
            lora.check_shapes(member, shapes)
        except lora.LoraMismatchError as e:
            raise lora.LoraMismatchError(f"{path}: {e}") from None
        member.meta.setdefault("family", base.family.key)
        members.append(member)
    return members


def cmd_pairs(args) -> None:
    from . import average, backends, many_pairs

    base = backends.resolve_base(args.base)
    rank, energy = _rank_energy(args.rank_out, args.energy, "--rank-out")
    result = many_pairs.run(args.out, args.metadata, _train_cfg(args), base, args.axis, args.limit, rank, energy,
                            args.duds, args.dud_weight, report=not args.no_report, resize=args.resize, force=args.force)
    if result is None:  # a process of a launch other than the main one: the main one writes and reports
        return
    print(result.dud_note)
    print(average.format_report(result.average))
    print(f"wrote {result.pairs} pairs (pair_000 ...), average.safetensors and index.json in {args.out}"
          + (f" ({result.processes} processes)" if result.processes > 1 else ""))


def _stability_counts(args) -> list[int]:
    """`difflora stability`'s pair counts N, sorted, after checking its source (METADATA or --from, one)."""
    if (args.metadata is None) == (args.from_dir is None):
        raise UserError("give a pairs METADATA file (its pairs are trained) or --from DIR (the folder of a "
                        "`difflora pairs` run, whose LoRA 2s are reused), not both")
    ns = sorted(set(args.n))
    if not ns or ns[0] < 1:
        raise UserError(f"--n takes pair counts >= 1, e.g. 1,2,4,8,16; got {args.n}")
    return ns


def cmd_stability(args) -> None:
    from . import backends, stability
    from .config import SampleConfig

    ns = _stability_counts(args)
    cfg = _train_cfg(args) if args.metadata is not None else None
    base = backends.resolve_base(args.base)
    result = stability.run(args.out, args.metadata, args.from_dir, args.axis, tuple(ns), args.subsets, cfg, base,
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
    p.add_argument("--base", default=None,
                   help="the base the LoRAs are for: needed for kohya or DiffSynth-Studio files, and checks that "
                        "every module of every LoRA fits it (default: none, the kit's and diffusers' files as they are)")
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
    from .backends import registry

    parser = argparse.ArgumentParser(prog="difflora", description="Differential LoRA training for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, base=True):
        if base:
            p.add_argument("--base", default="toy", help="base model: 'toy' (built in) or a model folder")
            p.add_argument("--device", default=None,
                           help="cpu, cuda or cuda:N (default: $DIFFLORA_DEVICE, else CUDA when there is one, else the CPU)")
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    p = sub.add_parser("train", help="train one LoRA (step 1; step 2 with --preset-lora)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint an interrupted run left: Ctrl-C writes one at the step it "
                        "stops at; a killed run leaves the last of --checkpoint-every N")
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
                   help="continue from the checkpoint an interrupted run left: Ctrl-C writes one at the step it "
                        "stops at; a killed run leaves the last of --checkpoint-every N")
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
    p.add_argument("--max-batch", type=int, default=None,
                   help="images per batched call (default: 96 on the CPU; on a GPU as many as fit in its free memory)")
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
    public = [row.key for row in registry.FAMILIES if row.public is not None]
    p.add_argument("--base", default=registry.SDXL.key,
                   help=f"{', '.join(public)} (public configs, nothing downloaded), toy, a model folder or a hub id")
    p.add_argument("--resolution", type=int, default=None, help="training image size in pixels (default: the base's own)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="compute dtype: bf16 on sm80+ (A100, RTX 30xx/40xx), fp16 on a T4 (sm75)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB of your GPU: says whether it fits, and what to lower")
    p.add_argument("--keep-encoders", action="store_true", help="count the text encoders and VAE as kept on the GPU")
    _add_dataclass_flags(p, TrainConfig, skip=("seed", "lr", "steps", "checkpoint_every", "preset_scale"))
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("doctor", help="this machine's environment, and every path the kit computes with checked "
                                      "against its reference (PASS/FAIL/SKIP lines; exit 0 ok, 1 a check failed, 2 it could not run)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when there is one)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("convert", help="a LoRA in other keys: kohya (ComfyUI, A1111), the kit's diffusers keys, "
                                       "or DiffSynth-Studio's own")
    p.add_argument("lora", type=Path)
    p.add_argument("--to", choices=("kohya", "diffusers", "diffsynth"), required=True)
    p.add_argument("--out", type=Path, required=True)
    common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="what a LoRA file is (format, family, rank, alpha, metadata) and whether it "
                                       "will do anything on BASE: modules matched, left out and why, strength per "
                                       "loader; exit 1 when nothing or only part of it applies")
    p.add_argument("lora", type=Path, help="the LoRA file (.safetensors)")
    p.add_argument("--base", default=None,
                   help="the base to check it against: a family key, toy, a model folder or a hub id "
                        "(module names from its config, no weights); without it, the file alone")
    p.set_defaults(func=cmd_inspect)

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
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # paths given as Path too
    given = list(argv)  # as typed: what the resume line repeats
    for i in range(len(argv) - 1):  # "--scales -1,0,1": a value that starts with "-" is not an option here
        if argv[i] in ("--scales", "--seeds", "--weights") and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"{argv[i]}={argv[i + 1]}", ""]
    args = build_parser().parse_args([a for a in argv if a != ""])
    try:
        _check_inputs(args)  # before any model library is imported: bad input fails in a moment
    except (OSError, ValueError, UserError) as e:  # FileNotFoundError, OutputExistsError, ImageInputError, config
        print(f"difflora: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (training stops at a step boundary: train.py)
        print(f"difflora: {interrupted_line(args, given, e)}", file=sys.stderr)
        return 130


def _run(args) -> int:
    """The command, with the errors a user can fix printed as one line (exit 2)."""
    from .distributed import PeerFailedError
    from .files import OutputExistsError
    from .images import ImageInputError
    from .lora import LoraMismatchError
    from .plan import OutOfMemoryAdvice
    from .train import NonFiniteLossError

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda msg, category, *a, **k: print(  # a report that failed: "warning" (LoRA 2 is safe)
            f"difflora: {getattr(category, 'cli_label', 'note')}: {msg}", file=sys.stderr)
        try:
            if args.command in ("doctor", "inspect"):  # their own exit codes; doctor's --device is what it checks
                return args.func(args)
            with _forced_device(getattr(args, "device", None)):
                args.func(args)
        except (UserError, OutputExistsError, ImageInputError, LoraMismatchError, NonFiniteLossError, OutOfMemoryAdvice,
                PeerFailedError, FileNotFoundError, NotImplementedError, ValueError) as e:
            print(f"difflora: error: {e}", file=sys.stderr)
            return 2
    return 0


# Commands whose TrainConfig is built from the defaults and the flags (evaluate --quick starts from
# demo.quick_configs, which needs the model libraries: checked when it runs).
_CONFIGURED = ("train", "pair", "pairs", "plan")


def _check_inputs(args) -> None:
    """The checks that need no model, before torch or diffusers is imported: input images readable,
    LoRA files present and safetensors, the pairs metadata present, the training settings valid
    (TrainConfig's own checks), prompts not empty, no output there already without --force (by the
    rule of the function the command calls: `_outputs`). The commands check the same again, and
    what needs the model (sizes, keys), once it is loaded."""
    from .files import check_lora_path, check_writable
    from .images import load_image
    from .toy.pairs import check_metadata

    if args.command in _CONFIGURED or (args.command == "evaluate" and not args.quick) \
            or (args.command == "stability" and args.metadata is not None):
        _train_cfg(args)
    if args.command in ("train", "pair"):
        _check_prompts([args.prompt])
    if args.command == "sample":
        _check_prompts(args.prompt)
        _train_cfg_from(eight_bit=args.eight_bit, preset_mode=args.preset_mode)
    if args.command == "pairs":
        _rank_energy(args.rank_out, args.energy, "--rank-out")
        if args.checkpoint_every:  # a flag every TrainConfig field gets; pairs would ignore it, silently
            raise UserError("pairs writes no checkpoints (--checkpoint-every): a killed run keeps no partial pair. "
                            "Train long pairs one at a time with `difflora pair ... --checkpoint-every N`")
    if args.command == "average":
        _rank_energy(args.rank, args.energy, "--rank")
    if args.command == "stability":
        _stability_counts(args)
    for name in ("image", "image1", "image2"):
        if getattr(args, name, None) is not None:
            with warnings.catch_warnings():  # "converted RGBA to RGB": said once, by the command that reads it
                warnings.simplefilter("ignore")
                load_image(getattr(args, name))
    for name in ("lora", "preset_lora"):
        if getattr(args, name, None) is not None:
            check_lora_path(getattr(args, name))
    for path in getattr(args, "loras", None) or []:
        check_lora_path(path)
    if getattr(args, "metadata", None) is not None:
        check_metadata(args.metadata)
    if not getattr(args, "force", True):
        for path in _outputs(args):
            check_writable(path, False)


def _check_prompts(prompts: list[str]) -> None:
    if any(not p or not p.strip() for p in prompts):
        raise UserError("a --prompt is empty: give the caption of the image, e.g. --prompt 'a red circle on a blue "
                        "background'")


def _outputs(args) -> list[Path]:
    """The paths the command refuses to overwrite without --force, by the rule of what it calls:
    train: pair_files.train_stage_to_file (OUT, and with --preset-lora OUT.report.json); pair:
    pair_files.train_pair_to_folder (DIR/lora1 unless --resume finds it finished, DIR/lora2,
    DIR/report.json); every other command that writes: --out as a whole (sample also --images).
    On SD 1.x / SDXL the kohya copies beside the LoRAs (NAME.kohya.safetensors) depend on the base's
    family: the command checks those once it has resolved the base. tests/test_bad_input.py holds
    these rules to the library's, file set by file set."""
    if args.command == "train":
        step2_report = args.preset_lora is not None and not args.no_report
        return [args.out, *([args.out.with_suffix(".report.json")] if step2_report else [])]
    if args.command == "pair":
        lora1, lora2 = args.out / "lora1.safetensors", args.out / "lora2.safetensors"
        keep1 = args.resume and lora1.is_file()  # resuming after step 1 finished: kept, not written
        return [*([] if keep1 else [lora1]), lora2, *([] if args.no_report else [args.out / "report.json"])]
    if args.command == "sample" and args.images is not None:
        return [args.out, args.images]
    out = getattr(args, "out", None)
    return [] if out is None else [out]


def interrupted_line(args, argv: list[str], error: KeyboardInterrupt | None = None) -> str:
    """What a Ctrl-C left, in one line: for `train` and `pair` the checkpoint (the one the first Ctrl-C
    wrote at a step boundary: `error`, a train.TrainingInterrupted; else the one on disk) and the same
    command with --resume; for the others what was not written."""
    if args.command == "pairs":
        return (f"interrupted: nothing written ({args.out} appears only when every pair is done; `difflora pairs` "
                "keeps no checkpoint: run it again to start over)")
    if args.command not in ("train", "pair"):
        return "interrupted (Ctrl-C)"
    from .checkpoint import checkpoint_path, saved_step

    resume = shlex.join(["difflora", *argv, *([] if args.resume else ["--resume"])])
    cfg = _train_cfg(args)
    if args.command == "train":
        lora1 = lora2 = None
        found = [checkpoint_path(args.out)]
    else:
        lora1, lora2 = args.out / "lora1.safetensors", args.out / "lora2.safetensors"
        found = [checkpoint_path(lora2)] + ([] if lora1.is_file() else [checkpoint_path(lora1)])
    written = getattr(error, "checkpoint", None)  # the checkpoint the loop wrote when it stopped
    for ckpt in [written] if written is not None else found:
        step = saved_step(ckpt) if Path(ckpt).is_file() else None
        if step is None:
            continue
        where = f"after optimizer step {step} of {cfg.steps}: checkpoint {ckpt}"
        if lora1 is None:
            return f"interrupted {where}; resume with: {resume}"
        if Path(ckpt) == checkpoint_path(lora2):
            return f"interrupted while training LoRA 2, {where}, LoRA 1 finished at {lora1}; resume with: {resume}"
        earlier = f" after deleting {lora1}, an earlier run's (--resume keeps a finished LoRA 1)" if lora1.is_file() else ""
        return f"interrupted while training LoRA 1, {where}; resume with: {resume}{earlier}"
    if lora1 is not None and lora1.is_file():
        return (f"interrupted while training LoRA 2, before a checkpoint: LoRA 1 is finished at {lora1}; "
                f"resume with: {resume}")
    return ("interrupted before a checkpoint was written: nothing to resume, nothing written; run the command again"
            + ("" if cfg.checkpoint_every else " (--checkpoint-every N also keeps one every N steps, for a run "
                                               "stopped at once)"))


@contextlib.contextmanager
def _forced_device(device: str | None):
    """--device: $DIFFLORA_DEVICE for the command (every backend the command loads goes there)."""
    if device is None:
        yield
        return
    from .backends import DEVICE_VARIABLE, check_device

    before = os.environ.get(DEVICE_VARIABLE)
    os.environ[DEVICE_VARIABLE] = check_device(device)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEVICE_VARIABLE, None)
        else:
            os.environ[DEVICE_VARIABLE] = before


if __name__ == "__main__":
    sys.exit(main())
