"""The kit's LoRA-merge kernels against a device copy, peft's 8-bit merge and a naive PyTorch chain.

    python bench/merge_kernels.py                      # 4096x4096 and 3072x12288, ranks 16 and 64
    python bench/merge_kernels.py --quick              # small shapes: a smoke run, writes nothing
    python bench/merge_kernels.py --shapes 4096x4096 --ranks 16 --repeats 10 --device cuda

What is measured, for each shape (out x in), LoRA rank and operation of
`difflora_kit.kernels.lora_merge` (A [r, in], B [out, r], delta = scale * B @ A):

  merge_quantize  fp16 W [out, in] + delta            -> int8 (CB, SCB)
  remerge_int8    int8 (CB, SCB) + delta               -> int8 (CB', SCB')  (what peft's merge does)
  dequant_merge   int8 (CB, SCB) + delta               -> W' [out, in] (bf16 by default)

* the kit, backend="auto": the fused Triton kernel on a CUDA sm80+ device, the PyTorch reference
  elsewhere (the table's `path` column says which ran);
* bytes moved per weight element by the fused kernel (its docstring): merge_quantize reads W twice
  and writes CB (2e + 1, e = 2 for fp16), remerge_int8 reads CB twice and writes CB' (3),
  dequant_merge reads CB once and writes W' (1 + e); plus SCB and the LoRA factors once. Achieved
  GB/s = those bytes / time. On CPU the reference path materialises fp32 temporaries and moves
  more than that, so its GB/s is an "effective" figure (the fused kernel's bytes over its time);
* a device-to-device copy of the same traffic on the same device: `dst.copy_(src)` on uint8
  buffers of half the bytes (a copy reads and writes each byte, so it moves the same total);
  `% of copy` = kit GB/s / copy GB/s;
* side by side, same inputs, same process:
  - peft: for remerge_int8, peft's own `Linear8bitLt.merge()` on a bitsandbytes 8-bit layer
    (dequantize_bnb_weight, add get_delta_weight, re-quantize through bnb.nn.Int8Params). For the
    two other operations, the matching half of that merge: merge_quantize = fp W + peft's
    delta, then bnb's Int8Params quantization exactly as merge() calls it; dequant_merge =
    peft's dequantize_bnb_weight + delta, cast to the output dtype;
  - naive: the plain PyTorch chain (dequantize, B @ A, add, quantize row-wise: absmax, round,
    clamp, int8).
  Each result is checked against the kit's (int8 within 1 LSB, floats within rounding).

Timing: the median of --repeats rounds after a warm-up round (that also compiles the Triton
kernels); each round runs kit, naive, peft and copy once, interleaved, so a passing load spike
hits them alike. CUDA events on a GPU, perf_counter on CPU. peft's merge mutates its layer, so
the layer gets a fresh copy of the int8 base before each run, outside the timed region.

Targets (from the issue): on a GPU, >= 85% of the copy bandwidth for 4096x4096 and 3072x12288 at
ranks 16 and 64, and >= 10x peft's merge. On CPU (no GPU): the reference path at least as fast as
peft's merge (remerge_int8 rows). The table says which applied and whether it passed; without
CUDA it says that no GPU was measured.

Results: bench/results/merge_kernels.json (all numbers) and .md (the table); --quick writes none.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit.kernels import lora_merge  # noqa: E402

FULL_SHAPES = "4096x4096,3072x12288"
QUICK_SHAPES = "1024x1024,768x3072"
TARGET_SHAPES = {(4096, 4096), (3072, 12288)}
TARGET_RANKS = {16, 64}
GPU_COPY_TARGET = 0.85  # fraction of the measured copy bandwidth
GPU_PEFT_TARGET = 10.0  # x faster than peft's merge
CPU_PEFT_TARGET = 1.0  # reference at least as fast as peft's merge
OPS = ("merge_quantize", "remerge_int8", "dequant_merge")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
NO_GPU_NOTE = "No GPU was measured: CPU only, PyTorch reference path."


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn, device: torch.device, setup=None) -> tuple[float, object]:
    """(milliseconds, result) of one fn(setup()); setup runs untimed."""
    arg = setup() if setup is not None else None
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn(arg)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), result
    t0 = time.perf_counter()
    result = fn(arg)
    return (time.perf_counter() - t0) * 1e3, result


def median_ms(paths: dict, device: torch.device, repeats: int, warmup: int = 1
              ) -> tuple[dict, dict]:
    """Times {name: (fn, setup)} in interleaved rounds (a load spike hits every path alike).

    Returns ({name: median ms over `repeats` rounds after `warmup`}, {name: last result})."""
    samples = {name: [] for name in paths}
    results = {}
    for i in range(warmup + repeats):
        for name, (fn, setup) in paths.items():
            ms, result = time_once_ms(fn, device, setup)
            if i >= warmup:
                samples[name].append(ms)
            if i == warmup + repeats - 1:  # keep only the last result (memory)
                results[name] = result
            del result
    return {name: statistics.median(v) for name, v in samples.items()}, results


def copy_path(total_bytes: int, device: torch.device):
    """A device-to-device copy that moves `total_bytes` (half read, half written)."""
    src = torch.randint(0, 256, (total_bytes // 2,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda _: dst.copy_(src), None


# ----------------------------------------------------------------------------- traffic
def fused_bytes(op: str, out: int, in_: int, rank: int, w_elem: int, out_elem: int) -> int:
    """Bytes the fused kernel moves: the [out, in] traffic, SCB, the fp32 LoRA factors once."""
    n = out * in_
    lora = 4 * rank * (in_ + out)  # A [r, in] + B [out, r], fp32
    if op == "merge_quantize":
        return (2 * w_elem + 1) * n + 4 * out + lora  # W twice, CB; SCB written
    if op == "remerge_int8":
        return 3 * n + 8 * out + lora  # CB twice, CB'; SCB read, SCB' written
    return (1 + out_elem) * n + 4 * out + lora  # dequant_merge: CB once, W'; SCB read


# ----------------------------------------------------------------------------- baselines
def naive_dequantize(CB, SCB):
    """int8 [out, in], fp32 [out] -> fp32 [out, in]."""
    return CB.float() * SCB[:, None] / 127.0


def naive_quantize(W):
    """fp32 [out, in] -> (int8 [out, in], fp32 [out]): row absmax, round, clamp, cast."""
    absmax = W.abs().amax(dim=1)  # random weights: no zero rows
    CB = (W * (127.0 / absmax)[:, None]).round().clamp(-127, 127).to(torch.int8)
    return CB, absmax


def naive_delta(A, B, scale):
    return scale * (B.float() @ A.float())  # [out, r] @ [r, in]


def naive_op(op, inputs, out_dtype):
    W, CB, SCB, A, B, scale = (inputs[k] for k in ("W", "CB", "SCB", "A", "B", "scale"))
    if op == "merge_quantize":
        return naive_quantize(W.float() + naive_delta(A, B, scale))
    if op == "remerge_int8":
        return naive_quantize(naive_dequantize(CB, SCB) + naive_delta(A, B, scale))
    return (naive_dequantize(CB, SCB) + naive_delta(A, B, scale)).to(out_dtype)


def kit_op(op, inputs, out_dtype):
    W, CB, SCB, A, B, scale = (inputs[k] for k in ("W", "CB", "SCB", "A", "B", "scale"))
    if op == "merge_quantize":
        return lora_merge.merge_quantize(W, A, B, scale, backend="auto")
    if op == "remerge_int8":
        return lora_merge.remerge_int8(CB, SCB, A, B, scale, backend="auto")
    return lora_merge.dequant_merge(CB, SCB, A, B, scale, out_dtype=out_dtype, backend="auto")


class PeftLayer:
    """peft's LoRA layer on a bitsandbytes Linear8bitLt (row-wise int8, threshold 0)."""

    def __init__(self, W, A, B, rank, alpha, device):
        import bitsandbytes as bnb
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora.bnb import Linear8bitLt as PeftLinear8bitLt

        out, in_ = W.shape

        class Tiny(torch.nn.Module):
            is_loaded_in_8bit = True  # peft dispatches bnb layers to its 8-bit LoRA class

            def __init__(self):
                super().__init__()
                self.proj = bnb.nn.Linear8bitLt(in_, out, bias=False, has_fp16_weights=False,
                                                threshold=0.0)

        model = Tiny()
        model.proj.weight = bnb.nn.Int8Params(W.detach().cpu().clone(), requires_grad=False,
                                              has_fp16_weights=False)
        model.to(device)  # Int8Params.to quantizes (bnb: fp16 cast, row absmax)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
        model = inject_adapter_in_model(config, model)
        layer = model.proj
        assert isinstance(layer, PeftLinear8bitLt), type(layer)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)  # [r, in]
            layer.lora_B["default"].weight.copy_(B)  # [out, r]
        self.bnb, self.layer = bnb, layer
        self.CB = layer.base_layer.weight.data.clone()  # int8 [out, in], bnb's quantization
        self.SCB = layer.base_layer.weight.SCB.clone()  # fp32 [out]

    def reset(self):
        """A fresh, unmerged copy of the int8 base (merge() replaces the weight)."""
        weight = self.bnb.nn.Int8Params(self.CB.clone(), requires_grad=False,
                                        has_fp16_weights=False, SCB=self.SCB.clone())
        weight.CB = weight.data
        self.layer.base_layer.weight = weight
        self.layer.base_layer.state.reset_grads()
        self.layer.merged_adapters.clear()

    def merge(self):
        """peft's merge; returns the merged int8 base (CB', SCB')."""
        self.layer.merge()
        weight = self.layer.base_layer.weight
        return weight.data, weight.SCB

    def delta(self):
        return self.layer.get_delta_weight("default")  # fp32 [out, in], scaled

    def merge_quantize(self, W):
        """fp W + peft's delta, quantized the way peft's merge does (Int8Params, via the CPU)."""
        merged = W + self.delta()
        weight = self.bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False,
                                        has_fp16_weights=False).to(W.device)
        return weight.data, weight.SCB

    def dequant_merge(self, out_dtype):
        """peft's dequantize_bnb_weight + delta, cast: the first half of peft's merge."""
        from peft.utils.integrations import dequantize_bnb_weight

        base = self.layer.base_layer
        state = base.state
        if state.SCB is None:
            state.SCB = base.weight.SCB
        return (dequantize_bnb_weight(base.weight, state=state) + self.delta()).to(out_dtype)


