"""Where a backend goes: CUDA when there is one (the toy too), $DIFFLORA_DEVICE or a named device
forcing it, and a clear error for a device this machine does not have."""

import pytest
import torch

from difflora_kit import backends


def test_the_default_is_cuda_when_there_is_one_and_the_variable_forces_it(monkeypatch):
    monkeypatch.delenv(backends.DEVICE_VARIABLE, raising=False)
    assert backends.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(backends.DEVICE_VARIABLE, "cpu")
    assert backends.default_device() == "cpu"
    assert backends.load_backend("toy").device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_device_this_machine_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(backends.DEVICE_VARIABLE, "cuda")
    with pytest.raises(ValueError, match=r"DIFFLORA_DEVICE 'cuda': this machine has no CUDA GPU"):
        backends.load_backend("toy")
    with pytest.raises(ValueError, match="not a device"):
        backends.check_device("gpu0")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        backends.check_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_toy_trains_on_cuda_by_default(monkeypatch):
    monkeypatch.delenv(backends.DEVICE_VARIABLE, raising=False)
    backend = backends.load_backend("toy")
    assert backend.device.type == "cuda" and next(backend.unet.parameters()).is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_draws_the_same_pictures_on_both_devices():
    """Noise is drawn on the CPU: the toy's samples on CUDA equal the CPU's up to the GPU's rounding
    (TF32 and reduction order): at most 0.02 per pixel in [0, 1], 0.002 on average."""
    prompts, seeds = ["a red circle on a blue background"] * 2, [0, 1]
    cpu = backends.load_backend("toy", "cpu").generate(prompts, seeds, steps=10, guidance=2.0)
    gpu = backends.load_backend("toy", "cuda").generate(prompts, seeds, steps=10, guidance=2.0)
    diff = abs(cpu - gpu)
    assert diff.max() < 0.02 and diff.mean() < 0.002, (diff.max(), diff.mean())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_the_device_flag_is_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(backends.DEVICE_VARIABLE, raising=False)  # the session pins the CPU (tests/conftest.py)
    from difflora_kit import cli

    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--prompt", "a red circle", "--out", str(out), "--device", "cuda"]) == 2
    assert "--device 'cuda': this machine has no CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert cli.main(["sample", "--prompt", "a red circle", "--out", str(out), "--device", "cpu", "--sample-steps", "2"]) == 0
    assert out.is_file() and backends.DEVICE_VARIABLE not in __import__("os").environ
