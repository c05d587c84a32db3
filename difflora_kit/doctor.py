"""`difflora doctor`: the environment, then every path the kit computes with, each checked against
its reference on this machine.

    python -m difflora_kit.doctor                 # the device the kit picks: CUDA when there is one
    python -m difflora_kit.doctor --device cpu

One line per check (a FAIL adds a line: what the kit does instead, and what to report):

    PASS|FAIL|WARN|SKIP|INFO  <name>  <measured error (tolerance)>  <seconds>

WARN: the path did not work here but the kit takes another by itself (a merge kernel that cannot
build on this card: backend="auto" merges with the PyTorch reference). INFO: a number worth
knowing, not a check.

    check                  what runs                                      against
    int8 quantization      the kit's row-wise quantizer (kernels' ref.)   bitsandbytes' int8_vectorwise_quant
    int8 linear            quant.Int8Linear forward + input gradient,     the fp32 matmul with the dequantized
                           in 640 -> out 1280 (bitsandbytes' int8 matmul  weight; bitsandbytes' Linear8bitLt
                           would take cuBLASLt there), Gaussian inputs    (on a CPU the same weight-only
                           and inputs with an outlier channel (100x)      arithmetic: a check; on CUDA it
                                                                          quantizes activations: INFO)
    merge kernels          merge_quantize, remerge_int8, dequant_merge    their PyTorch references
                           (backend="triton", odd shapes: tails in both
                           dims); on a CPU in Triton's interpreter, in a
                           subprocess with TRITON_INTERPRET=1 (fp32/fp16:
                           the interpreter's bf16 arithmetic is wrong).
                           On a card, the dispatch rule decides: a case
                           backend="auto" never sends to Triton there is
                           a SKIP; a kernel that raises is a WARN where
                           "auto" falls back to the reference, else a
                           FAIL; a wrong result is a FAIL on every card
    toy training           10 steps, batch 2, on the GPU                  the same 10 steps on the CPU (SKIP
                                                                          without CUDA)
    sweep                  several strengths in one batched call          one call per strength

On a 2-core CPU the whole run takes 20-35 s (about 10 s of it imports; the interpreter subprocess
runs beside the other checks). Exit code: 0 every check passed, warned or was skipped, 1 a check
failed, 2 the doctor itself could not run (an import failed, or the device asked for is not there).

Tolerances (TOL) and where they come from: a CPU computes these paths exactly as bitsandbytes does
(bit for bit, measured); on CUDA bitsandbytes' quantizer divides approximately (+-1 LSB, STACK_NOTES).
The kit's 8-bit linear is weight-only on every device (quant.py): against the fp32 matmul of the
dequantized weight a CPU measured 1.4e-7 (fp32), 3.0e-4 (fp16) and 2.4e-3 (bf16) relative on this
check's inputs, outlier case included; the CUDA bounds leave room for cuBLAS' reduced-precision
reductions and TF32 (fp32). bitsandbytes' int8 activations would be ~6% off on the outlier case
(bench/results/w8a8_cost.md), far outside them. The GPU-vs-CPU training bounds are 3-4x what a CPU
emulation of bitsandbytes' int8 activations moved 10 steps (losses 0.7%, LoRA update 6.5%): generous
now that the GPU computes weight-only like the CPU. The CUDA tolerances are reasoned, not yet
measured on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import warnings

REPORT = ("report: paste the environment block above and this line into an issue of the "
          "difflora-kit project")
STATUSES = ("PASS", "FAIL", "WARN", "SKIP", "INFO")
MERGE_SHAPES = {"cpu": [(67, 131, 5)], "cuda": [(67, 131, 5), (1000, 1030, 16)]}  # (out, in, rank)
QUANT_SHAPES = [(67, 131), (1000, 1030)]
LINEAR_SHAPE = (640, 1280)  # (in, out): multiples of 16, so bitsandbytes' int8 matmul would reach cuBLASLt
OUTLIER = (5, 100.0)  # (channel, factor): one input channel 100x the others, as diffusion activations have
TOL = {
    "quant_lsb": {"cpu": 0, "cuda": 1},  # int8 codes vs bitsandbytes: max |dCB| in LSB
    "quant_frac": {"cpu": 0.0, "cuda": 0.01},  # ... and the fraction of codes that differ at all
    "linear_bnb": 0.0,  # relative error vs Linear8bitLt on a CPU (the same weight-only path), forward and grad
    "linear_fp32": {"float32": {"cpu": 1e-5, "cuda": 2e-3},  # relative error vs the dequantized fp32
                    "float16": {"cpu": 2e-3, "cuda": 3e-3},  # matmul, forward and grad (CPU measured:
                    "bfloat16": {"cpu": 1e-2, "cuda": 1.5e-2}},  # 1.4e-7, 3.0e-4, 2.4e-3)
    "merge_lsb": 1, "merge_frac": 0.01, "merge_scb": 1e-5,  # kernel vs reference (as tests/test_kernels.py)
    "dequant": {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3},  # relative, kernel vs reference
    "train_loss": 0.03, "train_delta": 0.2,  # GPU vs CPU: max relative loss gap; pooled rel. LoRA update
    "sweep": {"cpu": 1e-4, "cuda": 3e-2},  # max |pixel difference| (pixels in [0, 1])
}
SWEEP_STRENGTHS = [0.0, 0.5, 1.0]
_RESULTS_MARK = "DIFFLORA_DOCTOR_RESULTS "  # the interpreter subprocess' line of JSON results


@dataclasses.dataclass
class Result:
    """One check's outcome: one line of the report (two on a FAIL)."""

    status: str
    """PASS, FAIL, WARN (the kit takes another path by itself), SKIP or INFO (a number, not a check)."""
    name: str
    detail: str
    """The measured error against its tolerance; for a SKIP, why it was skipped."""
    seconds: float = 0.0
    instead: str = ""
    """On a FAIL or a WARN: what the kit does instead."""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def lines(self) -> list[str]:
        first = f"{self.status:<4}  {self.name:<50}  {self.detail:<60}  {self.seconds:6.2f} s"
        if self.status == "WARN":
            return [first, f"      -> {self.instead}"]
        if self.status != "FAIL":
            return [first]
        return [first, f"      -> {self.instead or 'the kit has no other path for this'}; {REPORT}"]


