"""Fused LoRA merge for a row-wise int8 base (bitsandbytes LLM.int8 layout), Triton + PyTorch.

Shapes: W [out, in] (fp16/bf16/fp32), LoRA A [r, in], B [out, r], delta = scale * B @ A.
bitsandbytes' row-wise int8: CB int8 [out, in], SCB fp32 [out] (row absmax),
W ~= CB * SCB[:, None] / 127.

Idea: the merged weight W + delta is never materialised in memory. Each program owns BLOCK_M
rows, loads its B tile [BLOCK_M, R_PAD] once, and walks `in` in BLOCK_K tiles, recomputing the
delta tile on the fly (the rank is small, the FLOPs are cheap, bandwidth is not):

         in ->  k0      k0+BLOCK_K
        +-------+=======+-------+      A_pad [R_PAD, in] (rank zero-padded to a power of 2, >= 16)
        |       | A[:,k]|       |
        +-------+=======+-------+
    +--+ +-------+=======+-------+
    |B | |       |  W +  |       |  <- rows m0 .. m0+BLOCK_M  (one program)
    |  | |       | B @ A |       |
    +--+ +-------+=======+-------+
  pass 1: absmax[m] = max_k |W + s*B@A|          (reads W)
  pass 2: CB = rne(x * 127/absmax), SCB = absmax (reads W again, writes CB)

Memory traffic per weight element (bytes, e = element size of W: 2 for fp16/bf16):
  unfused  : read W (e) + write W' fp32 (4) + read W' for absmax (4) + read W' to quantize (4)
             + write CB (1)  ~= e + 13, plus an [out, in] fp32 temporary
  fused    : read W twice (2e) + write CB (1) = 2e + 1 ~= 5 for fp16, no temporary
  A_pad (R_PAD*in*4 bytes, e.g. 256 KiB for in=4096, r=16) is re-read by every row block and
  pass: 8*R_PAD/BLOCK_M bytes per weight element, but it stays L2-resident, so DRAM sees ~once.
remerge_int8 reads CB twice (2 bytes) + writes CB' (1); dequant_merge is a single pass.

All in-kernel arithmetic is fp32 (loads are cast to fp32 first; the Triton interpreter's bf16
arithmetic is wrong), round-half-even via the 1.5*2**23 trick (no libdevice rint in the
interpreter), index arithmetic in int64 (out*in can exceed 2**31).

Dispatch (backend="auto", `triton_choice`): Triton on CUDA sm80+ for every dtype, and on sm75 (T4)
for fp16/fp32 weights and outputs; the PyTorch reference elsewhere. sm75 is outside Triton's
supported hardware since Triton 3.3 (README: "NVIDIA GPUs (Compute Capability 8.0+)";
https://github.com/triton-lang/triton/pull/5066 "Deprecate MMAv1; fallback to FMA for
computeCapability < 80"; a maintainer in https://github.com/triton-lang/triton/issues/10918: sm75
"may work at times, but we are not implementing or accepting fixes"). Its compiler still has the
pre-Ampere path (triton/backends/nvidia/compiler.py: no pipelining below sm80, FMA dots), and these
kernels use nothing else: a float32 tl.dot with input_precision="ieee" is FMA code on every card,
no tensor cores, no async copies. bf16 is never sent there: sm75 has no bf16 hardware (the kit picks
fp16 there); Triton 3.9 does build these bf16 kernels for sm75 with integer-emulated conversions (the
compile matrix), older versions failed in ptxas ("Feature 'cvt.bf16.f32' requires .target sm_80"),
and none has been run on one. `difflora doctor` runs the kernels against their references
on the learner's card; under "auto" a kernel error on any card (ptxas refusing it, or Triton unable to
build its launcher: no C compiler or Python headers) falls back to the reference, with a warning.
kernels/compile_matrix.py builds every kernel for sm75, sm80, sm86, sm89 and sm90 on any machine.
"""
import contextlib
import os
import warnings

import torch

try:  # Triton is optional: without it "auto" uses the PyTorch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: (x + M) - M rounds half-to-even for |x| < 2**22
_BACKENDS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------- references
def _delta(A, B, scale):
    """scale * B @ A in fp32: [out, r] @ [r, in] -> [out, in]."""
    return scale * (B.float() @ A.float())


