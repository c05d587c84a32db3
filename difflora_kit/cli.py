"""The `difflora` command line. Every TrainConfig field is a flag of the same name.

    difflora train IMAGE --prompt TEXT --out LORA.safetensors [--preset-lora L1.safetensors]
    difflora pair IMAGE1 IMAGE2 --prompt TEXT --out DIR
    difflora sample --lora L.safetensors --prompt TEXT [--prompt ...] --scales -1,0,1,2 --seeds 0,1,2 --out grid.png
    difflora evaluate [--pairs METADATA] [--axis detail] --out DIR
    difflora demo [--out DIR]
    difflora make-pairs --out DIR ; difflora pretrain --out DIR
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


def _sample_cfg(args) -> SampleConfig:
    return SampleConfig(**{k: v for k, v in (("steps", args.sample_steps), ("guidance", args.guidance),
                                             ("rescale", args.rescale)) if v is not None})


def _add_sample_flags(p):
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 2.0)")
    p.add_argument("--rescale", type=float, default=None, help="guidance rescale (default 0.7)")


def _model_size(base) -> int:
    from . import backends

    return backends.sample_size(base)


def cmd_train(args) -> None:
    from . import lora, pair
    from .files import check_writable
    from .images import load_image

    check_writable(args.out, args.force)
    image = load_image(args.image, _model_size(args.base), args.resize)
    preset = lora.load(args.preset_lora) if args.preset_lora else None
    result = pair.train_stage(image, args.prompt, _train_cfg(args), args.base, preset)
    lora.save(args.out, result.lora)
    print(f"wrote {args.out} (stage {result.lora.meta['stage']}, {len(result.losses)} steps in {result.seconds:.1f} s, "
          f"final loss {result.losses[-1]:.4f})")


def cmd_pair(args) -> None:
    from . import pair
    from .files import check_writable
    from .images import load_image

    for name in ("lora1.safetensors", "lora2.safetensors"):
        check_writable(Path(args.out) / name, args.force)
    size = _model_size(args.base)
    image1 = load_image(args.image1, size, args.resize)
    image2 = load_image(args.image2, size, args.resize)
    result = pair.train_pair(image1, image2, args.prompt, _train_cfg(args), args.base)
    paths = pair.save_pair(result, args.out, args.force)
    print(f"wrote {paths[0]} and {paths[1]} (step 1 {result.step1.seconds:.1f} s, step 2 {result.step2.seconds:.1f} s)")


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
    the_lora = lora.load(args.lora) if args.lora else None
    preset = lora.load(args.preset_lora) if args.preset_lora else None
    backend = pair.prepare_base(args.base, TrainConfig(eight_bit=args.eight_bit), preset)
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

    print(f"wrote {make_pairs(args.out, args.per_axis, args.seed, args.force)}")


def cmd_pretrain(args) -> None:
    from .files import check_writable
    from .toy.pretrain import pretrain

    check_writable(args.out, args.force)
    pretrain(args.out, args.steps, args.batch, args.lr, args.seed, args.eval_every)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflora", description="Differential LoRA training for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, base=True):
        if base:
            p.add_argument("--base", default="toy", help="base model: 'toy' (built in) or a model folder")
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    p = sub.add_parser("train", help="train one LoRA (step 1; step 2 with --preset-lora)")
    p.add_argument("image", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset-lora", "--preset_lora_path", dest="preset_lora", type=Path, default=None,
                   help="LoRA 1: fused into the base first, which makes this step 2")
    p.add_argument("--resize", action="store_true", help="resize the image to the model's size")
    _add_dataclass_flags(p, TrainConfig)
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pair", help="step 1 on IMAGE1, then step 2 on IMAGE2: DIR/lora1, DIR/lora2")
    p.add_argument("image1", type=Path)
    p.add_argument("image2", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resize", action="store_true", help="resize both images to the model's size")
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

    p = sub.add_parser("make-pairs", help="write toy image pairs + metadata.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-axis", type=int, default=24)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # "--scales -1,0,1": a value that starts with "-" is not an option here
        if argv[i] in ("--scales", "--seeds") and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"{argv[i]}={argv[i + 1]}", ""]
    args = build_parser().parse_args([a for a in argv if a != ""])
    from .files import OutputExistsError
    from .images import ImageInputError
    from .lora import LoraMismatchError
    from .train import NonFiniteLossError

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"difflora: note: {msg}", file=sys.stderr)
        try:
            args.func(args)
        except (UserError, OutputExistsError, ImageInputError, LoraMismatchError, NonFiniteLossError,
                FileNotFoundError, NotImplementedError, ValueError) as e:
            print(f"difflora: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
