"""Fused LoRA-merge kernels compiled for real on a CUDA GPU (sm80+), bf16 weights on hardware.

Skipped without CUDA. Must not set TRITON_INTERPRET (the CPU twin is tests/test_kernels.py).
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
POISON_INT8 = -128
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
def quant(lm):
    """bitsandbytes' CUDA row-wise quantizer, or the PyTorch reference where bnb is missing."""
    try:
        from bitsandbytes.functional import int8_vectorwise_quant
    except ImportError:
        return lambda x: lm.quantize_rowwise_reference(x.float())
    return lambda x: int8_vectorwise_quant(x.half())[:2]  # its CUDA kernel takes fp16 only (as quant.quantize_linears casts)


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


def _assert_int8_close(cb, scb, ref_cb, ref_scb):
    assert not (cb == POISON_INT8).any() and torch.isfinite(scb).all()
    diff = (cb.int() - ref_cb.int()).abs()
    assert diff.max() <= 1, int(diff.max())
    assert (diff > 0).float().mean() < 0.01
    torch.testing.assert_close(scb, ref_scb.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out,in_,r,dtype", CASES)
def test_merge_quantize_on_gpu(lm, quant, poisoned, out, in_, r, dtype):
    W, A, B, s = _inputs(out, in_, r, dtype, seed=out + r)
    assert lm.use_triton(W)
    cb, scb = lm.merge_quantize(W, A, B, s)  # "auto" -> Triton on sm80+
    _assert_int8_close(cb, scb, *lm.merge_quantize_reference(W, A, B, s))
    _assert_int8_close(cb, scb, *quant(W.float() + s * (B @ A)))


@pytest.mark.parametrize("out,in_,r,dtype", CASES)
def test_remerge_int8_on_gpu(lm, quant, poisoned, out, in_, r, dtype):
    W, A, B, s = _inputs(out, in_, r, dtype, seed=out + 2 * r)
    CB, SCB = quant(W.float())
    cb, scb = lm.remerge_int8(CB, SCB, A, B, s, backend="triton")
    _assert_int8_close(cb, scb, *lm.remerge_int8_reference(CB, SCB, A, B, s))
    merged = CB.float() * SCB[:, None] / 127 + s * (B @ A)
    _assert_int8_close(cb, scb, *quant(merged))


@pytest.mark.parametrize("out_dtype,tol", [(F32, 1e-6), (F16, 1e-3), (BF16, 8e-3)])
@pytest.mark.parametrize("out,in_,r,dtype", CASES)
def test_dequant_merge_on_gpu(lm, quant, poisoned, out_dtype, tol, out, in_, r, dtype):
    W, A, B, s = _inputs(out, in_, r, dtype, seed=out + 3 * r)
    CB, SCB = quant(W.float())
    got = lm.dequant_merge(CB, SCB, A, B, s, out_dtype)
    exact = CB.double() * SCB.double()[:, None] / 127 + s * (B.double() @ A.double())
    assert got.dtype == out_dtype and torch.isfinite(got).all()
    rel = (got.double() - exact).norm() / exact.norm()
    assert rel < tol, float(rel)
