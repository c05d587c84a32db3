"""Which merge path backend="auto" takes (kernels/lora_merge.py, "dispatch"), decided on a CPU: the
card's capability is faked, the kernels themselves never launch."""
import types

import pytest
import torch

from difflora_kit.kernels import lora_merge as lm

F16, BF16, F32, I8 = torch.float16, torch.bfloat16, torch.float32, torch.int8


@pytest.mark.parametrize("capability,dtypes,runs,why", [
    ((9, 0), (BF16, None), True, "supported"),
    ((8, 0), (F16, BF16), True, "supported"),
    ((8, 6), (I8, F32), True, "supported"),
    ((7, 5), (F16, None), True, "pre-Ampere"),  # T4: fp16 weights
    ((7, 5), (F32, None), True, "pre-Ampere"),
    ((7, 5), (I8, F16), True, "pre-Ampere"),  # int8 base -> fp16 weights (dequant_merge)
    ((7, 5), (BF16, None), False, "no bf16"),
    ((7, 5), (I8, BF16), False, "no bf16"),  # a bf16 output is bf16 too
    ((7, 0), (F16, None), False, "older than sm75"),  # V100
    ((6, 1), (F32, None), False, "older than sm75"),
])
def test_the_rule_by_capability_and_dtype(capability, dtypes, runs, why):
    ok, reason = lm.triton_choice(capability, dtypes)
    assert ok is runs and why in reason, reason
    assert lm.triton_choice(capability, dtypes, triton_available=False) == (False, "Triton is not installed")


def fake_cuda(dtype, index=0):
    """What use_triton reads of a tensor, as a CUDA tensor would show it."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index), dtype=dtype)


@pytest.fixture
def card(monkeypatch):
    """Pretend a CUDA card of the given capability; a fresh record of failed kernels."""
    monkeypatch.setattr(lm, "_FAILED", {})
    monkeypatch.delenv(lm.ENV_BACKEND, raising=False)

    def set_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return set_capability


def test_use_triton_on_a_t4_for_fp16_and_fp32_only(card, monkeypatch):
    if lm.triton is None:
        pytest.skip("needs triton installed (the rule says no without it)")
    card((7, 5))
    assert lm.use_triton(fake_cuda(F16)) and lm.use_triton(fake_cuda(F32)) and lm.use_triton(fake_cuda(I8), F16)
    assert not lm.use_triton(fake_cuda(BF16)) and not lm.use_triton(fake_cuda(I8), BF16)
    card((8, 0))
    assert lm.use_triton(fake_cuda(BF16)) and lm.use_triton(fake_cuda(I8), BF16)
    card((7, 0))
    assert not lm.use_triton(fake_cuda(F16))
    assert not lm.use_triton(torch.zeros(2, 2, dtype=F16))  # a CPU tensor: never
    monkeypatch.setattr(lm, "triton", None)
    card((9, 0))
    assert not lm.use_triton(fake_cuda(F16))


def test_the_environment_variable_forces_the_reference(card, monkeypatch):
    card((9, 0))
    monkeypatch.setenv(lm.ENV_BACKEND, "torch")
    assert lm.auto_choice(fake_cuda(F16)) == (False, f"{lm.ENV_BACKEND}=torch")
    monkeypatch.setenv(lm.ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match=lm.ENV_BACKEND):
        lm.use_triton(fake_cuda(F16))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(9, 20, generator=g), torch.randn(3, 20, generator=g), torch.randn(9, 3, generator=g), 0.5


def test_a_kernel_error_below_sm80_falls_back_to_the_reference_once(card, monkeypatch):
    """On a T4 (unsupported by Triton upstream) an error of a kernel under "auto" is a warning and
    the reference's result, and "auto" stops trying on that device; backend="triton" raises it."""
    card((7, 5))
    monkeypatch.setattr(lm, "auto_choice", lambda tensor, out_dtype=None: (True, "pretend a T4"))
    calls = []

    def broken_launch(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("ptxas fatal: pretend this card cannot take it\nmore lines")

    monkeypatch.setattr(lm, "_launch_quant", broken_launch)
    W, A, B, s = _inputs()
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        cb, scb = lm.merge_quantize(W, A, B, s)  # real CPU tensors: the capability is faked
    ref_cb, ref_scb = lm.merge_quantize_reference(W, A, B, s)
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb) and calls == [1]
    assert lm._FAILED == {"cpu": "RuntimeError: ptxas fatal: pretend this card cannot take it"}
    monkeypatch.undo()  # the real auto_choice: the recorded failure now sends "auto" to the reference
    card((7, 5))
    monkeypatch.setattr(lm, "_FAILED", {"cuda:0": "RuntimeError: ptxas fatal"})
    ok, why = lm.auto_choice(fake_cuda(F16))
    assert not ok and "failed on cuda:0 earlier" in why


@pytest.mark.parametrize("capability,backend", [((8, 0), "auto"), ((7, 5), "triton")])
def test_a_kernel_error_is_raised_on_supported_cards_and_when_asked_for_triton(card, monkeypatch, capability,
                                                                              backend):
    if lm.triton is None:
        pytest.skip("backend='triton' needs triton installed")
    card(capability)
    monkeypatch.setattr(lm, "auto_choice", lambda tensor, out_dtype=None: (True, "pretend"))
    monkeypatch.setattr(lm, "_want_triton", lambda backend, tensor, out_dtype=None: True)

    def broken_launch(*args, **kwargs):
        raise RuntimeError("kernel error")

    monkeypatch.setattr(lm, "_launch_dequant", broken_launch)
    W, A, B, s = _inputs()
    CB, SCB = lm.quantize_rowwise_reference(W)
    with pytest.raises(RuntimeError, match="kernel error"):
        lm.dequant_merge(CB, SCB, A, B, s, F16, backend=backend)
    assert lm._FAILED == {}