# ----------------------------------------------------------------------------- measures (pure)
def rel_error(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are zero; inf when x is not finite)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(x.isfinite().all()):
        return float("inf")
    norm = float(ref.norm())
    diff = float((x - ref).norm())
    return diff / norm if norm > 0 else diff


def code_error(cb, ref_cb) -> tuple[int, float]:
    """(max |cb - ref_cb| in LSB, fraction of codes that differ) of two int8 code tensors."""
    diff = (cb.detach().int().cpu() - ref_cb.detach().int().cpu()).abs()
    return int(diff.max()), float((diff > 0).float().mean())


def verdict(ok: bool, name: str, detail: str, instead: str = "") -> Result:
    return Result("PASS" if ok else "FAIL", name, detail, instead=instead)


def _g(x: float) -> str:
    return f"{x:.1e}" if x not in (0.0, float("inf")) else ("0" if x == 0 else "inf")


def timed(fn, *args, **kwargs) -> list[Result]:
    """fn(*args) -> Result or [Result], its time written into each; an exception is a FAIL naming it."""
    started = time.perf_counter()
    name = kwargs.pop("name", fn.__name__)
    instead = kwargs.pop("instead", "")
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # a check that cannot even run is a failed check, not a crashed doctor
        first = (str(e).strip().splitlines() or [""])[0][:160]
        out = Result("FAIL", name, f"raised {type(e).__name__}: {first}", instead=instead)
    results = [out] if isinstance(out, Result) else list(out)
    if not any(r.seconds for r in results):  # sub-checks that timed themselves keep their times
        for r in results:
            r.seconds = (time.perf_counter() - started) / len(results)
    return results


def _kind(device) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


