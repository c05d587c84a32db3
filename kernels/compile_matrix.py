"""Each merge kernel built for a named NVIDIA card on any machine, and what the compiler made of it.

Triton's compiler needs no GPU to build: triton.compile(ASTSource(kernel, signature, constexprs,
attrs), target=GPUTarget("cuda", capability, 32)) runs the whole pipeline (TTIR, TTGIR, LLVM IR,
PTX, then ptxas for the cubin) on a CPU. Running the result needs the card.

What is compiled is what a launch would compile: lora_merge.quant_launch / dequant_launch (the
kit's own launch code) build the arguments from CPU tensors of the case's dtypes and shape, and
Triton's own binder (the function a launch calls first) turns them into the signature, constants
and divisibility attributes ("D": a pointer 16-byte aligned, an int divisible by 16). CPU tensors
are 64-byte aligned, CUDA allocations 256-byte aligned: the same "D" either way.

  case (kernel, dtype, rank, in, card)
      -> launch args (lora_merge)  -> binder: signature, constexprs, attrs  -> triton.compile
      -> PTX:   every ld.global / st.global / cp.async traced to the kernel argument it addresses,
                with its width in bits (128 = ld.global.v4.b32 or a 16-byte cp.async)
      -> cubin: registers per thread (its resource table: cuobjdump -res-usage, shipped with Triton)
      -> ptxas's -v log of that same build: spill stores / loads (bytes per thread)

The @triton.jit functions must be defined with TRITON_INTERPRET unset (under the interpreter they are
not compilable): run `python -m difflora_kit.kernels.compile_matrix` (JSON on stdout) in a process
without it. tests/test_kernel_compile.py and bench/kernel_compile.py do.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

CARDS = {75: "T4", 80: "A100", 86: "RTX 30xx, A10", 89: "RTX 40xx, L4", 90: "H100"}
# Shared memory one block may use (opt-in maximum), bytes: CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" (7.5: 64 KB, 8.0: 163 KB, 8.6 and 8.9: 99 KB, 9.0: 227 KB).
# A kernel that builds but asks for more fails at launch (Triton's OutOfResources).
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# (kernel, dtype): W's dtype for merge_quantize, int8 for remerge_int8, the output's for dequant_merge
VARIANTS = (("merge_quantize", "float16"), ("merge_quantize", "bfloat16"), ("merge_quantize", "float32"),
            ("remerge_int8", "int8"),
            ("dequant_merge", "float16"), ("dequant_merge", "bfloat16"), ("dequant_merge", "float32"))
RANKS = (8, 32, 64, 128)  # rank pads 16 (the kit's default rank 8), 32 (last with BLOCK_K 128), 64, 128
ROWS, COLS = 64, 4096  # a layer of in = 4096: divisible by 16, as every real denoiser's linears
TAIL_COLS = 4100  # in % 16 != 0: rows start unaligned, the widths "where alignment allows" end
# Which argument is which tensor (lora_merge's kernel signatures), for the tables
MAIN_LOAD = {"merge_quantize": "src_ptr", "remerge_int8": "src_ptr", "dequant_merge": "cb_ptr"}
MAIN_STORE = {"merge_quantize": "cb_ptr", "remerge_int8": "cb_ptr", "dequant_merge": "out_ptr"}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # merge_quantize, remerge_int8 or dequant_merge
    dtype: str  # torch dtype name: the weight's (merge_quantize), "int8", or the output's (dequant_merge)
    rank: int
    cols: int  # `in`: its divisibility by 16 decides what Triton may assume about row alignment
    capability: int  # 75, 80, 86, 89, 90
    block_m: int | None = None  # None: the kit's own choice (lora_merge._blocks)
    block_k: int | None = None

    @property
    def sm(self) -> str:
        return f"sm{self.capability}"


# A control that must NOT build (a K tile of 24: tl.arange needs a power of two), so that a matrix in
# which everything "builds" is known to be able to say otherwise.
CONTROL = Case("merge_quantize", "float16", 8, COLS, 80, 32, 24)


def matrix_cases(cards=tuple(CARDS), ranks=RANKS) -> list[Case]:
    """Every kernel in every dtype the kit may send it, every rank pad, every card, in = 4096; the same
    kernels at rank 8 with in % 16 != 0 on sm80 (what an unaligned row start costs); the control."""
    cases = [Case(k, d, r, COLS, c) for c in cards for k, d in VARIANTS for r in ranks]
    return cases + [Case(k, d, 8, TAIL_COLS, 80) for k, d in VARIANTS if 80 in cards] + [CONTROL]


def dispatch_dtypes(case: Case) -> tuple:
    """The (base, output) dtypes lora_merge.triton_choice is asked about for this case."""
    dtype = getattr(torch, case.dtype)
    return {"merge_quantize": (dtype, None), "remerge_int8": (torch.int8, None),
            "dequant_merge": (torch.int8, dtype)}[case.kernel]


def vector_bits_allowed(elem_bits: int, block_m: int, block_k: int, num_warps: int) -> int:
    """The widest access a [block_m, block_k] tile allows: each of the 32 * num_warps threads holds
    block_m * block_k / threads contiguous elements of a row (Triton's blocked layout), and one
    access moves at most 128 bits."""
    return min(128, max(1, block_m * block_k // (32 * num_warps)) * elem_bits)


# ----------------------------------------------------------------------------- reading the outputs
_OPERAND_REGS = re.compile(r"%[\w.]+")


def _instructions(ptx: str):
    """(opcode, operand text) of each PTX instruction, predicates and comments stripped."""
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if not line or line[0] in ".{}$" or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%\w+\s+", "", line).rstrip(";").strip()
        if " " in line or "\t" in line:
            op, rest = line.split(None, 1)
            yield op, rest


def _access_bits(op: str, rest: str) -> int:
    """Width in bits of one global access: ld.global.v4.b32 -> 128; cp.async ..., 0x10 -> 128."""
    if op.startswith("cp.async"):
        return 8 * int(rest.split(",")[2].strip(), 0)
    vec = re.search(r"\.v(\d)", op)
    bits = re.search(r"\.[bfsu](\d+)$", op)
    return (int(vec.group(1)) if vec else 1) * int(bits.group(1))


def global_accesses(ptx: str, pointers: list[str | None]) -> dict[str, dict[str, list[int]]]:
    """{argument: {"ld" / "st": sorted widths in bits}} of the kernel's global memory accesses.

    Each address register is traced back, through every instruction that computes it, to the pointer
    parameter (`ld.param ... [name_param_N]`) it derives from: a register's origins are those of the
    registers its instruction reads (a pointer parameter for ld.param; none for data loaded from
    memory). Iterated to a fixed point so that values carried around loops are traced too. `pointers`
    names PTX parameter N: the kernel's N-th non-constexpr argument if it is a pointer, else None
    (integers such as K enter addresses too, but name no tensor); parameters past its end are
    Triton's own scratch pointers."""
    insts = list(_instructions(ptx))
    origin: dict[str, set] = {}
    changed = True
    while changed:
        changed = False
        for op, rest in insts:
            param = re.search(r"_param_(\d+)\]", rest)
            if op.startswith("ld.param") and param:
                n = int(param.group(1))
                dests = _OPERAND_REGS.findall(rest)[:1]
                srcs = {n} if n >= len(pointers) or pointers[n] else set()
            elif op.startswith(("st.", "cp.async", "bar.", "ret", "bra", "@")):
                continue
            else:
                head, _, tail = rest.partition("}") if rest.startswith("{") else rest.partition(",")
                dests = _OPERAND_REGS.findall(head)
                srcs = set() if op.startswith("ld.") else set().union(
                    *(origin.get(r, set()) for r in _OPERAND_REGS.findall(tail)))
            for d in dests:
                if not srcs <= origin.setdefault(d, set()):
                    origin[d] |= srcs
                    changed = True
    found: dict[str, dict[str, set]] = {}
    for op, rest in insts:
        if op.startswith("ld.global"):
            kind, address = "ld", rest[rest.index("["):]
        elif op.startswith("st.global"):
            kind, address = "st", rest[:rest.index("]")]
        elif op.startswith("cp.async") and ".global" in op:
            kind, address = "ld", rest.split("]", 1)[1]  # [shared], [global], bytes
        else:
            continue
        params = set().union(*(origin.get(r, set()) for r in _OPERAND_REGS.findall(address.split("]")[0])))
        name = pointers[min(params)] if len(params) == 1 and min(params) < len(pointers) else "?"
        found.setdefault(name, {"ld": set(), "st": set()})[kind].add(_access_bits(op, rest))
    return {name: {k: sorted(v) for k, v in kinds.items()} for name, kinds in sorted(found.items())}


def ptxas_spills(log: str) -> dict[str, int]:
    """Registers and spill bytes from ptxas -v: 'Used 40 registers', 'N bytes spill stores, M ... loads'."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise ValueError(f"not a ptxas -v log of one kernel: {log[:300]!r}")
    return {"ptxas_registers": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2))}


def cubin_registers(cubin: bytes) -> int:
    """Registers per thread from the cubin's own resource table (cuobjdump -res-usage: 'REG:40')."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


def _compile_error(e: BaseException, log: str = "") -> str:
    """The line of a failed build that says why (ptxas: "Feature 'cvt.bf16.f32' requires ..."; the
    front end: "arange's range must be a power of 2"), looked for through the exception's causes."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(f"{type(x).__name__}: {x}")
        x = x.__cause__ or x.__context__
    text = "\n".join(chain) + "\n" + log
    for pattern in (r"ptxas[^\n]*(error|fatal)[^\n]*", r"[^\n]*[Ff]eature[^\n]*", r"[^\n]*power of 2[^\n]*",
                    r"[^\n]*[Ee]rror[^\n]*\w[^\n]*"):
        hit = re.search(pattern, text)
        if hit:
            return hit.group(0).strip()[:240]
    return chain[0].splitlines()[0][:240]


# ----------------------------------------------------------------------------- building one case
def launch_of(case: Case):
    """(kernel, args, meta) exactly as the kit's launch code builds them for this case (CPU tensors)."""
    from . import lora_merge as lm

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(case.rank, case.cols, generator=g), torch.randn(ROWS, case.rank, generator=g)
    if case.kernel == "merge_quantize":
        W = torch.randn(ROWS, case.cols, generator=g).to(getattr(torch, case.dtype))
        _, args, meta, _ = lm.quant_launch(W, None, A, B, 0.5, case.block_m, case.block_k)
        return lm._merge_quant_kernel, args, meta
    CB, SCB = lm.quantize_rowwise_reference(torch.randn(ROWS, case.cols, generator=g))
    if case.kernel == "remerge_int8":
        _, args, meta, _ = lm.quant_launch(CB, SCB, A, B, 0.5, case.block_m, case.block_k)
        return lm._merge_quant_kernel, args, meta
    _, args, meta, _ = lm.dequant_launch(CB, SCB, A, B, 0.5, getattr(torch, case.dtype), case.block_m, case.block_k)
    return lm._dequant_merge_kernel, args, meta


def build(case: Case) -> dict:
    """Compile one case for its card; a dict row of what came out (or the error that stopped it)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, meta = launch_of(case)
    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{kernel!r} is interpreted (TRITON_INTERPRET=1 when it was defined): "
                           "run this module in a process without TRITON_INTERPRET")
    target = GPUTarget("cuda", case.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)  # what JITFunction.run does first
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    row = {**dataclasses.asdict(case), "tile_m": meta["BLOCK_M"], "tile_k": meta["BLOCK_K"],
           "r_pad": meta["R_PAD"], "num_warps": options.num_warps,
           "aligned": [name for (i,), a in attrs.items() if a for name in [kernel.arg_names[i]]]}
    log = io.StringIO()
    start = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log is printed on stdout: caught here
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # ptxas refusing the card, or any compiler error: the row says why
        return {**row, "built": False, "error": _compile_error(e, log.getvalue()),
                "seconds": round(time.perf_counter() - start, 2)}
    pointers = [n if signature[n].startswith("*") else None for n in kernel.arg_names if signature[n] != "constexpr"]
    return {**row, "built": True, "seconds": round(time.perf_counter() - start, 2),
            "registers": cubin_registers(compiled.asm["cubin"]), **ptxas_spills(log.getvalue()),
            "shared_bytes": compiled.metadata.shared, "accesses": global_accesses(compiled.asm["ptx"], pointers)}


def _build_worker(case: Case) -> dict:
    try:
        return build(case)
    except Exception as e:  # a bug here, not a compile error: keep the row, say so
        return {**dataclasses.asdict(case), "built": False, "error": f"matrix error {type(e).__name__}: {e}"}


def run_matrix(cases: list[Case], workers: int = 2) -> list[dict]:
    """Build every case, `workers` processes at a time, each with a fresh Triton cache (a cache hit
    would skip ptxas and its log). Must run with TRITON_INTERPRET unset."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 makes the kernels uncompilable: unset it for this process")
    with tempfile.TemporaryDirectory(prefix="difflora_compile_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if workers <= 1:
            return [_build_worker(c) for c in cases]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_build_worker, cases))


def run_in_subprocess(args=(), timeout=1800) -> dict:
    """This module's JSON, from a fresh interpreter without TRITON_INTERPRET (a test process has it
    set, which leaves the kernels uncompilable there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-m", "difflora_kit.kernels.compile_matrix", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the compile matrix failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cards", default=",".join(map(str, CARDS)), help="capabilities, e.g. 75,80,90")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    args = parser.parse_args(argv)
    import triton

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    cases = matrix_cases(tuple(int(c) for c in args.cards.split(",")), tuple(int(r) for r in args.ranks.split(",")))
    rows = run_matrix(cases, args.workers)
    json.dump({"triton": triton.__version__, "torch": torch.__version__, "workers": args.workers,
               "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(_cpu_seconds() - cpu_start, 1),
               "rows": rows}, sys.stdout)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): less sensitive than wall
    time to other work on the machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()
