"""A training run killed mid-way (SIGKILL) and resumed ends with the same LoRA, bit for bit, as an
uninterrupted run with the same seed, and the kill leaves no file that looks finished."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from difflora_kit import lora
from difflora_kit.checkpoint import checkpoint_path
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.toy.pairs import read_pairs

STEPS, EVERY = 60, 5


def _train(out, *extra):
    row = read_pairs(DEFAULT_PAIRS)[0]
    cmd = [sys.executable, "-m", "difflora_kit.cli", "train", row["image1"], "--prompt", row["prompt"], "--out", str(out),
           "--steps", str(STEPS), "--batch", "2", "--checkpoint-every", str(EVERY), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    log = open(out.with_name(f".{out.name}.{len(extra)}.log"), "w+")  # hidden: not a result
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    return proc


def _stderr(proc):
    proc.log.seek(0)
    return proc.log.read()


def _checkpoint_step(path):
    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except (FileNotFoundError, OSError, KeyError, ValueError):
        return 0


def test_a_killed_run_resumes_to_the_same_lora(tmp_path):
    whole, killed = tmp_path / "whole.safetensors", tmp_path / "killed.safetensors"
    ckpt = checkpoint_path(killed)
    run = _train(killed)
    deadline = time.time() + 300
    while _checkpoint_step(ckpt) < 3 * EVERY and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed: raise STEPS"
    run.send_signal(signal.SIGKILL)
    run.wait()
    reached = _checkpoint_step(ckpt)
    assert EVERY <= reached < STEPS
    # nothing that looks like a finished LoRA: only the checkpoint (and maybe a hidden .partial)
    assert not killed.exists()
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {ckpt.name}

    resumed = _train(killed, "--resume")
    assert resumed.wait(timeout=900) == 0, _stderr(resumed)
    assert not ckpt.exists()  # dropped once the LoRA was written
    uninterrupted = _train(whole)
    assert uninterrupted.wait(timeout=900) == 0, _stderr(uninterrupted)
    a, b = lora.load(whole).tensors, lora.load(killed).tensors
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    out = tmp_path / "l.safetensors"
    run = _train(out)
    while _checkpoint_step(checkpoint_path(out)) < EVERY and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    other = _train(out, "--resume", "--lr", "0.001")  # other settings: never mixed into this checkpoint
    assert other.wait(timeout=900) == 2
    assert "checkpoint of another run" in _stderr(other) and not out.exists()


def test_checkpoint_every_must_not_be_negative():
    from difflora_kit.config import TrainConfig

    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