# ----------------------------------------------------------------------------- int8 quantization
def check_int8_quantization(device) -> Result:
    """The kit's row-wise quantizer (the merge kernels' reference) vs bitsandbytes' on fp16 weights
    (what quant.quantize_linears hands bitsandbytes), odd shapes and a zero row."""
    import torch
    from bitsandbytes.functional import int8_vectorwise_quant

    from .kernels import lora_merge as lm

    kind, worst_lsb, worst_frac, worst_scb = _kind(device), 0, 0.0, 0.0
    for out, in_ in QUANT_SHAPES:
        g = torch.Generator().manual_seed(out + in_)
        W = (torch.randn(out, in_, generator=g) * 3).half()
        W[out // 2] = 0  # a zero row: scale 0, codes 0 in both
        W = W.to(device)
        cb, scb = lm.quantize_rowwise_reference(W)
        ref_cb, ref_scb, _ = int8_vectorwise_quant(W)
        lsb, frac = code_error(cb, ref_cb)
        worst_lsb, worst_frac = max(worst_lsb, lsb), max(worst_frac, frac)
        worst_scb = max(worst_scb, rel_error(scb, ref_scb))
    tol_lsb, tol_frac = TOL["quant_lsb"][kind], TOL["quant_frac"][kind]
    ok = worst_lsb <= tol_lsb and worst_frac <= tol_frac and worst_scb <= 1e-6
    return verdict(ok, "int8 quantization vs bitsandbytes [fp16 W]",
                   f"max {worst_lsb} LSB, {worst_frac:.2%} off, SCB {_g(worst_scb)} "
                   f"(tol {tol_lsb} LSB, {tol_frac:.0%}, 1e-6)",
                   "the kit quantizes with bitsandbytes itself (quant.quantize_linears); the merge "
                   "kernels' results would differ from it by this much")


# ----------------------------------------------------------------------------- the 8-bit linear
def _bitsandbytes_twin(ours):
    """bitsandbytes' own Linear8bitLt holding the kit layer's int8 weight, scales and bias."""
    import bitsandbytes as bnb
    from torch import nn

    from . import quant

    CB, SCB = quant.int8_state(ours)
    theirs = bnb.nn.Linear8bitLt(ours.in_features, ours.out_features, bias=True, has_fp16_weights=False,
                                 threshold=0.0, device="meta")
    theirs.weight = bnb.nn.Int8Params(CB.clone(), requires_grad=False, has_fp16_weights=False,
                                      CB=CB.clone(), SCB=SCB.clone())
    theirs.bias = nn.Parameter(ours.bias.detach().clone(), requires_grad=False)
    return theirs


def linear_inputs(dtype, outlier: bool, device) -> tuple:
    """x (2, 16, in) and an output gradient (2, 16, out) for the int8 linear check: Gaussian (std 3),
    or with input channel OUTLIER[0] scaled by OUTLIER[1]."""
    import torch

    (in_, out), g = LINEAR_SHAPE, torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, in_, generator=g) * 3  # (B, T, in)
    if outlier:
        x[..., OUTLIER[0]] *= OUTLIER[1]
    grad = torch.randn(2, 16, out, generator=g)  # (B, T, out)
    return x.to(device, dtype).requires_grad_(True), grad.to(device, dtype)


def forward_backward(layer, x, grad) -> tuple:
    """(y, dL/dx) of layer(x) for the output gradient `grad`."""
    import torch

    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y, gx


def check_int8_linear(device, dtype) -> list[Result]:
    """quant.Int8Linear (forward, and the gradient w.r.t. its input) on a layer bitsandbytes' int8
    matmul would send to cuBLASLt, with Gaussian inputs and with an outlier channel: against the fp32
    matmul with the dequantized weight (the kit is weight-only on every device), and against
    bitsandbytes' Linear8bitLt holding the same int8 weight (a CPU: the same arithmetic, bit for bit;
    CUDA: bitsandbytes quantizes the activations to int8, so its difference is INFO, not a check)."""
    import torch
    from torch import nn

    from . import quant

    kind, label = _kind(device), str(dtype).removeprefix("torch.")
    short = label.replace("bfloat", "bf").replace("float", "fp")
    torch.manual_seed(0)
    ours = quant.quantize_linears(nn.Sequential(nn.Linear(*LINEAR_SHAPE)).to(device))[0]
    theirs = _bitsandbytes_twin(ours).train()
    W = quant.dequantized_weight(ours)  # (out, in) fp32
    bias = ours.bias.detach().float()
    instead = ("nothing else: every 8-bit model (training and sampling) goes through this layer; "
               "train with --no-eight-bit (full-precision base) until it is fixed")
    tol = TOL["linear_fp32"][label][kind]
    results = []
    for case in ("gaussian", f"outlier {OUTLIER[1]:.0f}x"):
        x, grad = linear_inputs(dtype, case != "gaussian", device)
        y, gx = forward_backward(ours, x, grad)
        y_fp32 = x.detach().float() @ W.T + bias  # (B, T, in) @ (in, out) -> (B, T, out)
        gx_fp32 = grad.float() @ W  # (B, T, out) @ (out, in) -> (B, T, in)
        fwd, bwd = rel_error(y, y_fp32), rel_error(gx, gx_fp32)
        results.append(verdict(fwd <= tol and bwd <= tol, f"int8 linear vs fp32 matmul [{short}, {case}]",
                               f"rel fwd {_g(fwd)}, bwd {_g(bwd)} (tol {_g(tol)})", instead))
        y_bnb, gx_bnb = forward_backward(theirs, x, grad)
        fwd, bwd = rel_error(y, y_bnb), rel_error(gx, gx_bnb)
        name = f"int8 linear vs bitsandbytes [{short}, {case}]"
        if kind == "cpu":
            results.append(verdict(fwd <= TOL["linear_bnb"] and bwd <= TOL["linear_bnb"], name,
                                   f"rel fwd {_g(fwd)}, bwd {_g(bwd)} (tol {_g(TOL['linear_bnb'])})", instead))
        else:
            results.append(Result("INFO", name, f"rel fwd {_g(fwd)}, bwd {_g(bwd)}: its int8 activations "
                                                 "(the kit is weight-only)"))
    return results


