"""Ctrl-C while training: the first one ends the current optimizer step, writes a checkpoint at that step
boundary (checkpoint_every 0 too) and the CLI prints one line, the checkpoint and the command that resumes
(exit 130, no traceback); that command ends with the LoRA an uninterrupted run gives, bit for bit. A second
Ctrl-C stops at once. `difflora pairs` keeps no checkpoint and leaves nothing behind."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from difflora_kit import cli, diffusion, lora, train
from difflora_kit.checkpoint import checkpoint_path, saved_step
from difflora_kit.config import TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.images import load_image
from difflora_kit.pair import prepare_base
from difflora_kit.toy.pairs import read_pairs

ROW = read_pairs(DEFAULT_PAIRS)[0]
STEPS = 40
CLI = [sys.executable, "-m", "difflora_kit.cli"]


def _start(argv, log):
    """`difflora ARGV` as a user runs it, stderr into `log` (an open file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*CLI, *argv], env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)


def _read(log) -> str:
    log.seek(0)
    return log.read()


def _same(a: lora.LoraFile, b: lora.LoraFile) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_ctrl_c_prints_the_checkpoint_and_the_command_that_resumes_it(tmp_path):
    out = tmp_path / "l.safetensors"
    argv = ["train", ROW["image1"], "--prompt", ROW["prompt"], "--out", str(out), "--steps", str(STEPS),
            "--batch", "2"]  # checkpoint_every 0: no checkpoint but the one Ctrl-C writes
    with open(tmp_path / ".interrupted.log", "w+") as log:
        run = _start(argv, log)
        # the progress bar has shown a finished step (tqdm: " 1/40", " 3/40", ...)
        while run.poll() is None and not re.search(rf" [1-9]\d*/{STEPS}\b", _read(log)):
            time.sleep(0.05)
        assert run.poll() is None, f"the run ended before it could be interrupted: raise STEPS\n{_read(log)}"
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=600) == 130
        err = _read(log)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    line = err.rstrip("\n").splitlines()[-1]
    ckpt = checkpoint_path(out)
    step = saved_step(ckpt)
    assert line.startswith(f"difflora: interrupted after optimizer step {step} of {STEPS}: checkpoint {ckpt}; resume with: "), line
    assert 1 <= step < STEPS
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [ckpt.name]  # no LoRA yet

    resume = shlex.split(line.split("resume with: ", 1)[1])  # the printed command, run as printed
    assert resume[0] == "difflora" and resume[1:] == [*argv, "--resume"]
    with open(tmp_path / ".resumed.log", "w+") as log:
        assert _start(resume[1:], log).wait(timeout=900) == 0, _read(log)
    assert not ckpt.exists()
    whole = tmp_path / "whole.safetensors"
    with open(tmp_path / ".whole.log", "w+") as log:
        assert _start([*argv[:5], str(whole), *argv[6:]], log).wait(timeout=900) == 0, _read(log)
    _same(lora.load(whole), lora.load(out))


def _interrupt_at(monkeypatch, calls: int, times: int = 1):
    """Ctrl-C (a real SIGINT to this process) `times` times during the `calls`-th noising of a batch,
    i.e. inside that optimizer step (every step noises once: diffusion.noisy_and_target)."""
    seen = []
    real = diffusion.noisy_and_target

    def noisy(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "noisy_and_target", noisy)
    return seen


def test_the_first_ctrl_c_ends_the_step_and_keeps_its_state(monkeypatch, tmp_path):
    image, cfg = load_image(ROW["image1"]), TrainConfig(steps=6, batch=2)
    ckpt = tmp_path / "l.checkpoint.safetensors"
    _interrupt_at(monkeypatch, calls=3)
    with pytest.raises(train.TrainingInterrupted) as stopped:
        train.train_lora(prepare_base("toy", cfg), image, ROW["prompt"], cfg, progress=False, checkpoint=ckpt)
    assert (stopped.value.step, stopped.value.checkpoint) == (3, ckpt) and saved_step(ckpt) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    monkeypatch.undo()
    resumed = train.train_lora(prepare_base("toy", cfg), image, ROW["prompt"], cfg, progress=False, checkpoint=ckpt,
                               resume=True)
    whole = train.train_lora(prepare_base("toy", cfg), image, ROW["prompt"], cfg, progress=False)
    assert resumed.losses == whole.losses
    _same(resumed.lora, whole.lora)


