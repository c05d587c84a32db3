"""Step 1 and step 2 written to files, as `difflora train` and `difflora pair` write them.

    written = train_pair_to_folder(DIR, image1, image2, prompt, cfg, base, resume=True)
        -> DIR/lora1.safetensors                    LoRA 1   (checkpoint: DIR/lora1.checkpoint.safetensors)
           DIR/lora2.safetensors                    LoRA 2   (checkpoint: DIR/lora2.checkpoint.safetensors)
           DIR/lora{1,2}.kohya.safetensors          SD 1.x / SDXL: the same LoRAs for ComfyUI / AUTOMATIC1111
           DIR/report.json                          LoRA 2's health report, on the plain base
    written = train_stage_to_file(OUT, image, prompt, cfg, base, preset=LORA1)
        -> OUT, OUT.report.json (step 2)

Every output is checked (files.check_writable) before anything is read or trained, so bad input
fails fast. A LoRA is written whole (atomically) before its checkpoint is dropped: a kill between the
two leaves a finished LoRA and a stale checkpoint, never a lost run. With `resume`, a checkpoint left
by a killed run continues (cfg.checkpoint_every), and a finished DIR/lora1.safetensors skips step 1.

LoRA 2 is written before its health report runs, and the report never costs it:

    train step 2 -> write LoRA 2, drop its checkpoint -> free the training model -> load the plain base
    -> report (batches sized to the free memory) -> LoRA 2 rewritten with the verdict in its metadata -> report.json

A report that fails (a GPU out of memory, or any other error) leaves LoRA 2 as written (no health_*
fields) and no report.json, warns (ReportFailedWarning: LoRA 2 is safe at PATH, what failed, what to
do) and returns normally: the LoRAs are the product, complete on disk, and an error exit would invite a
rerun that trains them again. `report_on_file` runs the report later on the file.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from pathlib import Path

import numpy as np
import torch

from . import backends, health, lora
from .backends import Base
from .checkpoint import checkpoint_path
from .config import TrainConfig
from .files import check_writable
from .images import check_pair, load_image
from .pair import load_lora, prepare_base, train_stage
from .plan import OutOfMemoryAdvice
from .train import TrainResult


class ReportFailedWarning(UserWarning):
    """LoRA 2's health report failed after LoRA 2 was written: the LoRA is safe on disk, the report is missing."""

    cli_label = "warning"  # the CLI prints it as "difflora: warning: ..."