# ----------------------------------------------------------------------------- merge kernels
def merge_cases(device) -> list[tuple[str, object]]:
    """(kernel, dtype) pairs to check: the weight's dtype (merge_quantize), the output's
    (dequant_merge), None for remerge_int8 (an int8 base). bf16 only on a card (not the interpreter)."""
    import torch

    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if _kind(device) == "cuda" else [])
    return ([("merge_quantize", d) for d in dtypes] + [("remerge_int8", None)]
            + [("dequant_merge", d) for d in dtypes])


def merge_name(kernel: str, dtype, interpreted: bool) -> str:
    label = {"merge_quantize": "{} W", "dequant_merge": "-> {}"}.get(kernel, "int8 base")
    label = label.format(str(dtype).removeprefix("torch.").replace("float", "fp")) if dtype is not None else label
    return f"{kernel} [{label}] {'interpreted' if interpreted else 'triton'} vs ref"


def check_merge_case(lm, kernel: str, dtype, device) -> Result:
    """One merge kernel, backend="triton", against its PyTorch reference on odd shapes (tails in
    both dims, a rank that is not a multiple of 16)."""
    import torch

    interpreted = _kind(device) == "cpu"
    name = merge_name(kernel, dtype, interpreted)
    lsb = frac = scb = err = 0.0
    for out, in_, r in MERGE_SHAPES[_kind(device)]:
        g = torch.Generator().manual_seed(out * 7 + in_ * 3 + r)
        W = torch.randn(out, in_, generator=g)
        A, B = torch.randn(r, in_, generator=g).to(device), torch.randn(out, r, generator=g).to(device)
        s = 0.5 / r ** 0.5
        if kernel == "merge_quantize":
            W = W.to(device, dtype)
            got, ref = lm.merge_quantize(W, A, B, s, backend="triton"), lm.merge_quantize_reference(W, A, B, s)
        else:
            CB, SCB = lm.quantize_rowwise_reference(W.to(device))
            if kernel == "remerge_int8":
                got = lm.remerge_int8(CB, SCB, A, B, s, backend="triton")
                ref = lm.remerge_int8_reference(CB, SCB, A, B, s)
            else:
                got = lm.dequant_merge(CB, SCB, A, B, s, dtype, backend="triton")
                ref = lm.dequant_merge_reference(CB, SCB, A, B, s, dtype)
                err = max(err, rel_error(got, ref) if got.dtype == ref.dtype else float("inf"))
                continue
        (cb, cb_scale), (ref_cb, ref_scale) = got, ref
        case_lsb, case_frac = code_error(cb, ref_cb)
        lsb, frac, scb = max(lsb, case_lsb), max(frac, case_frac), max(scb, rel_error(cb_scale, ref_scale))
    if interpreted:
        instead = ("nothing changes on a CPU: the kit always merges with the PyTorch reference there "
                   "(the kernels run on CPUs only in tests)")
    else:
        instead = ("backend='auto' still runs this kernel on this card: set DIFFLORA_MERGE_KERNELS=torch "
                   "to merge with the PyTorch reference (same results, slower)")
    if kernel == "dequant_merge":
        tol = TOL["dequant"][str(dtype).removeprefix("torch.")]
        return verdict(err <= tol, name, f"rel {_g(err)} (tol {_g(tol)})", instead)
    ok = lsb <= TOL["merge_lsb"] and frac <= TOL["merge_frac"] and scb <= TOL["merge_scb"]
    return verdict(ok, name, f"max {int(lsb)} LSB, {frac:.2%} off, SCB {_g(scb)} "
                             f"(tol {TOL['merge_lsb']} LSB, {TOL['merge_frac']:.0%}, {_g(TOL['merge_scb'])})",
                   instead)


