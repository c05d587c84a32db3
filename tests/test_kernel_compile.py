"""Every merge kernel built for every card the kit may meet (sm75, sm80, sm86, sm89, sm90), on a CPU.

kernels/compile_matrix.py compiles the arguments the kit's own launch code builds, with Triton's own
compiler, for each named card: PTX and cubin, nothing run. The whole matrix runs once per session,
in one subprocess without TRITON_INTERPRET (~2 minutes of two cores: README of kernels/). What it
proves: each kernel the dispatch rule sends to a card builds for it, within the card's shared
memory, without register spills on sm80+, with global accesses as wide as the tile allows. What it
cannot: that the code is right on the hardware, or how fast (tests/test_kernels_gpu.py, bench/).
"""
import collections

import pytest
import torch

pytest.importorskip("triton")

from difflora_kit.kernels import compile_matrix as cm  # noqa: E402
from difflora_kit.kernels import lora_merge as lm  # noqa: E402

ELEM_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "int8": 8}


@pytest.fixture(scope="module")
def matrix():
    return cm.run_in_subprocess()


def _case(row):
    return cm.Case(**{f.name: row[f.name] for f in cm.dataclasses.fields(cm.Case)})


@pytest.fixture(scope="module")
def rows(matrix):
    """The kit's own cases (the control left out): {Case: row}."""
    return {_case(r): r for r in matrix["rows"] if _case(r) != cm.CONTROL}


def test_the_matrix_is_complete_and_each_reader_agrees(matrix, rows):
    assert set(rows) | {cm.CONTROL} == set(cm.matrix_cases())
    for row in rows.values():
        if row["built"]:  # registers from the cubin's resource table == ptxas's own count
            assert row["registers"] == row["ptxas_registers"] > 0, row


def test_the_control_does_not_build(matrix):
    """A tile that is no power of two must come out unbuilt, with the compiler's reason: the matrix
    can say no."""
    control = next(r for r in matrix["rows"] if _case(r) == cm.CONTROL)
    assert not control["built"] and "power of 2" in control["error"], control


def test_the_dispatch_rule_sends_a_kernel_only_where_it_builds(rows):
    sent = collections.Counter()
    for case, row in rows.items():
        capability = divmod(case.capability, 10)
        ok, why = lm.triton_choice(capability, cm.dispatch_dtypes(case))
        sent[ok] += 1
        if ok:
            assert row["built"], f"{case}: the rule sends it ({why}) but it does not build: {row.get('error')}"
    assert sent[True] > sent[False] > 0  # bf16 on sm75 is refused (it builds: see kernels/README.md)


def test_shared_memory_fits_each_card(rows):
    for case, row in rows.items():
        if row["built"]:
            assert row["shared_bytes"] <= cm.SHARED_LIMIT[case.capability], row


def test_no_register_spills_on_sm80_and_later_at_the_kits_tiles(rows):
    """Read with `ptxas -v`: at the kit's tiles (lora_merge._blocks) nothing on sm80+ spills more than
    one 4-byte word per thread (sm86/sm89 fp16 merge_quantize at rank 8). sm75 (Triton's unsupported
    pre-Ampere path) does spill at ranks above 16: kernels/README.md has the numbers."""
    spills = {case: row["spill_stores"] for case, row in rows.items()
              if row["built"] and case.cols == cm.COLS and case.capability >= 80}
    assert spills and max(spills.values()) <= 4, {c: s for c, s in spills.items() if s > 4}


def test_global_accesses_are_as_wide_as_the_tile_allows_where_rows_are_aligned(rows):
    """With `in` divisible by 16 (every real layer) Triton knows each row starts 16-byte aligned: the
    weight's load and the result's store are each as wide as the tile lets one thread's contiguous
    elements be (128 bits where it holds enough of them), A's loads 128 bits. With `in` % 16 != 0
    the same kernels fall back to narrower accesses (what alignment allows)."""
    for case, row in rows.items():
        if not row["built"] or case.cols != cm.COLS:
            continue
        acc, warps = row["accesses"], row["num_warps"]
        load, store = cm.MAIN_LOAD[case.kernel], cm.MAIN_STORE[case.kernel]
        load_bits = ELEM_BITS["int8" if case.kernel != "merge_quantize" else case.dtype]
        store_bits = ELEM_BITS[case.dtype if case.kernel == "dequant_merge" else "int8"]
        want_ld = cm.vector_bits_allowed(load_bits, row["tile_m"], row["tile_k"], warps)
        want_st = cm.vector_bits_allowed(store_bits, row["tile_m"], row["tile_k"], warps)
        assert acc[load]["ld"] == [want_ld] and acc[store]["st"] == [want_st], (case, acc)
        assert acc["a_ptr"]["ld"] == [128], (case, acc)
        assert "?" not in acc, (case, acc)  # every access traced to its tensor
    tails = [row for case, row in rows.items() if case.cols == cm.TAIL_COLS]
    assert tails and all(max(r["accesses"][cm.MAIN_STORE[r["kernel"]]]["st"]) < 128 for r in tails)


# ----------------------------------------------------------------------------- the readers, on known text
PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 2;
$L__BB0_1:
	add.s64 	%rd4, %rd1, %rd3;      // src + K * 2
	// begin inline asm
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	// end inline asm
	add.s64 	%rd6, %rd5, %rd3;
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd6 + 0 ], 0x10, %r8;
	mov.b64 	%rd5, %rd2;             // carried around the loop: defined after its use
	add.s64 	%rd7, %rd2, %rd3;
	@%p1 st.global.b8 [ %rd7 + 0 ], { %rs1 };
	st.global.v2.b32 [ %rd4 + 16 ], { %r2, %r3 };
	bra.uni 	$L__BB0_1;
}
"""


def test_global_accesses_traces_each_address_to_its_pointer():
    found = cm.global_accesses(PTX, ["src", "dst", None])
    assert found == {"src": {"ld": [128], "st": [64]}, "dst": {"ld": [128], "st": [8]}}


def test_ptxas_spills_reads_the_log_and_refuses_other_text():
    log = ("ptxas info    : Function properties for k\n    120 bytes stack frame, 116 bytes spill stores, "
           "196 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 120 bytes cumulative")
    assert cm.ptxas_spills(log) == {"ptxas_registers": 255, "spill_stores": 116, "spill_loads": 196}
    with pytest.raises(ValueError, match="ptxas"):
        cm.ptxas_spills("nothing here")


def test_the_reason_of_a_failed_build_is_found_through_its_causes():
    try:
        try:
            raise ValueError("arange's range must be a power of 2")
        except ValueError as inner:
            raise RuntimeError("at 5:32:") from inner
    except RuntimeError as e:
        assert cm._compile_error(e) == "ValueError: arange's range must be a power of 2"
    log = "ptxas /tmp/x.ptx, line 9; error   : Feature 'cvt.bf16.f32' requires .target sm_80 or higher"
    assert "cvt.bf16.f32" in cm._compile_error(RuntimeError("PTXASError"), log)


def test_dispatch_dtypes_ask_the_rule_about_base_and_output():
    assert cm.dispatch_dtypes(cm.Case("dequant_merge", "bfloat16", 8, 64, 75)) == (torch.int8, torch.bfloat16)
    assert cm.dispatch_dtypes(cm.Case("merge_quantize", "float16", 8, 64, 75)) == (torch.float16, None)