def release_memory() -> None:
    """Free what a finished stage left behind before the next model loads: objects in reference cycles,
    and on a GPU the blocks PyTorch's caching allocator keeps (so that loading and the report's batch
    sizing see them free)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stamp_and_save(path: Path, lora2: lora.LoraFile, figures: dict, report_path: Path) -> None:
    """After a report: LoRA 2 rewritten with the verdict in its metadata (atomically: until then the file
    written before the report stays), then the report's JSON."""
    health.stamp(lora2, figures)
    lora.save_files(path, lora2)
    health.save(report_path, figures)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, raw or explained (plan.OutOfMemoryAdvice and its kinds)."""
    return isinstance(error, (torch.OutOfMemoryError, OutOfMemoryAdvice))


def report_failure(path: Path, report_path: Path, error: BaseException, redo: str, also: str = "") -> str:
    """The warning of a failed report: LoRA 2 is safe at `path` (and `also`), what failed, what to do.
    `redo`: the call that runs the report later (report_on_file with these files)."""
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    what = ("the GPU ran out of memory" if is_out_of_memory(error) else "it raised an error") + \
        f" ({type(error).__name__}{': ' + first if first else ''})"
    lines = [f"LoRA 2 is safe on disk at {path}{also}, complete; only its health report failed: {what}. "
             f"{report_path} was not written and LoRA 2's metadata has no health_* fields. Do not retrain."]
    if is_out_of_memory(error):
        lines.append("The report loads the plain base after training and sizes its batches to the free GPU memory; "
                     "this GPU had too little left. To get the report, run it later with nothing else on the GPU "
                     f"and 2 rows a call, in Python:\n  {redo}")
    else:
        lines.append(f"If it is a bug of the kit, please report it with the error above. Run the report later, in "
                     f"Python:\n  {redo}")
    lines.append("Or leave the report out next time: --no-report.")
    return "\n".join(lines)


def redo_call(path: Path, image2, prompt: str, base, report_path: Path, cfg: TrainConfig, resize: bool) -> str:
    """The report_on_file call of a failed report, ready to paste (an image given as an array: IMAGE2);
    the `redo` of report_or_warn."""
    image = repr(str(image2)) if isinstance(image2, (str, Path)) else "IMAGE2"
    extra = ("" if cfg.eight_bit else ", eight_bit=False") + (", resize=True" if resize else "")
    return (f"from difflora_kit import health, pair_files; pair_files.report_on_file({str(path)!r}, {image}, "
            f"{prompt!r}, {str(base)!r}, {str(report_path)!r}, health_cfg=health.HealthConfig(max_batch=2){extra})")


def report_written(path: Path, lora2: lora.LoraFile, base: Base, cfg: TrainConfig, prompt: str, image2: np.ndarray,
                   report_path: Path, health_cfg: health.HealthConfig = health.HealthConfig()) -> dict:
    """The health report of LoRA 2, already written at `path`: the training model freed first (release_memory),
    the plain base loaded, the report run, the plain base freed; then stamp_and_save. Raises what the
    report raises (the file at `path` stays as it was)."""
    release_memory()  # the step-2 model is gone (train_stage returned): its memory is free before the plain base loads
    plain = prepare_base(base, cfg, encode=health.report_encodes(base, prompt, image2, health_cfg))
    try:
        figures = health.report(plain, lora2, prompt, image2, health_cfg)
    finally:
        del plain
        release_memory()
    stamp_and_save(path, lora2, figures, report_path)
    return figures


def report_or_warn(path: Path, lora2: lora.LoraFile, base: Base, cfg: TrainConfig, prompt: str, image2: np.ndarray,
                   report_path: Path, redo: str, also: str = "", shown: tuple[Path, Path] | None = None,
                   ) -> tuple[dict | None, str | None]:
    """report_written, or on any error (out of memory included) a ReportFailedWarning and LoRA 2 left as
    written: (figures, None) or (None, the warning's text). `shown`: (LoRA 2, report) as the warning names
    them (None: path, report_path; `difflora pairs` names the final folder, not its temp one)."""
    try:
        return report_written(path, lora2, base, cfg, prompt, image2, report_path), None
    except Exception as e:
        message = report_failure(*(shown or (path, report_path)), e, redo, also)
    release_memory()  # after the error is gone: its traceback held the failed batch's tensors
    warnings.warn(message, ReportFailedWarning, stacklevel=3)
    return None, message


def report_on_file(path: Path, image2: Path | np.ndarray, prompt: str, base: str | Path | Base = "toy",
                   report_path: Path | None = None, health_cfg: health.HealthConfig = health.HealthConfig(),
                   eight_bit: bool = True, resize: bool = False) -> dict:
    """The health report of a LoRA 2 file (what `difflora pair` and `difflora train --preset-lora` run after
    writing it; run it later when that failed): the verdict stamped into the file (rewritten atomically) and
    the report written to `report_path` (None: DIR/report.json beside DIR/lora2.safetensors, else
    OUT.report.json). `image2`: the image LoRA 2 was trained on (a file, read at the base's size, or an
    (H, W, 3) array); `prompt`: its prompt; `eight_bit`: the plain base in 8-bit, as it trained."""
    path = Path(path)
    report_path = Path(report_path) if report_path else (path.parent / "report.json" if path.name == "lora2.safetensors"
                                                          else stage_report_path(path))
    base = backends.resolve_base(base)
    image2 = _image(image2, backends.sample_size(base), resize)
    return report_written(path, load_lora(path, base), base, TrainConfig(eight_bit=eight_bit), prompt, image2,
                          report_path, health_cfg)


def report_line(report: dict, shown: str | Path, tag: str = "LoRA 2") -> str:
    """The report's verdict line and advice, as the CLI prints them; `shown`: the report's path as printed."""
    return f"{tag} health: {report['line']} [{report['seconds']:.1f} s; {shown}]\n  try: {report['advice']}"


def finish(path: Path, the_lora: lora.LoraFile, checkpoint: Path) -> None:
    """Write the finished LoRA, then drop its checkpoint (in that order: a kill between the two
    leaves a finished LoRA and a stale checkpoint, never a lost run); for SD 1.x / SDXL with its kohya
    copy beside it (lora.save_files)."""
    lora.save_files(path, the_lora)
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
    """LoRA 2's health report (None: step 1, not asked for, or it failed: report_error)."""
    report_path: Path | None = None
    report_error: str | None = None
    """Why the report asked for is missing (the ReportFailedWarning's text); LoRA 2 is written all the same."""


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
    if base.family.kohya_beside:  # OUT.kohya.safetensors is written beside it (lora.save_files)
        check_writable(lora.kohya_path(out), force)
    given, image = image, _image(image, backends.sample_size(base), resize)
    preset = preset if preset is None or isinstance(preset, lora.LoraFile) else load_lora(preset, base)
    ckpt = checkpoint_path(out)
    result = train_stage(image, prompt, cfg, base, preset, progress, checkpoint=ckpt, resume=resume)
    finish(out, result.lora, ckpt)  # the LoRA on disk before anything else runs
    if report_path is None:
        return WrittenStage(out, result)
    redo = redo_call(out, given, prompt, base, report_path, cfg, resize)
    figures, error = report_or_warn(out, result.lora, base, cfg, prompt, image, report_path, redo)
    return WrittenStage(out, result, figures, report_path if figures is not None else None, error)


@dataclasses.dataclass
class WrittenPair:
    """What `train_pair_to_folder` wrote: DIR/lora1.safetensors, DIR/lora2.safetensors, DIR/report.json."""

    paths: tuple[Path, Path]
    lora1: lora.LoraFile
    step1: TrainResult | None
    """None: resumed after step 1 had finished (its LoRA file was kept)."""
    step2: TrainResult
    report: dict | None = None
    """LoRA 2's health report (None: not asked for, or it failed: report_error)."""
    report_path: Path | None = None
    report_error: str | None = None
    """Why the report asked for is missing (the ReportFailedWarning's text); both LoRAs are written all the same."""

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
    base = backends.resolve_base(base)
    copies = [lora.kohya_path(p) for p in paths] if base.family.kohya_beside else []  # lora.save_files
    for path in [*paths[1 if step1_done else 0:], *copies[1 if step1_done else 0:], *([report_path] if report_path else [])]:
        check_writable(path, force)
    size = backends.sample_size(base)
    given = image1, image2
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
    finish(paths[1], step2.lora, checkpoint_path(paths[1]))  # LoRA 2 on disk before the report runs
    if report_path is None:
        return WrittenPair(paths, lora1, step1, step2)
    redo = redo_call(paths[1], given[1], prompt, base, report_path, cfg, resize)
    figures, error = report_or_warn(paths[1], step2.lora, base, cfg, prompt, image2, report_path, redo,
                                    also=f" (LoRA 1 at {paths[0]})")
    return WrittenPair(paths, lora1, step1, step2, figures, report_path if figures is not None else None, error)