def kernels_interpreted(lm) -> bool:
    """Were the kernels of this process defined under TRITON_INTERPRET=1 (so they run on CPU tensors)?"""
    return type(getattr(lm, "_merge_quant_kernel", None)).__name__ == "InterpretedFunction"


def _raised_instead(capability) -> str:
    """What the kit does when a merge kernel raises (compile or launch error) on this device."""
    from .kernels import lora_merge as lm

    if capability is None:
        return "nothing changes on a CPU: the kit always merges with the PyTorch reference there"
    if tuple(capability) < lm.SUPPORTED_CAPABILITY:
        return ("under backend='auto' a kernel error on this card makes the kit merge with the PyTorch "
                "reference instead (with a warning)")
    return ("fusing a preset would raise this error: set DIFFLORA_MERGE_KERNELS=torch to merge with the "
            "PyTorch reference (same results, slower)")


def auto_outcome(lm, kernel: str, dtype, device) -> tuple[bool, str]:
    """(does backend="auto" give a result, what it did) for `kernel` on `device`: the dispatch's own
    answer to a kernel that raised under backend="triton" (it falls back to the PyTorch reference
    with a warning, or raises too)."""
    import torch

    out, in_, r = MERGE_SHAPES["cpu"][0]
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out, in_, generator=g)
    A, B = torch.randn(r, in_, generator=g).to(device), torch.randn(out, r, generator=g).to(device)
    probe = W.to(device, dtype) if kernel == "merge_quantize" else W.to(device).to(torch.int8)
    sends, why = lm.auto_choice(probe, dtype if kernel == "dequant_merge" else None)
    if not sends:  # e.g. the kernels already failed on this device in this process
        return True, f"backend='auto' uses the PyTorch reference here ({why})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if kernel == "merge_quantize":
                lm.merge_quantize(W.to(device, dtype), A, B, 0.5, backend="auto")
            else:
                CB, SCB = lm.quantize_rowwise_reference(W.to(device))
                if kernel == "remerge_int8":
                    lm.remerge_int8(CB, SCB, A, B, 0.5, backend="auto")
                else:
                    lm.dequant_merge(CB, SCB, A, B, 0.5, dtype, backend="auto")
        except Exception as e:  # what a user's merge would raise
            return False, f"backend='auto' raises it too ({type(e).__name__})"
    fell_back = any("PyTorch reference" in str(w.message) for w in caught)
    return True, ("backend='auto' falls back to the PyTorch reference" if fell_back
                  else "backend='auto' ran the kernel without an error")


def merge_case_on_card(lm, kernel: str, dtype, device, capability) -> Result:
    """check_merge_case; where the kernel raises on a card (a build or launch error), the dispatch
    rule decides: a WARN if backend="auto" still merges (it falls back to the reference), a FAIL if
    it raises too. A wrong result stays a FAIL on every card ("auto" would use it)."""
    try:
        return check_merge_case(lm, kernel, dtype, device)
    except Exception as e:
        if capability is None:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:120]
        works, what = auto_outcome(lm, kernel, dtype, device)
        name = merge_name(kernel, dtype, False)
        detail = f"raised {type(e).__name__}: {first}; {what}"
        if works:
            return Result("WARN", name, detail, instead="the kit merges with the PyTorch reference on this card "
                                                        "(same results, slower); nothing to do")
        return Result("FAIL", name, detail, instead=_raised_instead(capability))


