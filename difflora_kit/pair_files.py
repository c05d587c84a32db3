"""Step 1 and step 2 written to files, as `difflora train` and `difflora pair` write them.

    written = train_pair_to_folder(DIR, image1, image2, prompt, cfg, base, resume=True)
        -> DIR/lora1.safetensors                    LoRA 1   (checkpoint: DIR/lora1.checkpoint.safetensors)
           DIR/lora2.safetensors                    LoRA 2   (checkpoint: DIR/lora2.checkpoint.safetensors)
           DIR/report.json                          LoRA 2's health report, on the plain base
    written = train_stage_to_file(OUT, image, prompt, cfg, base, preset=LORA1)
        -> OUT, OUT.report.json (step 2)

Every output is checked (files.check_writable) before anything is read or trained, so bad input
fails fast. A LoRA is written whole (atomically) before its checkpoint is dropped: a kill between the
two leaves a finished LoRA and a stale checkpoint, never a lost run. With `resume`, a checkpoint left
by a killed run continues (cfg.checkpoint_every), and a finished DIR/lora1.safetensors skips step 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import backends, health, lora
from .backends import Base
from .checkpoint import checkpoint_path
from .config import TrainConfig
from .files import check_writable
from .images import check_pair, load_image
from .pair import load_lora, prepare_base, train_stage
from .train import TrainResult


def health_report(plain_base, lora2: lora.LoraFile, prompt: str, image2: np.ndarray) -> dict:
    """LoRA 2's health report on the plain base (difflora_kit.health), stamped into its metadata."""
    report = health.report(plain_base, lora2, prompt, image2)
    health.stamp(lora2, report)
    return report


def report_line(report: dict, shown: str | Path, tag: str = "LoRA 2") -> str:
    """The report's verdict line and advice, as the CLI prints them; `shown`: the report's path as printed."""
    return f"{tag} health: {report['line']} [{report['seconds']:.1f} s; {shown}]\n  try: {report['advice']}"


def finish(path: Path, the_lora: lora.LoraFile, checkpoint: Path) -> None:
    """Write the finished LoRA, then drop its checkpoint (in that order: a kill between the two
    leaves a finished LoRA and a stale checkpoint, never a lost run)."""
    lora.save(path, the_lora)
    Path(checkpoint).unlink(missing_ok=True)


def _image(image: Path | np.ndarray, size: int, resize: bool) -> np.ndarray:
    """A file read at the base's size (images.load_image: `resize` to fit it), or an (H, W, 3) array as it is."""
    return image if isinstance(image, np.ndarray) else load_image(image, size, resize)


@dataclasses.dataclass
class WrittenStage:
    """What `train_stage_to_file` wrote: the LoRA, how it trained, and step 2's health report."""

    path: Path
    result: TrainResult
    report: dict | None = None
    """LoRA 2's health report (None: step 1, or not asked for)."""
    report_path: Path | None = None


def stage_report_path(out: Path) -> Path:
    """lora2.safetensors -> lora2.report.json: where `train_stage_to_file` writes step 2's health report."""
    return Path(out).with_suffix(".report.json")


def train_stage_to_file(out: Path, image: Path | np.ndarray, prompt: str, cfg: TrainConfig,
                        base: str | Path | Base = "toy", preset: Path | lora.LoraFile | None = None,
                        report: bool = True, resume: bool = False, force: bool = False, resize: bool = False,
                        progress: bool = True) -> WrittenStage:
    """`difflora train`: one LoRA into `out` (step 2 when `preset`, LoRA 1 or its file, is given),
    checkpointed beside it (checkpoint.checkpoint_path), `resume` continuing from that checkpoint;
    with `report`, step 2's health report into OUT.report.json. Outputs are checked before anything
    is read or trained; `image`: a file (read at the base's size) or an (H, W, 3) array."""
    out = Path(out)
    check_writable(out, force)
    report_path = stage_report_path(out) if preset is not None and report else None
    if report_path is not None:
        check_writable(report_path, force)
    base = backends.resolve_base(base)
    image = _image(image, backends.sample_size(base), resize)
    preset = preset if preset is None or isinstance(preset, lora.LoraFile) else load_lora(preset, base)
    ckpt = checkpoint_path(out)
    result = train_stage(image, prompt, cfg, base, preset, progress, checkpoint=ckpt, resume=resume)
    figures = (health_report(prepare_base(base, cfg, encode=health.report_encodes(base, prompt, image)), result.lora,
                             prompt, image) if report_path else None)
    finish(out, result.lora, ckpt)
    if figures is not None:
        health.save(report_path, figures)
    return WrittenStage(out, result, figures, report_path)


@dataclasses.dataclass
class WrittenPair:
    """What `train_pair_to_folder` wrote: DIR/lora1.safetensors, DIR/lora2.safetensors, DIR/report.json."""

    paths: tuple[Path, Path]
    lora1: lora.LoraFile
    step1: TrainResult | None
    """None: resumed after step 1 had finished (its LoRA file was kept)."""
    step2: TrainResult
    report: dict | None = None
    """LoRA 2's health report (None: not asked for)."""
    report_path: Path | None = None

    @property
    def resumed_after_step1(self) -> bool:
        return self.step1 is None


def train_pair_to_folder(out: Path, image1: Path | np.ndarray, image2: Path | np.ndarray, prompt: str,
                         cfg: TrainConfig, base: str | Path | Base = "toy", report: bool = True, resume: bool = False,
                         force: bool = False, resize: bool = False, progress: bool = True) -> WrittenPair:
    """`difflora pair`: step 1 and step 2 into DIR/lora1.safetensors and DIR/lora2.safetensors, each
    checkpointed beside itself; with `report`, LoRA 2's health report (on the plain base) into
    DIR/report.json. `resume`: a finished DIR/lora1.safetensors is kept (step 1 skipped) and a
    checkpoint continues. Outputs are checked before anything is read or trained; image1, image2:
    files (read at the base's size) or (H, W, 3) arrays."""
    out = Path(out)
    paths = out / "lora1.safetensors", out / "lora2.safetensors"
    report_path = out / "report.json" if report else None
    step1_done = resume and paths[0].is_file()  # resuming after step 1 finished: keep its LoRA
    for path in [*paths[1 if step1_done else 0:], *([report_path] if report_path else [])]:
        check_writable(path, force)
    base = backends.resolve_base(base)
    size = backends.sample_size(base)
    image1, image2 = _image(image1, size, resize), _image(image2, size, resize)
    check_pair(image1, image2)
    step1 = None
    if step1_done:
        lora1 = load_lora(paths[0], base)
        if progress:
            print(f"resuming: {paths[0]} is finished, step 1 skipped")
    else:
        step1 = train_stage(image1, prompt, cfg, base, None, progress, checkpoint=checkpoint_path(paths[0]), resume=resume)
        lora1 = step1.lora
        finish(paths[0], lora1, checkpoint_path(paths[0]))
    step2 = train_stage(image2, prompt, cfg, base, lora1, progress, checkpoint=checkpoint_path(paths[1]), resume=resume)
    step2.lora.meta["image1_digest"] = lora1.meta.get("image_digest", "")
    figures = (health_report(prepare_base(base, cfg, encode=health.report_encodes(base, prompt, image2)), step2.lora,
                             prompt, image2) if report_path else None)
    finish(paths[1], step2.lora, checkpoint_path(paths[1]))
    if figures is not None:
        health.save(report_path, figures)
    return WrittenPair(paths, lora1, step1, step2, figures, report_path)
