"""bitsandbytes' CUDA int8 matmul (W8A8), emulated exactly on a CPU.

What `Linear8bitLt` (threshold 0) computes on a CUDA card, and what the kit's FrozenInt8Matmul
computed there until issue 18 (bitsandbytes 0.50.2: backends/cuda/ops.py and the CUDA kernels
kInt8VectorQuant, cublasLt igemmlt, kdequant_mm_int32_fp16 of csrc/):

    x16 = x.to(fp16)                                             (N, in)   the layer casts its input first
    SCA = absmax_row(x16) (fp16, exact) -> fp32                  (N,)      int8_vectorwise_quant
    CA  = rint(float(x16) * (127 / SCA))                         (N, in)   int8, round half to even
    acc = CA @ CB.T                                              (N, out)  int32, exact (cuBLASLt IMMA)
    y16 = fp16(fma(float(acc) * SCA * SCB, 6.200012e-05f, b16))  (N, out)  b16: a fp16 bias, fused
    y16 = fp16(y16 + bias)                                       only for a bias of another dtype
    y   = y16.to(x.dtype)

The emulation differs from the card only where the card's division is approximate (`__fdividef`,
within 2 ulp of fp32: a code one LSB off where x*127/SCA falls within ~1e-7 of a half-integer)
and where fma's single rounding differs from float64-then-fp32 (1 fp32 ulp, rarely visible after
the fp16 rounding). The int32 sum is computed in float64, exact for |acc| < 2**53.

    FrozenW8A8Matmul / w8a8_layers(): the kit's 8-bit layers switched to this arithmetic (forward
    only; the input gradient is weight-only in bitsandbytes too), to train and sample the toy with it.
"""

from __future__ import annotations

import contextlib

import torch

from difflora_kit import quant

WEIGHT_ONLY = quant.FrozenInt8Matmul  # the kit's own layer arithmetic
MM_DEQUANT_CONST = 6.200012e-05  # bitsandbytes' CUDA constant for 1 / 127**2, an fp32 literal


def quantize_rows(x16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CUDA int8_vectorwise_quant, threshold 0: x16 fp16 (N, in) -> CA int8 (N, in),
    SCA fp32 (N,). A zero row gives codes 0 (CUDA's float->int of 0 * inf = NaN is 0)."""
    if x16.dtype != torch.float16:
        raise ValueError(f"bitsandbytes quantizes fp16 activations only, got {x16.dtype}")
    SCA = x16.abs().amax(dim=-1).float()  # (N,): the fp16 row absmax, exact
    scale = torch.tensor(127.0, dtype=torch.float32) / SCA  # (N,) fp32 (the card: __fdividef)
    q = torch.round(x16.float() * scale[:, None])  # (N, in) fp32, round half to even (__float2int_rn)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8), SCA


def int32_matmul(CA: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """cuBLASLt's int8 x int8 -> int32 product, exact: (N, in) @ (out, in).T -> (N, out) float64."""
    return CA.double() @ CB.double().T


def dequantize_output(acc: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' CUDA int8_mm_dequant: int32 (N, out) -> fp16 (a fp16 bias fused), + a bias of
    another dtype in fp16 afterwards, then cast to `dtype`."""
    p = acc.float() * SCA.float()[:, None]  # (N, out) fp32: the kernel's int * float ...
    p = p * SCB.float()[None, :]  # ... * float, each rounded to fp32
    fused = bias is not None and bias.dtype == torch.float16
    b = bias.double()[None, :] if fused else 0.0
    const = torch.tensor(MM_DEQUANT_CONST, dtype=torch.float32).double()
    y16 = (p.double() * const + b).float().half()  # fmaf, then __float2half
    if bias is not None and not fused:
        y16 = (y16.float() + bias.float()[None, :]).half()  # out.add_(bias) on the fp16 output
    return y16.to(dtype)


def w8a8_linear(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b as bitsandbytes computes it on CUDA (threshold 0): x (..., in) -> (..., out)
    in x's dtype; CB int8 (out, in), SCB fp32 (out,), bias (out,) or None."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float16)  # (N, in)
    CA, SCA = quantize_rows(x2)
    y = dequantize_output(int32_matmul(CA, CB), SCA, SCB, bias, x.dtype)  # (N, out)
    return y.reshape(*x.shape[:-1], CB.shape[0])


class FrozenW8A8Matmul(torch.autograd.Function):
    """quant.FrozenInt8Matmul with bitsandbytes' CUDA forward (w8a8_linear); the input gradient stays
    weight-only, as in bitsandbytes' MatMul8bitLt.backward and the kit's layer."""

    @staticmethod
    def forward(ctx, x, CB, SCB, bias):
        ctx.save_for_backward(CB, SCB)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return w8a8_linear(x, CB, SCB, bias)

    @staticmethod
    def backward(ctx, grad_y):
        return WEIGHT_ONLY.backward(ctx, grad_y)


@contextlib.contextmanager
def w8a8_layers():
    """Inside: every quant.Int8Linear computes its forward with bitsandbytes' CUDA arithmetic (W8A8)
    (Int8Linear.forward looks quant.FrozenInt8Matmul up at each call)."""
    quant.FrozenInt8Matmul = FrozenW8A8Matmul
    try:
        yield
    finally:
        quant.FrozenInt8Matmul = WEIGHT_ONLY