def _add_delta_(x, A, B, scale):
    """x += scale * B @ A in place (x fp32 [out, in]); one fused addmm, no [out, in] temporary."""
    return x.addmm_(B.float(), A.float(), alpha=float(scale))


def quantize_rowwise_(x):
    """fp32 [out, in] -> (CB int8 [out, in], SCB fp32 [out]), overwriting x; zero rows give CB = 0, SCB = 0."""
    absmax = torch.linalg.vector_norm(x, ord=float("inf"), dim=1)  # (out,) row absmax, no |x| temporary
    inv = torch.where(absmax > 0, 127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    cb = x.mul_(inv[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return cb, absmax.float()


def quantize_rowwise_reference(x):
    """fp32 [out, in] -> (CB int8 [out, in], SCB fp32 [out]); x is left as it was."""
    return quantize_rowwise_(x.float().clone())


def dequantize_rowwise_reference(CB, SCB):
    """(CB [out, in], SCB [out]) -> fp32 [out, in]."""
    return CB.float().mul_(SCB.float()[:, None] / 127.0)


def merge_quantize_reference(W, A, B, scale):
    """W [out, in] + scale*B@A -> row-wise int8 (CB, SCB), fp32 math, one fp32 temporary."""
    merged = W.float() if W.dtype != torch.float32 else W.clone()
    return quantize_rowwise_(_add_delta_(merged, A, B, scale))


def remerge_int8_reference(CB, SCB, A, B, scale):
    """Dequantize, add scale*B@A, requantize (fp32 math, one fp32 temporary)."""
    return quantize_rowwise_(_add_delta_(dequantize_rowwise_reference(CB, SCB), A, B, scale))


def dequant_merge_reference(CB, SCB, A, B, scale, out_dtype=torch.float16):
    """CB*SCB/127 + scale*B@A -> W' [out, in] in out_dtype (fp32 math)."""
    return _add_delta_(dequantize_rowwise_reference(CB, SCB), A, B, scale).to(out_dtype)


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _merged_tile(src_ptr, scb_in, b, a_ptr, rows, cols, row_mask, K, scale,
                     SRC_INT8: tl.constexpr, R_PAD: tl.constexpr):
        """fp32 tile [BLOCK_M, BLOCK_K] of base + scale * B @ A; zero outside the masks."""
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(src_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0).to(tl.float32)
        if SRC_INT8:  # dequantize the int8 base: CB * SCB / 127
            x = x * scb_in[:, None] / 127.0
        r = tl.arange(0, R_PAD).to(tl.int64)
        a = tl.load(a_ptr + r[:, None] * K + cols[None, :], mask=col_mask[None, :], other=0.0)
        delta = tl.dot(b, a, input_precision="ieee")  # [BLOCK_M, R_PAD] @ [R_PAD, BLOCK_K]
        return tl.where(mask, x + scale * delta, 0.0)

    @triton.jit
    def _row_setup(scb_in_ptr, b_ptr, M, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
                   SRC_INT8: tl.constexpr):
        """Rows of this program (int64), their mask, the B tile [BLOCK_M, R_PAD] and input SCB."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        r = tl.arange(0, R_PAD)
        b = tl.load(b_ptr + rows[:, None] * R_PAD + r[None, :], mask=row_mask[:, None], other=0.0)
        scb_in = tl.zeros([BLOCK_M], dtype=tl.float32)
        if SRC_INT8:
            scb_in = tl.load(scb_in_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        return rows, row_mask, b, scb_in

    @triton.jit
    def _merge_quant_kernel(src_ptr, scb_in_ptr, a_ptr, b_ptr, cb_ptr, scb_ptr, M, K, scale,
                            SRC_INT8: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
        """(W or CB*SCB/127) [M, K] + scale*B@A -> CB' int8 [M, K], SCB' fp32 [M]. Two passes."""
        rows, row_mask, b, scb_in = _row_setup(scb_in_ptr, b_ptr, M, BLOCK_M, R_PAD, SRC_INT8)
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # pass 1: row absmax of the merged weight
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            x = _merged_tile(src_ptr, scb_in, b, a_ptr, rows, cols, row_mask, K, scale,
                             SRC_INT8, R_PAD)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        nonzero = absmax > 0
        inv = tl.where(nonzero, 127.0 / tl.where(nonzero, absmax, 1.0), 0.0)
        tl.store(scb_ptr + rows, absmax, mask=row_mask)
        for k0 in range(0, K, BLOCK_K):  # pass 2: recompute and quantize
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            x = _merged_tile(src_ptr, scb_in, b, a_ptr, rows, cols, row_mask, K, scale,
                             SRC_INT8, R_PAD)
            q = x * inv[:, None]
            q = (q + 12582912.0) - 12582912.0  # round half to even (|q| <= 127 << 2**22)
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)  # clamp before the int8 cast
            mask = row_mask[:, None] & (cols < K)[None, :]
            tl.store(cb_ptr + rows[:, None] * K + cols[None, :], q.to(tl.int8), mask=mask)

    @triton.jit
    def _dequant_merge_kernel(cb_ptr, scb_in_ptr, a_ptr, b_ptr, out_ptr, M, K, scale,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
        """CB [M, K] * SCB [M] / 127 + scale*B@A -> out [M, K] (out's dtype). One pass."""
        rows, row_mask, b, scb_in = _row_setup(scb_in_ptr, b_ptr, M, BLOCK_M, R_PAD, True)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            x = _merged_tile(cb_ptr, scb_in, b, a_ptr, rows, cols, row_mask, K, scale,
                             True, R_PAD)
            mask = row_mask[:, None] & (cols < K)[None, :]
            tl.store(out_ptr + rows[:, None] * K + cols[None, :],
                     x.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- dispatch
# Which CUDA cards backend="auto" runs the kernels on (kernels/README.md, "Dispatch", has the sources):
#   sm80+       every dtype: Triton's supported hardware ("NVIDIA GPUs (Compute Capability 8.0+)")
#   sm75 (T4)   fp16/fp32 weights and outputs, int8 bases; no bf16 there (no bf16 hardware; Triton 3.9
#               builds it with emulated conversions, older ptxas refused cvt.bf16.f32). Triton dropped
#               Turing from its supported list in 3.3 (triton-lang/triton#5066) but its compiler
#               keeps the pre-Ampere path (FMA dots, no software pipelining), and these kernels
#               need nothing more: their fp32 "ieee" tl.dot is FMA code on every card.
#               Unsupported upstream, so `difflora doctor` checks them on the card.
#   older cards, CPU tensors, no Triton, or DIFFLORA_MERGE_KERNELS=torch: the PyTorch reference.
#   On every card an error of a kernel (a build or launch failure) makes "auto" fall back to the
#   reference (with a warning); tests/test_kernel_compile.py builds each kernel for each card.
MIN_CAPABILITY = (7, 5)
BF16_CAPABILITY = (8, 0)
SUPPORTED_CAPABILITY = (8, 0)  # Triton's own floor (sm75 runs on its pre-Ampere path, unsupported upstream)
ENV_BACKEND = "DIFFLORA_MERGE_KERNELS"  # "torch": backend="auto" always takes the reference
_FAILED: dict[str, str] = {}  # device -> the kernel error that made "auto" fall back there


def triton_choice(capability, dtypes, triton_available=True):
    """(run the Triton kernels?, why) on a CUDA card of `capability` (major, minor) for tensors of
    `dtypes` (the base's and the output's; None entries are ignored). The pure rule of "auto"."""
    capability = tuple(capability)
    sm = f"sm{capability[0]}{capability[1]}"
    if not triton_available:
        return False, "Triton is not installed"
    if capability < MIN_CAPABILITY:
        return False, f"{sm} is older than sm75 (T4), the oldest card the kernels run on"
    if capability < BF16_CAPABILITY and torch.bfloat16 in dtypes:
        return False, f"{sm} has no bf16 (bf16 hardware needs sm80+; the kit uses fp16 there)"
    if capability < SUPPORTED_CAPABILITY:
        return True, (f"{sm}: fp16/fp32 through Triton's pre-Ampere path (not supported upstream: "
                      "`difflora doctor` checks it on this card)")
    return True, f"{sm}: Triton's supported hardware (sm80+)"


def auto_choice(tensor, out_dtype=None):
    """(run the Triton kernels?, why) for backend="auto" on `tensor` (and an output of `out_dtype`)."""
    forced = os.environ.get(ENV_BACKEND, "auto")
    if forced not in ("auto", "torch"):
        raise ValueError(f"{ENV_BACKEND} must be 'auto' or 'torch', got {forced!r}")
    if forced == "torch":
        return False, f"{ENV_BACKEND}=torch"
    if not tensor.is_cuda:
        return False, f"a {tensor.device.type} tensor (the kernels run on CUDA)"
    if str(tensor.device) in _FAILED:
        return False, f"the kernels failed on {tensor.device} earlier in this process: {_FAILED[str(tensor.device)]}"
    return triton_choice(torch.cuda.get_device_capability(tensor.device), (tensor.dtype, out_dtype),
                         triton is not None)


def use_triton(tensor, out_dtype=None):
    """True when backend="auto" runs the Triton kernels for `tensor` (see triton_choice)."""
    return auto_choice(tensor, out_dtype)[0]


def _want_triton(backend, tensor, out_dtype=None):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return use_triton(tensor, out_dtype)
    if triton is None:
        raise RuntimeError("backend='triton' needs the `triton` package, which is not installed")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                           "before triton is imported")
    return True


def _run(backend, tensor, out_dtype, kernel, reference):
    """kernel() or reference(), as `backend` says. Under "auto" an error of the kernel on any card (a
    compile or launch failure: ptxas refusing the card, or Triton unable to build its launcher at first
    use because the machine has no C compiler or no Python headers) falls back to the reference for the
    rest of the process on that device, with a warning, and is recorded in _FAILED; an out-of-memory
    error is raised (the reference would need more memory still). backend="triton" always raises."""
    if not _want_triton(backend, tensor, out_dtype):
        return reference()
    if backend == "triton":
        return kernel()
    try:
        return kernel()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # a build or launch error (Triton raises many types: PTXASError, CalledProcessError, ...)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _FAILED[str(tensor.device)] = f"{type(e).__name__}: {first}"
        warnings.warn(f"the Triton merge kernels failed on {tensor.device} ({_FAILED[str(tensor.device)]}); "
                      "using the PyTorch reference from now on (same results, slower). If Triton could not "
                      "build its launcher, install a C compiler and the Python headers (e.g. apt install gcc "
                      "python3-dev); run `difflora doctor` and report its output.", RuntimeWarning, stacklevel=3)
        return reference()


def _on_device(device):
    """The context a launch runs in: Triton launches on the *current* CUDA device and its stream, not on
    its tensors' device, so a tensor on cuda:1 needs cuda:1 made current first. Nothing on a CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def rank_pad(r):
    """Rank padded so the kernels compile on a GPU: the next power of two, at least 16 (tl.dot needs
    dims >= 16, tl.arange a power of two: a multiple of 16 such as 48 failed to compile)."""
    return max(16, 1 << (r - 1).bit_length())


def _check(base, A, B):
    out, in_ = base.shape
    r = A.shape[0]
    if A.shape != (r, in_) or B.shape != (out, r):
        raise ValueError(f"shape mismatch: base {tuple(base.shape)}, A {tuple(A.shape)} "
                         f"(want [r, {in_}]), B {tuple(B.shape)} (want [{out}, r])")


def _padded_lora(A, B, device):
    """A [r, in] -> fp32 [R_PAD, in], B [out, r] -> fp32 [out, R_PAD], zero-padded, contiguous."""
    r, r_pad = A.shape[0], rank_pad(A.shape[0])
    a = torch.zeros(r_pad, A.shape[1], dtype=torch.float32, device=device)
    b = torch.zeros(B.shape[0], r_pad, dtype=torch.float32, device=device)
    a[:r].copy_(A)
    b[:, :r].copy_(B)
    return a, b, r_pad


def _blocks(r_pad, block_m, block_k):
    """(BLOCK_M, BLOCK_K): one fixed config (no autotune: it fails on a CPU host), read off the compile
    matrix (kernels/compile_matrix.py; kernels/README.md has the table): 32 rows, and K tiles that keep
    the A tile R_PAD x BLOCK_K at 2048 fp32 (8 KiB): 128 wide at rank pad 16, 64 at 32, 32 at 64, 16
    from 128 on. Wider tiles at the larger ranks made ptxas spill (e.g. 64-wide at rank pad 64: 7.7 KB
    per thread on sm80; 32-wide at 128: 1.7 KB on sm90); these spill at most 4 bytes on sm80-sm90."""
    return block_m or 32, block_k or min(128, max(16, 1 << ((2048 // r_pad).bit_length() - 1)))


def quant_launch(src, scb_in, A, B, scale, block_m=None, block_k=None):
    """Everything one _merge_quant_kernel launch needs, built from the inputs, launching nothing:
    (grid, args, meta, (CB' [M, K] int8, SCB' [M] fp32) outputs, allocated here). src is W (fp) or CB
    (int8, then scb_in is its SCB [M]). kernels/compile_matrix.py compiles exactly these arguments."""
    M, K = src.shape
    a, b, r_pad = _padded_lora(A, B, src.device)
    bm, bk = _blocks(r_pad, block_m, block_k)
    cb = torch.empty(M, K, dtype=torch.int8, device=src.device)
    scb = torch.empty(M, dtype=torch.float32, device=src.device)
    args = (src, scb_in if scb_in is not None else scb, a, b, cb, scb, M, K, float(scale))
    meta = dict(SRC_INT8=scb_in is not None, BLOCK_M=bm, BLOCK_K=bk, R_PAD=r_pad)
    return (triton.cdiv(M, bm),), args, meta, (cb, scb)


def dequant_launch(CB, SCB, A, B, scale, out_dtype, block_m=None, block_k=None):
    """Everything one _dequant_merge_kernel launch needs: (grid, args, meta, W' [M, K] in out_dtype)."""
    M, K = CB.shape
    a, b, r_pad = _padded_lora(A, B, CB.device)
    bm, bk = _blocks(r_pad, block_m, block_k)
    out = torch.empty(M, K, dtype=out_dtype, device=CB.device)
    args = (CB.contiguous(), SCB.float().contiguous(), a, b, out, M, K, float(scale))
    return (triton.cdiv(M, bm),), args, dict(BLOCK_M=bm, BLOCK_K=bk, R_PAD=r_pad), out


def _launch_quant(src, scb_in, A, B, scale, block_m, block_k):
    grid, args, meta, outputs = quant_launch(src, scb_in, A, B, scale, block_m, block_k)
    with _on_device(src.device):
        _merge_quant_kernel[grid](*args, **meta)
    return outputs


def _launch_dequant(CB, SCB, A, B, scale, out_dtype, block_m, block_k):
    grid, args, meta, out = dequant_launch(CB, SCB, A, B, scale, out_dtype, block_m, block_k)
    with _on_device(CB.device):
        _dequant_merge_kernel[grid](*args, **meta)
    return out


# ----------------------------------------------------------------------------- public API
def merge_quantize(W, A, B, scale, backend="auto", block_m=None, block_k=None):
    """W [out, in] (fp16/bf16/fp32) + scale * B @ A -> row-wise int8 (CB [out, in], SCB [out]).

    One launch, two passes over `in` per row block (absmax, then quantize); the merged weight
    is never stored."""
    _check(W, A, B)
    return _run(backend, W, None,
                lambda: _launch_quant(W.contiguous(), None, A, B, scale, block_m, block_k),
                lambda: merge_quantize_reference(W, A, B, scale))


def remerge_int8(CB, SCB, A, B, scale, backend="auto", block_m=None, block_k=None):
    """int8 base (CB, SCB) + scale * B @ A -> requantized (CB', SCB'), one launch, two passes.

    Always call it on the PRISTINE base (the int8 weights as loaded), never on an already merged
    one: each requantization rounds again, so chaining merges/unmerges drifts by up to 1 LSB per
    round trip. To switch LoRAs, remerge the pristine base with the new LoRA."""
    _check(CB, A, B)
    return _run(backend, CB, None,
                lambda: _launch_quant(CB.contiguous(), SCB.float().contiguous(), A, B, scale,
                                      block_m, block_k),
                lambda: remerge_int8_reference(CB, SCB, A, B, scale))


def dequant_merge(CB, SCB, A, B, scale, out_dtype=torch.float16, backend="auto",
                  block_m=None, block_k=None):
    """int8 base (CB [out, in], SCB [out]) + scale * B @ A -> W' [out, in] in out_dtype."""
    _check(CB, A, B)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
    return _run(backend, CB, out_dtype,
                lambda: _launch_dequant(CB, SCB, A, B, scale, out_dtype, block_m, block_k),
                lambda: dequant_merge_reference(CB, SCB, A, B, scale, out_dtype))