def peft_path(op, peft, inputs, out_dtype):
    """(fn, setup) for peft's path of `op`; its merge gets a fresh int8 base before each run."""
    if op == "remerge_int8":
        return lambda _: peft.merge(), peft.reset
    if op == "merge_quantize":
        return lambda _: peft.merge_quantize(inputs["W"]), None
    return lambda _: peft.dequant_merge(out_dtype), peft.reset


# ----------------------------------------------------------------------------- checks
def compare(op, kit, other) -> dict:
    """How far `other` is from the kit's result: max int8 LSB and share of equal codes, or the
    max float difference relative to the weights' max."""
    if op == "dequant_merge":
        diff = (kit.float() - other.float()).abs().max().item()
        return {"max_rel_diff": diff / kit.float().abs().max().item()}
    cb, scb = kit
    other_cb, other_scb = other
    lsb = (cb.int() - other_cb.to(cb.device).int()).abs()
    return {"max_lsb": int(lsb.max().item()), "equal_share": (lsb == 0).float().mean().item(),
            "scb_max_rel_diff": ((scb - other_scb.to(scb.device).float()).abs() / scb).max().item()}


def check_close(op, name, diff, out_dtype):
    if op == "dequant_merge":
        tol = 2 * torch.finfo(out_dtype).eps  # one rounding of the output, with some margin
        assert diff["max_rel_diff"] <= tol, f"{op}: {name} differs from the kit: {diff}"
    else:
        assert diff["max_lsb"] <= 1, f"{op}: {name} differs from the kit by more than 1 LSB: {diff}"


