"""The test session pins the CPU: on a GPU machine a "CPU" test must not move to CUDA silently
(difflora_kit.backends.default_device takes CUDA when there is one), while the GPU tests still reach it.
Checked here on a CPU by pretending CUDA is there."""

import os

import pytest
import torch
from conftest import session_environment

from difflora_kit import backends
from difflora_kit.pair import prepare_base
from difflora_kit.config import TrainConfig


@pytest.fixture
def a_gpu_machine(monkeypatch):
    """torch says CUDA is there (nothing is allocated on it in these tests)."""
    if os.environ.get(backends.DEVICE_VARIABLE, "cpu") != "cpu":
        pytest.skip(f"this session was sent to {os.environ[backends.DEVICE_VARIABLE]} on purpose")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_the_session_pins_the_cpu_and_interprets_triton_only_without_cuda():
    gpu, cpu = session_environment(cuda=True), session_environment(cuda=False)
    assert gpu[backends.DEVICE_VARIABLE] == cpu[backends.DEVICE_VARIABLE] == "cpu"
    assert "TRITON_INTERPRET" not in gpu  # on a GPU machine the kernels compile for real (tests/test_kernels_gpu.py)
    assert cpu["TRITON_INTERPRET"] == "1"  # without one they run in the interpreter (tests/test_kernels.py)
    assert os.environ.get(backends.DEVICE_VARIABLE)  # and this session has the variable set
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_a_cpu_test_stays_on_the_cpu_on_a_gpu_machine(a_gpu_machine, monkeypatch):
    assert backends.default_device() == "cpu"
    backend = prepare_base("toy", TrainConfig(eight_bit=False))  # no device named, as the CPU tests do
    assert backend.device == torch.device("cpu") and next(backend.unet.parameters()).device.type == "cpu"
    # the control: without the session's variable the same call would go to CUDA
    monkeypatch.delenv(backends.DEVICE_VARIABLE)
    assert backends.default_device() == "cuda"


def test_a_gpu_test_reaches_cuda_by_removing_the_variable_or_naming_the_device(a_gpu_machine, monkeypatch):
    """tests/test_devices.py removes the variable; tests/test_kernels_gpu.py and test_quant_gpu.py name "cuda"."""
    assert backends.check_device("cuda") == "cuda"  # a named device is not overridden by the variable
    monkeypatch.delenv(backends.DEVICE_VARIABLE)
    assert backends.default_device() == "cuda"
