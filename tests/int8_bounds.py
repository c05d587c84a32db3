"""How close two row-wise int8 quantizations must be, shared by tests/test_kernels.py (CPU) and
tests/test_kernels_gpu.py (CUDA). Not a test module: helpers only.

Two different contracts:
  assert_int8_close          the kernels against their PyTorch reference: the same fp32 arithmetic,
                             so the scale SCB agrees to fp32 rounding (rtol 1e-5) and a code moves
                             by 1 only at a rounding tie or from a different summation order.
  assert_within_fp16_rounding  the kernels against bitsandbytes fed `x.half()` (its CUDA quantizer
                             takes fp16 only): that input is rounded to fp16 first, which moves each
                             weight and the row's absmax by up to u = 2**-11 relative. SCB then
                             differs by up to u (fp16's unit roundoff, ~4.9e-4: far above rtol 1e-5,
                             so the first contract does not hold against it), and a code differs by
                             1 only where the exact code value lies within reach of that rounding of
                             a rounding boundary k + 1/2.
"""
import torch

POISON_INT8 = -128  # no correct launch writes it (codes are clamped to [-127, 127])
FP16_UNIT_ROUNDOFF = 2.0 ** -11  # |fl16(x) - x| <= u |x| for x in fp16's normal range


def assert_int8_close(cb, scb, ref_cb, ref_scb, lsb=1):
    """Kernel (cb [out, in] int8, scb [out] fp32) against its fp32 PyTorch reference."""
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32
    assert not (cb == POISON_INT8).any() and torch.isfinite(scb).all()  # fully written
    diff = (cb.int() - ref_cb.int()).abs()
    assert diff.max() <= lsb, int(diff.max())
    assert (diff > 0).float().mean() < 0.01  # +-1 only at rounding ties / dot order
    torch.testing.assert_close(scb, ref_scb.float(), rtol=1e-5, atol=1e-6)


def fp16_code_slack(x, scb):
    """[out, in]: how far (in code units) rounding x to fp16 can move each code value q = x*127/absmax.

    fl16(x) = x(1 + e1), fl16(absmax) = absmax(1 + e2) (rounding is monotone, so the absmax of the
    rounded row is the rounded absmax), |e1|, |e2| <= u: q' = q (1 + e1) / (1 + e2), so
    |q' - q| <= |q| 2u / (1 - u). Plus 1e-4 for fp32 rounding and bitsandbytes' approximate divide."""
    q = x.double() * 127.0 / scb.double().clamp_min(1e-30)[:, None]
    return q, q.abs() * 2 * FP16_UNIT_ROUNDOFF / (1 - FP16_UNIT_ROUNDOFF) + 1e-4


def assert_within_fp16_rounding(cb, scb, x, bnb_cb, bnb_scb):
    """Kernel (cb, scb) quantizing fp32 x [out, in] against bitsandbytes quantizing x.half().

    SCB: |bnb - ours| <= u ours. Codes: never 2 apart; 1 apart only where the exact code value q is
    within fp16_code_slack of a rounding boundary (|frac(|q|) - 1/2| <= slack)."""
    assert not (cb == POISON_INT8).any() and torch.isfinite(scb).all()
    scb64, bnb64 = scb.double(), bnb_scb.double()
    rel = (bnb64 - scb64).abs() / scb64.clamp_min(1e-30)
    assert (rel <= FP16_UNIT_ROUNDOFF * (1 + 1e-5)).all(), \
        f"SCB differs from bitsandbytes' by up to {float(rel.max()):.3g}, more than fp16 rounding (2**-11)"
    diff = (cb.int() - bnb_cb.int()).abs()
    assert diff.max() <= 1, int(diff.max())
    q, slack = fp16_code_slack(x, scb)
    to_boundary = (q.abs().frac() - 0.5).abs()
    unexplained = (diff > 0) & (to_boundary > slack)
    assert not unexplained.any(), (f"{int(unexplained.sum())} codes differ from bitsandbytes' fp16 path by 1 "
                                   f"farther from a rounding boundary than fp16 rounding reaches")