def check_merge_kernels(device, capability=None, cases=None) -> list[Result]:
    """Every merge case on `device` in this process: on CUDA compiled for the card, whose capability
    is read here (`capability` stands in for it in tests); cases the dispatch sends to the PyTorch
    reference on that card are a SKIP saying why. On a CPU without `capability` the kernels must
    already be interpreted here (merge_kernels_in_subprocess arranges it). `cases`: (kernel, dtype)
    pairs, merge_cases(device) by default."""
    from .kernels import lora_merge as lm

    results = []
    if lm.triton is None:
        return [Result("SKIP", "merge kernels (triton)", "Triton is not installed: the kit merges with "
                                                         "the PyTorch reference")]
    if _kind(device) == "cuda":
        import torch

        capability = torch.cuda.get_device_capability(device)
    elif capability is None and not kernels_interpreted(lm):
        return [Result("FAIL", "merge kernels (triton interpreter)",
                       "the kernels were compiled, not interpreted: set TRITON_INTERPRET=1 before "
                       "importing triton", instead="the kit merges with the PyTorch reference on a CPU")]
    for kernel, dtype in cases or merge_cases(device):
        if capability is not None:
            ok, why = lm.triton_choice(capability, (dtype,), True)
            if not ok:
                results.append(Result("SKIP", merge_name(kernel, dtype, False),
                                      f"{why}: backend='auto' uses the PyTorch reference"))
                continue
        results += timed(merge_case_on_card, lm, kernel, dtype, device, capability,
                         name=merge_name(kernel, dtype, capability is None), instead=_raised_instead(capability))
    return results


def start_merge_subprocess() -> subprocess.Popen:
    """The interpreter run of the merge checks, started now (it overlaps the other checks)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # before anything imports triton there
    code = "from difflora_kit.doctor import _merge_worker; _merge_worker()"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def merge_kernels_in_subprocess(proc: subprocess.Popen | None = None, timeout: float = 300) -> list[Result]:
    """The merge checks on a CPU, in a subprocess whose environment sets TRITON_INTERPRET=1 before
    import; its results come back as one line of JSON."""
    started = time.perf_counter()
    proc = proc or start_merge_subprocess()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [Result("FAIL", "merge kernels (triton interpreter)", f"no answer in {timeout:.0f} s",
                       time.perf_counter() - started, "the kit merges with the PyTorch reference on a CPU")]
    for line in stdout.splitlines():
        if line.startswith(_RESULTS_MARK):
            return [Result(**r) for r in json.loads(line[len(_RESULTS_MARK):])]
    tail = " | ".join(stderr.strip().splitlines()[-2:])[:200]
    return [Result("FAIL", "merge kernels (triton interpreter)", f"the subprocess exited {proc.returncode}: {tail}",
                   time.perf_counter() - started, "the kit merges with the PyTorch reference on a CPU")]


def _merge_worker() -> None:
    """Inside the interpreter subprocess: run the CPU merge checks, print them as JSON."""
    results = check_merge_kernels("cpu")
    print(_RESULTS_MARK + json.dumps([dataclasses.asdict(r) for r in results]), flush=True)


# ----------------------------------------------------------------------------- toy training
@contextlib.contextmanager
def _quiet_loading():
    """No transformers "Loading weights" progress bar while the doctor loads the toy."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _first_pair():
    from .backends.toy import DATA_SAMPLES
    from .images import load_image
    from .toy.pairs import read_pairs

    row = read_pairs(DATA_SAMPLES / "pairs" / "metadata.jsonl")[0]
    return load_image(row["image1"]), row["prompt"]