# ----------------------------------------------------------------------------- one case
def make_inputs(out, in_, rank, alpha, device, seed=0):
    """W fp16 [out, in] ~ N(0, 0.02), A [r, in], B [out, r] fp32, delta ~ 25% of W."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out, in_, generator=g) * 0.02).half()
    A = torch.randn(rank, in_, generator=g) * (0.05 / rank ** 0.5)
    B = torch.randn(out, rank, generator=g) * 0.05
    return {"W": W.to(device), "A": A.to(device), "B": B.to(device), "scale": alpha / rank}


def measure_case(out, in_, rank, device, repeats, out_dtype, show=True) -> list[dict]:
    alpha = 2 * rank  # scale 2: a scaling bug would show
    inputs = make_inputs(out, in_, rank, alpha, device)
    peft = PeftLayer(inputs["W"], inputs["A"], inputs["B"], rank, alpha, device)
    inputs["CB"], inputs["SCB"] = peft.CB, peft.SCB  # one int8 base for every path
    path = "triton" if lora_merge.use_triton(inputs["W"]) else "torch"
    w_elem, out_elem = inputs["W"].element_size(), torch.empty(0, dtype=out_dtype).element_size()
    rows = []
    for op in OPS:
        moved = fused_bytes(op, out, in_, rank, w_elem, out_elem)
        paths = {
            "kit": (lambda _, op=op: kit_op(op, inputs, out_dtype), None),
            "naive": (lambda _, op=op: naive_op(op, inputs, out_dtype), None),
            "peft": peft_path(op, peft, inputs, out_dtype),
            "copy": copy_path(moved, device),
        }
        times, results = median_ms(paths, device, repeats)
        peft.reset()
        diffs = {name: compare(op, results["kit"], results[name]) for name in ("peft", "naive")}
        for name, diff in diffs.items():
            check_close(op, name, diff, out_dtype)
        del paths, results
        kit_ms, naive_ms, peft_ms, c_ms = (times[k] for k in ("kit", "naive", "peft", "copy"))
        rows.append({
            "op": op, "out": out, "in": in_, "rank": rank, "scale": inputs["scale"], "path": path,
            "w_dtype": str(inputs["W"].dtype),
            "out_dtype": str(out_dtype) if op == "dequant_merge" else "int8",
            "kit_ms": kit_ms, "bytes": moved, "bytes_per_elem": moved / (out * in_),
            "kit_gbps": moved / kit_ms / 1e6, "copy_ms": c_ms, "copy_gbps": moved / c_ms / 1e6,
            "pct_of_copy": 100 * c_ms / kit_ms, "peft_ms": peft_ms, "naive_ms": naive_ms,
            "x_peft": peft_ms / kit_ms, "x_naive": naive_ms / kit_ms, "agreement": diffs,
        })
        if show:
            print(format_row(rows[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report
HEADER = ("| op | shape | rank | path | time ms | bytes/elem | GB/s | copy GB/s | % of copy "
          "| peft ms | naive ms | x peft | x naive |")


def format_row(r: dict) -> str:
    return (f"| {r['op']} | {r['out']}x{r['in']} | {r['rank']} | {r['path']} | {r['kit_ms']:.2f} "
            f"| {r['bytes_per_elem']:.2f} | {r['kit_gbps']:.1f} | {r['copy_gbps']:.1f} "
            f"| {r['pct_of_copy']:.1f}% | {r['peft_ms']:.2f} | {r['naive_ms']:.2f} "
            f"| {r['x_peft']:.2f}x | {r['x_naive']:.2f}x |")


def table(rows: list[dict]) -> str:
    return "\n".join([HEADER, "|" + "---|" * 13] + [format_row(r) for r in rows])


def in_target(r: dict) -> bool:
    return (r["out"], r["in"]) in TARGET_SHAPES and r["rank"] in TARGET_RANKS


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def targets(rows: list[dict], gpu: bool) -> dict:
    """Pass/fail of the issue's targets, computed from the rows they apply to."""
    scoped = [r for r in rows if in_target(r)]
    scope = ("target shapes" if scoped
             else "this run's shapes (not the target shapes: indicative only)")
    scoped = scoped or rows
    remerge = [r for r in scoped if r["op"] == "remerge_int8"]
    others = [r for r in scoped if r["op"] != "remerge_int8"]
    if gpu:
        return {
            "scope": scope,
            "copy_bandwidth": {
                "need_pct": 100 * GPU_COPY_TARGET,
                "worst_pct": min(r["pct_of_copy"] for r in scoped),
                "pass": all(r["pct_of_copy"] >= 100 * GPU_COPY_TARGET for r in scoped)},
            "vs_peft_merge": {
                "need_x": GPU_PEFT_TARGET, "worst_x": min(r["x_peft"] for r in remerge),
                "pass": all(r["x_peft"] >= GPU_PEFT_TARGET for r in remerge)},
        }
    return {
        "scope": scope,
        "vs_peft_merge": {"need_x": CPU_PEFT_TARGET, "worst_x": min(r["x_peft"] for r in remerge),
                          "pass": all(r["x_peft"] >= CPU_PEFT_TARGET for r in remerge)},
        "other_ops_vs_peft_path": {"min_x": min(r["x_peft"] for r in others),  # no target
                                   "max_x": max(r["x_peft"] for r in others)},
    }