def test_a_second_ctrl_c_stops_at_once(monkeypatch, tmp_path):
    cfg = TrainConfig(steps=6, batch=2)
    ckpt = tmp_path / "l.checkpoint.safetensors"
    seen = _interrupt_at(monkeypatch, calls=3, times=2)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train.train_lora(prepare_base("toy", cfg), load_image(ROW["image1"]), ROW["prompt"], cfg, progress=False,
                         checkpoint=ckpt)
    assert not isinstance(stopped.value, train.TrainingInterrupted)
    assert len(seen) == 3 and not ckpt.exists()  # inside step 3: nothing more ran, nothing was written
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_pair_interrupted_in_step_2_resumes_there(monkeypatch, tmp_path, capsys):
    out = tmp_path / "pair"
    argv = ["pair", ROW["image1"], ROW["image2"], "--prompt", ROW["prompt"], "--out", str(out), "--steps", "4",
            "--batch", "2", "--no-report"]
    _interrupt_at(monkeypatch, calls=4 + 2)  # step 2 of stage 2
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"difflora: interrupted while training LoRA 2, after optimizer step 2 of 4: checkpoint "
        f"{checkpoint_path(out / 'lora2.safetensors')}, LoRA 1 finished at {out / 'lora1.safetensors'}; "
        f"resume with: {shlex.join(['difflora', *argv, '--resume'])}")
    assert sorted(p.name for p in out.iterdir()) == ["lora1.safetensors", "lora2.checkpoint.safetensors"]
    monkeypatch.undo()
    assert cli.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    assert cli.main([*argv[:6], str(tmp_path / "whole"), *argv[7:]]) == 0
    _same(lora.load(tmp_path / "whole" / "lora2.safetensors"), lora.load(out / "lora2.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == ["lora1.safetensors", "lora2.safetensors"]


def test_pair_interrupted_in_step_1_names_its_checkpoint(monkeypatch, tmp_path, capsys):
    out = tmp_path / "pair"
    argv = ["pair", ROW["image1"], ROW["image2"], "--prompt", ROW["prompt"], "--out", str(out), "--steps", "4",
            "--batch", "2", "--no-report"]
    resume = shlex.join(["difflora", *argv, "--resume"])
    _interrupt_at(monkeypatch, calls=2)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"difflora: interrupted while training LoRA 1, after optimizer step 2 of 4: checkpoint "
        f"{checkpoint_path(out / 'lora1.safetensors')}; resume with: {resume}")
    assert sorted(p.name for p in out.iterdir()) == ["lora1.checkpoint.safetensors"]
    # --force over an earlier pair: its LoRA 1 is still there, and --resume would keep it: the line says so
    (out / "lora1.safetensors").write_bytes(b"an earlier run's")
    monkeypatch.undo()
    _interrupt_at(monkeypatch, calls=2)
    assert cli.main(argv + ["--force"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--resume after deleting {out / 'lora1.safetensors'}, an earlier run's (--resume keeps a finished LoRA 1)")


def test_ctrl_c_before_any_checkpoint_says_nothing_is_kept(monkeypatch, tmp_path, capsys):
    out = tmp_path / "l.safetensors"
    _interrupt_at(monkeypatch, calls=1, times=2)  # the second Ctrl-C: at once, inside step 1
    assert cli.main(["train", ROW["image1"], "--prompt", ROW["prompt"], "--out", str(out), "--steps", "4",
                     "--batch", "2"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("difflora: interrupted before a checkpoint was written: nothing to resume, nothing written")
    assert "--checkpoint-every N" in line
    assert list(tmp_path.iterdir()) == []


def test_pairs_interrupted_leaves_nothing(monkeypatch, tmp_path, capsys):
    out = tmp_path / "many"
    _interrupt_at(monkeypatch, calls=2)
    assert cli.main(["pairs", DEFAULT_PAIRS, "--out", str(out), "--axis", "detail", "--limit", "2", "--steps", "3",
                     "--batch", "2", "--no-report"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"difflora: interrupted: nothing written ({out} appears only when every "
                                            "pair is done; `difflora pairs` keeps no checkpoint: run it again to "
                                            "start over)")
    assert list(tmp_path.iterdir()) == []  # its temp folder is gone too