def update_error(deltas: dict, ref: dict) -> float:
    """sqrt(sum ||dW - dW_ref||^2 / sum ||dW_ref||^2) over modules ({name: tensor} each)."""
    num = sum(float(((deltas[k].double().cpu() - ref[k].double().cpu()) ** 2).sum()) for k in ref)
    den = sum(float((ref[k].double() ** 2).sum()) for k in ref)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def check_training(device) -> Result:
    """10 toy training steps (8-bit base, batch 2) on the GPU vs the same 10 on the CPU: the losses
    and the LoRA's weight update. The noise is drawn on the CPU, so both runs see the same."""
    name = "toy training: 10 steps on the GPU vs the CPU"
    if _kind(device) != "cuda":
        return Result("SKIP", name, f"a GPU check: the device is {device}, not CUDA")
    from . import lora
    from .config import TrainConfig
    from .pair import prepare_base
    from .train import train_lora

    image, prompt = _first_pair()
    cfg = TrainConfig(steps=10, batch=2)
    runs = {}
    for dev in (str(device), "cpu"):
        with _quiet_loading():
            backend = prepare_base("toy", cfg, device=dev)
        runs[dev] = train_lora(backend, image, prompt, cfg, progress=False)
    gpu, cpu = runs[str(device)], runs["cpu"]
    loss = max(abs(a - b) / abs(b) for a, b in zip(gpu.losses, cpu.losses))
    delta = update_error(lora.module_deltas(gpu.lora), lora.module_deltas(cpu.lora))
    ok = loss <= TOL["train_loss"] and delta <= TOL["train_delta"]
    return verdict(ok, name, f"loss {_g(loss)}, update {_g(delta)} (tol {_g(TOL['train_loss'])}, "
                             f"{_g(TOL['train_delta'])})",
                   "train on the CPU instead: --device cpu (CLI), DEVICE = 'cpu' (notebooks) or "
                   "DIFFLORA_DEVICE=cpu")


# ----------------------------------------------------------------------------- sweep
def random_lora(rank: int = 4, seed: int = 0, b_scale: float = 0.2):
    """A LoRA for the toy with random A (peft's init) and random B: a visible effect, no training."""
    import torch

    from . import backends, lora
    from .config import DEFAULT_TARGETS

    with _quiet_loading():
        unet = backends.load_backend("toy", "cpu").unet
    torch.manual_seed(seed)
    lora.attach(unet, rank, float(rank), DEFAULT_TARGETS, "doctor")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".doctor." in n and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    tensors, config = lora.adapter_state(unet, "doctor")
    return lora.LoraFile(tensors, config, {})


def check_sweep(device) -> Result:
    """sample.sweep with several strengths in one batched call vs one call per strength (8-bit toy,
    3 sampling steps, 1 prompt x 2 seeds): the same images within TOL["sweep"]."""
    import numpy as np

    from . import sample
    from .config import SampleConfig, TrainConfig
    from .pair import prepare_base

    kind = _kind(device)
    with _quiet_loading():
        backend = prepare_base("toy", TrainConfig(), device=str(device))
    lora2, cfg = random_lora(), SampleConfig(steps=3)
    prompts, seeds = ["a red triangle on a blue background"], [0, 1]
    batched = sample.sweep(backend, lora2, prompts, seeds, SWEEP_STRENGTHS, cfg)  # (P, S, K, H, W, 3)
    alone = np.stack([sample.sweep(backend, lora2, prompts, seeds, [s], cfg)[:, :, 0] for s in SWEEP_STRENGTHS],
                     axis=2)
    err = float(np.abs(batched - alone).max())
    effect = float(np.abs(alone[:, :, -1] - alone[:, :, 0]).mean())  # s = 1 vs s = 0: the LoRA acts
    tol = TOL["sweep"][kind]
    return verdict(err <= tol and effect > 1e-3, f"sweep: {len(SWEEP_STRENGTHS)} strengths batched vs alone [{kind}]",
                   f"max |d| {_g(err)} (tol {_g(tol)}), LoRA effect {effect:.3f} (> 1e-3)",
                   "nothing else: sweeps, sliders and the evaluation batch strengths this way; sample one "
                   "strength per call (difflora sample --scale) until it is fixed")