def note(rows: list[dict], device: torch.device, verdicts: dict, out_dtype_name: str) -> str:
    gpu = device.type == "cuda"
    paths = sorted({r["path"] for r in rows})
    lines = []
    if not gpu:
        lines.append(f"**{NO_GPU_NOTE}** Bandwidth figures are the fused kernel's bytes over the "
                     "reference's time (effective bytes: the reference moves more, through fp32 "
                     "temporaries); the GPU targets (>= 85% of copy bandwidth, >= 10x peft) were "
                     "not measured.")
        peft_t, other = verdicts["vs_peft_merge"], verdicts["other_ops_vs_peft_path"]
        lines.append(f"CPU target, reference at least as fast as peft's merge (remerge_int8 rows, "
                     f"{verdicts['scope']}): **{verdict(peft_t['pass'])}** "
                     f"(slowest: {peft_t['worst_x']:.3f}x peft).")
        lines.append(f"No target for the other two operations against their peft halves: "
                     f"{other['min_x']:.2f}x to {other['max_x']:.2f}x.")
        lines.append("On CPU the kit's path is the PyTorch reference: the same fp32 arithmetic as the "
                     "naive chain, done with one fp32 temporary (in-place addmm_, row absmax by "
                     "vector_norm, in-place scale/round/clamp) where the chain allocates four.")
    else:
        pre_sm80 = " (below sm80: the Triton kernels did not run)" if "torch" in paths else ""
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}; kit path: "
                     f"{', '.join(paths)}{pre_sm80}.")
        copy_t, peft_t = verdicts["copy_bandwidth"], verdicts["vs_peft_merge"]
        lines.append(f"Target >= 85% of copy bandwidth ({verdicts['scope']}, all three ops): "
                     f"**{verdict(copy_t['pass'])}** (worst {copy_t['worst_pct']:.1f}%).")
        lines.append(f"Target >= 10x peft's merge (remerge_int8 rows): "
                     f"**{verdict(peft_t['pass'])}** (worst {peft_t['worst_x']:.1f}x); peft's "
                     "merge sends the merged fp32 weight through host memory and back.")
    upcast = "" if gpu else " (the reference upcasts to fp32 first: no fp16 matmul on CPU)"
    lines.append(f"Inputs: W fp16{upcast}, A/B fp32, scale = alpha/r = 2; the int8 base is "
                 f"bitsandbytes' own quantization of W; dequant_merge writes {out_dtype_name}.")
    lines.append("peft column: remerge_int8 = peft `Linear8bitLt.merge()` on a bitsandbytes 8-bit "
                 "layer; merge_quantize = fp W + peft's delta, quantized through bnb Int8Params as "
                 "merge() does (via the CPU); dequant_merge = peft's `dequantize_bnb_weight` + "
                 "delta, cast. naive = dequantize, B@A, add, quantize in plain PyTorch. Every "
                 "result agrees with the kit's within 1 int8 LSB (floats: output rounding).")
    lines.append("bytes/elem: the fused kernel's traffic (merge_quantize 2e+1, remerge 3, "
                 "dequant_merge 1+e, plus SCB and A/B once); copy = `dst.copy_(src)` moving the "
                 "same bytes on the same device; % of copy = copy time / kit time. Times: median "
                 "of interleaved rounds after a warm-up round.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", help=f"out x in, comma separated (default {FULL_SHAPES})")
    p.add_argument("--ranks", help="comma separated (default 16,64)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_SHAPES}, rank 16, 5 repeats; writes nothing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out-dtype", choices=tuple(DTYPES), default="bf16",
                   help="dequant_merge's output dtype")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"(Merge|Unmerge) lora module to 8-bit")
    device = pick_device(args.device)
    shapes = parse_pairs(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES))
    ranks = [int(r) for r in (args.ranks or ("16" if args.quick else "16,64")).split(",")]
    repeats = args.repeats or (5 if args.quick else (20 if device.type == "cuda" else 5))
    out_dtype = DTYPES[args.out_dtype]
    if device.type != "cuda":
        print(NO_GPU_NOTE)

    measure_case(256, 512, ranks[0], device, 1, out_dtype, show=False)  # first-call costs, untimed
    print(HEADER + "\n|" + "---|" * 13, flush=True)
    rows = []
    for out, in_ in shapes:
        for rank in ranks:
            rows += measure_case(out, in_, rank, device, repeats, out_dtype)

    verdicts = targets(rows, device.type == "cuda")
    text = table(rows) + "\n\n" + note(rows, device, verdicts, args.out_dtype)
    print("\n" + note(rows, device, verdicts, args.out_dtype))
    if args.quick:
        return
    path = write_result("merge_kernels", {
        "gpu_measured": device.type == "cuda", "device": str(device), "repeats": repeats,
        "out_dtype": args.out_dtype, "threads": args.threads, "targets": verdicts, "rows": rows,
    }, text)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
