"""Fused LoRA-merge kernels compiled for real on a CUDA GPU (sm80+), bf16 weights on hardware.

Skipped without CUDA. Must not set TRITON_INTERPRET (the CPU twin is tests/test_kernels.py).

Two comparisons per result (tests/int8_bounds.py): against the fp32 PyTorch reference, the kernels'
contract (SCB to rtol 1e-5, codes +-1 at ties); and against bitsandbytes' CUDA quantizer, which takes
fp16 only, so its input x.half() is rounded first: there SCB may differ by fp16's unit roundoff
(2**-11) and a code by 1 where fp16 rounding reaches a rounding boundary
(tests/test_kernels.py shows on the CPU that rtol 1e-5 fails there and this bound holds).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from int8_bounds import POISON_INT8, assert_int8_close, assert_within_fp16_rounding  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# (out, in, rank, W dtype): the production shape plus tails in both dims and big ranks
CASES = [(4096, 4096, 16, BF16), (4096, 4096, 16, F16), (1000, 1030, 8, BF16),
         (333, 15360, 64, F32), (257, 300, 128, BF16)]


@pytest.fixture(scope="module")
def lm():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the kernels target sm80+")
    pytest.importorskip("triton")
    from difflora_kit.kernels import lora_merge

    return lora_merge


@pytest.fixture(scope="module")
def bnb_quant():
    """bitsandbytes' CUDA row-wise quantizer of x.half() (its kernel takes fp16 only, as
    quant.quantize_linears casts), or None where bitsandbytes is missing."""
    try:
        from bitsandbytes.functional import int8_vectorwise_quant
    except ImportError:
        return None
    return lambda x: int8_vectorwise_quant(x.half())[:2]


def _check_against_bnb(bnb_quant, cb, scb, x):
    """The kernel's quantization of fp32 x against bitsandbytes' of x.half(), within fp16 rounding."""
    if bnb_quant is not None:
        assert_within_fp16_rounding(cb, scb, x, *bnb_quant(x))


@pytest.fixture
def poisoned(lm, monkeypatch):
    empty = torch.empty

    def poisoned_empty(*shape, dtype=None, **kw):
        t = empty(*shape, dtype=dtype, **kw)
        return t.fill_(POISON_INT8 if dtype == torch.int8 else float("nan"))

    monkeypatch.setattr(lm.torch, "empty", poisoned_empty)


def _inputs(out, in_, r, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(out, in_, generator=g, device="cuda").to(dtype)
    A = torch.randn(r, in_, generator=g, device="cuda")
    B = torch.randn(out, r, generator=g, device="cuda")
    return W, A, B, 0.5 / r ** 0.5


@pytest.mark.parametrize("out,in_,r,dtype", CASES)
def test_merge_quantize_on_gpu(lm, bnb_quant, poisoned, out, in_, r, dtype):
    W, A, B, s = _inputs(out, in_, r, dtype, seed=out + r)
    assert lm.use_triton(W)
    cb, scb = lm.merge_quantize(W, A, B, s)  # "auto" -> Triton on sm80+
    assert_int8_close(cb, scb, *lm.merge_quantize_reference(W, A, B, s))
    _check_against_bnb(bnb_quant, cb, scb, W.float() + s * (B @ A))


@pytest.mark.parametrize("out,in_,r,dtype", CASES)
def test_remerge_int8_on_gpu(lm, bnb_quant, poisoned, out, in_, r, dtype):
    W, A, B, s = _inputs(out, in_, r, dtype, seed=out + 2 * r)
    CB, SCB = lm.quantize_rowwise_reference(W.float())
    cb, scb = lm.remerge_int8(CB, SCB, A, B, s, backend="triton")
    assert_int8_close(cb, scb, *lm.remerge_int8_reference(CB, SCB, A, B, s))
    _check_against_bnb(bnb_quant, cb, scb, CB.float() * SCB[:, None] / 127 + s * (B @ A))


@pytest.mark.parametrize("out_dtype,tol", [(F32, 1e-6), (F16, 1e-3), (BF16, 8e-3)])
@pytest.mark.parametrize("out,in_,r,dtype", CASES)
def test_dequant_merge_on_gpu(lm, poisoned, out_dtype, tol, out, in_, r, dtype):
    W, A, B, s = _inputs(out, in_, r, dtype, seed=out + 3 * r)
    CB, SCB = lm.quantize_rowwise_reference(W.float())
    got = lm.dequant_merge(CB, SCB, A, B, s, out_dtype)
    exact = CB.double() * SCB.double()[:, None] / 127 + s * (B.double() @ A.double())
    assert got.dtype == out_dtype and torch.isfinite(got).all()
    rel = (got.double() - exact).norm() / exact.norm()
    assert rel < tol, float(rel)


def test_the_kernels_launch_on_the_tensors_own_device(lm):
    """Triton launches on the current CUDA device: a tensor on cuda:1 must launch there (lora_merge._on_device)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    W, A, B, s = (t.to("cuda:1") if torch.is_tensor(t) else t for t in _inputs(64, 96, 8, F16, seed=1))
    with torch.cuda.device(0):
        cb, scb = lm.merge_quantize(W, A, B, s, backend="triton")
    assert cb.device == W.device
    assert_int8_close(cb, scb, *lm.merge_quantize_reference(W, A, B, s))
