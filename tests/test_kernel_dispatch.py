"""Which merge path backend="auto" takes (kernels/lora_merge.py, "dispatch"), decided on a CPU: the
card's capability is faked, the kernels themselves never launch."""
import contextlib
import subprocess
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


class BrokenKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` raises `error`, as a launch does when
    Triton cannot build its launcher (no C compiler, no Python headers) or ptxas refuses the card."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            raise self.error

        return launch


def _auto_on_the_faked_card(tensor, out_dtype=None):
    """lora_merge.auto_choice for a CPU tensor as if it sat on the faked card (the real rule)."""
    return lm.triton_choice(torch.cuda.get_device_capability(), (tensor.dtype, out_dtype))


# Triton's own words when it cannot build its launcher (triton/runtime/build.py): no compiler, or the
# compiler failing (e.g. "Python.h: No such file or directory")
NO_COMPILER = RuntimeError("Failed to find C compiler. Please specify via CC environment variable or set "
                           "triton.knobs.build.impl.")
NO_HEADERS = subprocess.CalledProcessError(1, ["gcc", "main.c", "-O3", "-shared", "-fPIC"])


@pytest.mark.parametrize("capability", [(9, 0), (8, 6), (7, 5)])
@pytest.mark.parametrize("error", [NO_COMPILER, NO_HEADERS], ids=["no-compiler", "no-python-headers"])
def test_a_kernel_build_error_under_auto_falls_back_to_the_reference_on_any_card(card, monkeypatch, capability,
                                                                                error):
    """Finding 7: on sm80+ too, a kernel that cannot be built makes "auto" warn and return the
    reference's result (step 2's fuse goes on), recorded in _FAILED so "auto" stops trying there."""
    card(capability)
    monkeypatch.setattr(lm, "auto_choice", _auto_on_the_faked_card)
    kernel = BrokenKernel(error)
    monkeypatch.setattr(lm, "_merge_quant_kernel", kernel)
    W, A, B, s = _inputs()
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        cb, scb = lm.merge_quantize(W, A, B, s)  # real CPU tensors: the capability is faked
    ref_cb, ref_scb = lm.merge_quantize_reference(W, A, B, s)
    assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb) and kernel.calls == 1
    assert lm._FAILED == {"cpu": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    monkeypatch.undo()  # the real auto_choice: the recorded failure now sends "auto" to the reference
    card(capability)
    monkeypatch.setattr(lm, "_FAILED", {"cuda:0": "RuntimeError: Failed to find C compiler"})
    ok, why = lm.auto_choice(fake_cuda(F16))
    assert not ok and "failed on cuda:0 earlier" in why
    assert lm.auto_choice(fake_cuda(F16, index=1))[0]  # another device still tries


@pytest.mark.parametrize("capability", [(9, 0), (7, 5)])
def test_backend_triton_raises_the_build_error_and_auto_raises_out_of_memory(card, monkeypatch, capability):
    card(capability)
    monkeypatch.setattr(lm, "auto_choice", _auto_on_the_faked_card)
    monkeypatch.setattr(lm, "_want_triton", lambda backend, tensor, out_dtype=None: backend != "torch")
    W, A, B, s = _inputs()
    CB, SCB = lm.quantize_rowwise_reference(W)
    monkeypatch.setattr(lm, "_dequant_merge_kernel", BrokenKernel(NO_COMPILER))
    with pytest.raises(RuntimeError, match="C compiler"):
        lm.dequant_merge(CB, SCB, A, B, s, F16, backend="triton")
    monkeypatch.setattr(lm, "_dequant_merge_kernel", BrokenKernel(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the reference would need more memory still
        lm.dequant_merge(CB, SCB, A, B, s, F16, backend="auto")
    assert lm._FAILED == {}


def test_on_device_makes_the_tensors_cuda_device_current(monkeypatch):
    """Finding 11: Triton launches on the *current* CUDA device; _on_device enters the tensor's own."""
    entered = []

    @contextlib.contextmanager
    def cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(lm.torch.cuda, "device", cuda_device)
    with lm._on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with lm._on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]  # nothing to enter for a CPU tensor


@pytest.mark.parametrize("op", ["merge_quantize", "remerge_int8", "dequant_merge"])
def test_every_launch_happens_inside_its_tensors_device_context(monkeypatch, op):
    inside, seen = [], []

    @contextlib.contextmanager
    def on_device(device):
        inside.append(device)
        yield
        inside.pop()

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((list(inside), args[0].device))

    monkeypatch.setattr(lm, "_on_device", on_device)
    monkeypatch.setattr(lm, "_merge_quant_kernel", Recorder())
    monkeypatch.setattr(lm, "_dequant_merge_kernel", Recorder())
    monkeypatch.setattr(lm, "_want_triton", lambda backend, tensor, out_dtype=None: True)
    W, A, B, s = _inputs()
    CB, SCB = lm.quantize_rowwise_reference(W)
    {"merge_quantize": lambda: lm.merge_quantize(W, A, B, s, backend="triton"),
     "remerge_int8": lambda: lm.remerge_int8(CB, SCB, A, B, s, backend="triton"),
     "dequant_merge": lambda: lm.dequant_merge(CB, SCB, A, B, s, F16, backend="triton")}[op]()
    assert seen == [([W.device], W.device)]  # launched once, inside its first tensor's device