# ----------------------------------------------------------------------------- environment
def environment(device) -> list[tuple[str, str]]:
    """(label, value) rows: python, torch, CUDA, the card, bitsandbytes, triton, the device picked."""
    import torch

    rows = [("python", f"{platform.python_version()} ({sys.executable})"), ("torch", torch.__version__)]
    if torch.cuda.is_available():
        index = (torch.device(device).index or 0) if _kind(device) == "cuda" else 0
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        rows += [("CUDA", f"available, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"),
                 ("card", f"{torch.cuda.get_device_name(index)} (cuda:{index})"),
                 ("capability", f"sm{major}{minor}"),
                 ("memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")]
    else:
        rows += [("CUDA", f"not available (torch built with CUDA {torch.version.cuda})" if torch.version.cuda
                  else "not available (a CPU build of torch)")]
    rows += [("bitsandbytes", _version("bitsandbytes")), ("triton", _version("triton")),
             ("device", f"{device} (" + ("CUDA is available" if _kind(device) == "cuda" else
                                         "asked for: CUDA is available" if torch.cuda.is_available() else
                                         "no CUDA GPU here") + ")")]
    from .devices import compute_dtype
    from .kernels import lora_merge as lm

    rows.append(("compute dtype", str(compute_dtype(device)).removeprefix("torch.")))
    if _kind(device) == "cuda":
        cap = torch.cuda.get_device_capability(device)
        picks, whys = {}, {}
        for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            ok, why = lm.triton_choice(cap, (dtype,), lm.triton is not None)
            picks.setdefault("Triton" if ok else "PyTorch reference", []).append(label)
            whys.setdefault("Triton" if ok else "PyTorch reference", why)
        rows.append(("merge kernels", "; ".join(f"{', '.join(v)}: {k} ({whys[k]})" for k, v in picks.items())))
        if os.environ.get(lm.ENV_BACKEND) == "torch":
            rows.append(("", f"{lm.ENV_BACKEND}=torch: backend='auto' uses the PyTorch reference everywhere"))
    else:
        rows.append(("merge kernels", "PyTorch reference (a CPU); Triton checked in its interpreter"))
    return rows


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed (PackageNotFoundError), or a broken install
        return "not installed"


# ----------------------------------------------------------------------------- the run
def pick_device(device: str | None = None) -> str:
    """`device` if given (it must exist here), else CUDA when there is one, else the CPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    parsed = torch.device(device)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA GPU")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the kit runs on cpu or cuda")
    return device


def run(device: str | None = None, out=print) -> int:
    """Print the environment and every check; 0 all passed, warned or skipped, 1 a check failed, 2 the
    doctor could not run (an import failed, or no such device)."""
    started = time.perf_counter()
    proc = None
    try:
        import torch  # noqa: F401  (the imports the checks need: a failure here is exit code 2)

        device = pick_device(device)
        if _kind(device) == "cpu":
            from .kernels import lora_merge as lm

            if lm.triton is not None and not kernels_interpreted(lm):
                proc = start_merge_subprocess()  # ~10 s of imports and interpreting, beside the rest
        import bitsandbytes  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401

        from . import quant, sample, train  # noqa: F401
    except Exception as e:  # ImportError, a broken CUDA install, a bad device
        out(f"difflora doctor could not run: {type(e).__name__}: {e}")
        out(f"  python {platform.python_version()} ({sys.executable}); if the kit is installed as its "
            "README says, report this message in an issue of the difflora-kit project")
        if proc is not None:
            proc.kill()
            proc.communicate()
        return 2
    out("difflora doctor: environment")
    for label, value in environment(device):
        out(f"  {label:<14} {value}")
    out(f"checks on {device}:")
    results: list[Result] = []

    def show(new: list[Result]) -> None:
        for r in new:
            results.append(r)
            for line in r.lines():
                out(line)

    import torch

    from .devices import compute_dtype

    show(timed(check_int8_quantization, device, name="int8 quantization vs bitsandbytes"))
    for dtype in dict.fromkeys([torch.float32, compute_dtype(device)]):  # fp32 (the toy) + the card's dtype
        show(timed(check_int8_linear, device, dtype, name=f"int8 linear [{str(dtype).removeprefix('torch.')}]"))
    if proc is not None:
        show(merge_kernels_in_subprocess(proc))
    else:
        show(timed(check_merge_kernels, device, name="merge kernels (triton)",
                   instead="the kit merges with the PyTorch reference where Triton cannot run"))
    show(timed(check_training, device, name="toy training: 10 steps on the GPU vs the CPU",
               instead="train on the CPU instead: --device cpu, DEVICE = 'cpu' or DIFFLORA_DEVICE=cpu"))
    show(timed(check_sweep, device, name="sweep: strengths batched vs alone"))
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    skipped = [r.name for r in results if r.status == "SKIP"]
    extra = "".join(f", {counts[s]} {word}" for s, word in (("WARN", "warned"), ("INFO", "for information"))
                    if counts[s])
    out(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped{extra} "
        f"({time.perf_counter() - started:.1f} s)" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return 1 if counts["FAIL"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difflora_kit.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when there is one)")
    return run(parser.parse_args(argv).device)


if __name__ == "__main__":
    sys.exit(main())
