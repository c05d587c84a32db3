"""The 8-bit base layer on a CUDA GPU: the kit's frozen int8 matmul against bitsandbytes' own.

Skipped without CUDA (the CPU twin is tests/test_quant.py)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_int8_matmul_equals_bitsandbytes_on_gpu(dtype):
    from test_quant import bitsandbytes_twin

    from difflora_kit.quant import quantize_linears

    torch.manual_seed(0)
    ours = quantize_linears(torch.nn.Sequential(torch.nn.Linear(320, 640)).cuda())[0]
    theirs = bitsandbytes_twin(ours).cuda()
    x = (torch.randn(2, 77, 320, device="cuda") * 3).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 77, 640, device="cuda").to(dtype)
    y = ours(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    y_ref = theirs.train()(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-2, atol=1e-2)
