"""Training checkpoints: survive a dropped Colab session or a killed process, resume bit-exactly.

One safetensors file (never a pickle), written atomically every `checkpoint_every` steps:
    param/<name>                 the trainable LoRA parameters
    adam/<name>/exp_avg          AdamW's moments and step count, per parameter
    adam/<name>/exp_avg_sq
    adam/<name>/step
    rng/noise                    the noise generator's state (timesteps and noise of later steps)
and in the header: the step reached, the losses so far, and a fingerprint of the run (settings,
image, prompt, preset) so that a checkpoint is never resumed into a different run; under fp16 loss
scaling also the scaler's state (its scale S and clean-step count: a resumed run goes on with the
same S, so its gradients round and its steps skip as the uninterrupted run's) and the skipped steps.
Its name says what it is (`*.checkpoint.safetensors`): it never looks like a finished LoRA.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_file

MOMENTS = ("exp_avg", "exp_avg_sq", "step")


class CheckpointMismatchError(ValueError):
    """A checkpoint from another run (other settings, image, prompt or preset)."""


def checkpoint_path(out: Path) -> Path:
    """lora.safetensors -> lora.checkpoint.safetensors"""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".checkpoint.safetensors")


def saved_step(path: Path) -> int | None:
    """The step a checkpoint holds the state after, from its header alone (None: no readable checkpoint)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except (OSError, KeyError, ValueError, SafetensorError):
        return None


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save(path: Path, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
         step: int, generator: torch.Generator, losses: list[float], run: str,
         scaler: torch.amp.GradScaler | None = None, skipped: list[int] = ()) -> None:
    """Write the state after `step` steps atomically; `scaler`: its state is kept when it is enabled."""
    tensors = {"rng/noise": generator.get_state()}
    for name, p in named_params:
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam/{name}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"step": str(step), "losses": json.dumps(losses), "run": run}
    if scaler is not None and scaler.is_enabled():  # fp16: {"scale": 65536.0, "_growth_tracker": 12, ...}
        meta["loss_scaler"] = json.dumps(scaler.state_dict())
        meta["skipped_steps"] = json.dumps(list(skipped))
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def restore(path: Path, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
            generator: torch.Generator, run: str,
            scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[float], list[int]]:
    """Load a checkpoint into the parameters, optimizer, generator and (enabled) loss scaler; returns
    (step, losses, skipped steps). A scaler state absent (a checkpoint of an fp32 or bf16 run resumed in
    fp16) leaves the scaler as it starts."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("run") != run:
            raise CheckpointMismatchError(
                f"{path} is a checkpoint of another run (other settings, image, prompt or preset): "
                "delete it, or resume with the settings it was made with")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(tensors[f"param/{name}"])
            state = {k: tensors[f"adam/{name}/{k}"] for k in MOMENTS if f"adam/{name}/{k}" in tensors}
            state = {k: v if k == "step" else v.to(p.device) for k, v in state.items()}  # AdamW keeps step on the CPU
            if state:
                optimizer.state[p] = state
    generator.set_state(tensors["rng/noise"])
    if scaler is not None and scaler.is_enabled() and "loss_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["loss_scaler"]))
    return int(meta["step"]), json.loads(meta["losses"]), json.loads(meta.get("skipped_steps", "[]"))
