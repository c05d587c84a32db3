"""`difflora doctor` (difflora_kit/doctor.py) on a CPU: it runs and passes, a broken kernel FAILs
through the same check the doctor runs, and its exit codes (0 pass/skip, 1 a FAIL, 2 cannot run)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflora_kit import doctor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # int8_emulation

ROOT = Path(__file__).resolve().parents[1]
CPU_PASSES = ["int8 quantization vs bitsandbytes", "int8 linear vs bitsandbytes [fp32, gaussian]",
              "int8 linear vs fp32 matmul [fp32, gaussian]", "int8 linear vs bitsandbytes [fp32, outlier 100x]",
              "int8 linear vs fp32 matmul [fp32, outlier 100x]", "merge_quantize [fp32 W] interpreted",
              "merge_quantize [fp16 W] interpreted", "remerge_int8 [int8 base] interpreted",
              "dequant_merge [-> fp32] interpreted", "dequant_merge [-> fp16] interpreted",
              "sweep: 3 strengths batched vs alone [cpu]"]


def _line(lines, name):
    found = [line for line in lines if name in line and line[:4] in doctor.STATUSES]
    assert len(found) == 1, (name, lines)
    return found[0]


def test_the_doctor_runs_on_a_cpu_and_passes():
    """As a user runs it: `python -m difflora_kit.doctor` in a fresh process without TRITON_INTERPRET
    (so the merge kernels go through the interpreter subprocess, as on a learner's CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "difflora_kit.doctor", "--device", "cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    for label in ("torch", "CUDA", "bitsandbytes", "triton", "device", "merge kernels"):
        assert any(line.startswith(f"  {label} ") for line in lines), (label, lines)
    for name in CPU_PASSES:
        assert _line(lines, name).startswith("PASS"), name
    skipped = _line(lines, "toy training: 10 steps on the GPU vs the CPU")
    assert skipped.startswith("SKIP") and "a GPU check" in skipped
    assert lines[-1].startswith(f"{len(CPU_PASSES)} passed, 0 failed, 1 skipped") and "toy training" in lines[-1]


@pytest.fixture
def interpreted():
    from difflora_kit.kernels import lora_merge as lm

    if not doctor.kernels_interpreted(lm):  # conftest sets TRITON_INTERPRET=1 on machines without CUDA
        pytest.skip("needs the kernels interpreted in this process (TRITON_INTERPRET=1 before import)")
    return lm


def test_a_broken_kernel_fails_through_the_same_check(interpreted, monkeypatch):
    """The Triton path of merge_quantize (and remerge_int8: one launcher) returns a corrupted CB; the
    doctor, run in this process (its kernels are already interpreted here, so it does not need the
    subprocess), reports both as FAIL lines with the error, what the kit does instead and what to
    report, and exits 1; the other checks still pass."""
    lm = interpreted
    launch = lm._launch_quant

    def corrupted(*args, **kwargs):
        cb, scb = launch(*args, **kwargs)
        cb[3] = -cb[3]  # one row's codes negated: many LSB off
        return cb, scb

    monkeypatch.setattr(lm, "_launch_quant", corrupted)
    failed = doctor.check_merge_case(lm, "merge_quantize", torch.float16, "cpu")
    assert failed.status == "FAIL" and failed.detail.startswith("max ") and "LSB" in failed.detail
    lines = []
    assert doctor.run("cpu", out=lines.append) == 1
    for name in ("merge_quantize [fp32 W]", "merge_quantize [fp16 W]", "remerge_int8 [int8 base]"):
        line = _line(lines, name)
        assert line.startswith("FAIL") and "LSB" in line and "(tol 1 LSB" in line
        after = lines[lines.index(line) + 1]
        assert after.lstrip().startswith("->") and "PyTorch reference" in after and "report" in after
    for name in ("dequant_merge [-> fp32]", "int8 quantization", "sweep"):
        assert _line(lines, name).startswith("PASS")
    assert lines[-1].startswith(f"{len(CPU_PASSES) - 3} passed, 3 failed, 1 skipped")


def test_a_subprocess_that_dies_is_a_fail_line():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (result,) = doctor.merge_kernels_in_subprocess(proc)
    assert result.status == "FAIL" and "exited 3: boom" in result.detail
    assert "PyTorch reference" in result.lines()[1]


def test_exit_code_2_when_the_doctor_cannot_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    lines = []
    assert doctor.run("cpu", out=lines.append) == 2
    assert lines[0].startswith("difflora doctor could not run: ModuleNotFoundError") and "bitsandbytes" in lines[0]
    if not torch.cuda.is_available():
        monkeypatch.undo()
        lines.clear()
        assert doctor.run("cuda", out=lines.append) == 2 and "no CUDA GPU" in lines[0]


def test_a_check_that_raises_is_a_fail_with_its_error():
    def broken(device):
        raise RuntimeError("no kernel image is available for execution on the device")

    (result,) = doctor.timed(broken, "cuda", name="a check", instead="the kit does X")
    assert result.status == "FAIL" and "RuntimeError: no kernel image" in result.detail
    assert result.lines()[1] == f"      -> the kit does X; {doctor.REPORT}"
    assert doctor.check_training("cpu").status == "SKIP"
    with pytest.raises(ValueError, match="status"):
        doctor.Result("OK", "x", "y")


def test_the_measures():
    a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
    assert doctor.code_error(a, a) == (0, 0.0)
    assert doctor.code_error(a, torch.tensor([[1, 0, 4]], dtype=torch.int8)) == (2, pytest.approx(2 / 3))
    assert doctor.rel_error(torch.ones(4), torch.ones(4)) == 0
    assert doctor.rel_error(torch.tensor([float("nan")]), torch.ones(1)) == float("inf")
    assert doctor.update_error({"m": torch.ones(2) * 1.1}, {"m": torch.ones(2)}) == pytest.approx(0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_doctor_passes_on_the_gpu():
    lines = []
    assert doctor.run(out=lines.append) == 0, "\n".join(lines)
    skips = [line for line in lines if line.startswith("SKIP")]
    assert all("bf16" in line for line in skips), skips  # only bf16 merges on a card without bf16 (sm75)
    infos = [line for line in lines if line.startswith("INFO")]
    assert infos and all("int8 linear vs bitsandbytes" in line for line in infos), infos



def test_difflora_doctor_is_a_cli_command_passing_on_its_exit_code(capsys):
    """`difflora doctor` runs doctor.run and returns its exit code (2: a device this machine lacks)."""
    import torch

    from difflora_kit import cli

    if torch.cuda.is_available():
        pytest.skip("checks the exit code on a machine without CUDA")
    assert cli.main(["doctor", "--device", "cuda"]) == 2
    assert "difflora doctor" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the 8-bit linear check
def test_the_int8_linear_check_reaches_cublaslt_shapes_and_an_outlier_channel():
    """Issue 18, finding 6: the check used nn.Linear(131, 67) with Gaussian inputs, which bitsandbytes'
    int8 matmul sends to its fp32 fallback (131 % 4 != 0), never cuBLASLt, and no outliers."""
    in_, out = doctor.LINEAR_SHAPE
    assert in_ % 16 == 0 and out % 16 == 0
    x, grad = doctor.linear_inputs(torch.float32, True, "cpu")
    magnitude = x.detach().abs().flatten(0, 1).median(dim=0).values  # (in,) per channel
    others = magnitude[torch.arange(in_) != doctor.OUTLIER[0]].median()
    assert float(magnitude[doctor.OUTLIER[0]] / others) > 50
    assert grad.shape == (*x.shape[:-1], out)


def test_the_int8_linear_check_fails_a_layer_that_quantizes_its_activations(monkeypatch):
    """bitsandbytes' CUDA arithmetic (int8 activations, bench/int8_emulation.py) put into the kit's layer:
    the outlier case FAILs against the fp32 matmul; the weight-only layer passes both cases."""
    import int8_emulation

    good = doctor.check_int8_linear("cpu", torch.float32)
    assert [r.status for r in good] == ["PASS"] * 4, [r.lines() for r in good]
    with int8_emulation.w8a8_layers():
        bad = {r.name: r for r in doctor.check_int8_linear("cpu", torch.float32)}
    outlier = bad["int8 linear vs fp32 matmul [fp32, outlier 100x]"]
    assert outlier.status == "FAIL" and "tol 1.0e-05" in outlier.detail
    assert bad["int8 linear vs bitsandbytes [fp32, outlier 100x]"].status == "FAIL"  # CPU: a check


# ----------------------------------------------------------------------------- the dispatch rule (finding 4)
@pytest.fixture
def card(interpreted, monkeypatch):
    """A stand-in card: the interpreted kernels run on CPU tensors while the dispatch ("auto") is told
    they are on a CUDA card of the capability the test sets (torch.cuda.get_device_capability)."""
    lm = interpreted
    monkeypatch.setattr(lm, "auto_choice", lambda tensor, out_dtype=None: lm.triton_choice(
        torch.cuda.get_device_capability(), (tensor.dtype, out_dtype)))
    monkeypatch.setattr(lm, "_FAILED", {}, raising=False)  # a fallback recorded here stays here

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        return cap

    return lm, set_capability


def _broken_build(monkeypatch, lm):
    def fails(*args, **kwargs):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_75 (a Triton build error)")

    monkeypatch.setattr(lm, "_launch_quant", fails)


CASES = [("merge_quantize", torch.float32), ("merge_quantize", torch.bfloat16), ("remerge_int8", None)]


def test_a_kernel_that_cannot_build_on_sm75_is_a_warning_not_a_fail(card, monkeypatch):
    """A T4 (sm75, unsupported upstream) where Triton cannot build: backend='auto' falls back to the
    reference there, so the doctor warns (exit code 0) instead of blocking the learner; bf16, which
    "auto" never sends to Triton on sm75, is a SKIP with the reason."""
    lm, set_capability = card
    cap = set_capability((7, 5))
    _broken_build(monkeypatch, lm)
    results = {r.name: r for r in doctor.check_merge_kernels("cpu", capability=cap, cases=CASES)}
    quantize, bf16, remerge = (results[doctor.merge_name(k, d, False)] for k, d in CASES)
    for r in (quantize, remerge):
        assert r.status == "WARN", r.lines()
        assert "RuntimeError: PTX" in r.detail and "falls back to the PyTorch reference" in r.detail
        assert r.lines()[1].lstrip().startswith("-> the kit merges with the PyTorch reference")
    assert bf16.status == "SKIP" and "sm75 has no bf16" in bf16.detail


def test_a_card_older_than_sm75_skips_every_kernel(card):
    lm, set_capability = card
    cap = set_capability((7, 0))
    results = doctor.check_merge_kernels("cpu", capability=cap, cases=CASES)
    assert [r.status for r in results] == ["SKIP"] * len(CASES)
    assert all("older than sm75" in r.detail for r in results)


@pytest.mark.parametrize("cap", [(7, 5), (8, 0), (9, 0)])
def test_a_wrong_kernel_result_is_a_fail_on_every_card(card, monkeypatch, cap):
    """"auto" would use a kernel that runs and is wrong: a FAIL, on sm75 as on sm80+."""
    lm, set_capability = card
    set_capability(cap)
    launch = lm._launch_quant

    def corrupted(*args, **kwargs):
        cb, scb = launch(*args, **kwargs)
        cb[3] = -cb[3]
        return cb, scb

    monkeypatch.setattr(lm, "_launch_quant", corrupted)
    (result,) = doctor.check_merge_kernels("cpu", capability=cap, cases=[("merge_quantize", torch.float32)])
    assert result.status == "FAIL" and "LSB" in result.detail


def test_a_kernel_that_cannot_build_on_sm80_follows_what_auto_does_there(card, monkeypatch):
    """On sm80+ the doctor reports what the dispatch does with a build error: a WARN where
    backend='auto' falls back to the reference, a FAIL (naming DIFFLORA_MERGE_KERNELS=torch) where it
    raises."""
    lm, set_capability = card
    cap = set_capability((8, 0))
    _broken_build(monkeypatch, lm)
    W, A, B = torch.randn(67, 131), torch.randn(5, 131), torch.randn(67, 5)
    try:
        with pytest.warns(RuntimeWarning):
            lm.merge_quantize(W, A, B, 0.5, backend="auto")
        auto_falls_back = True
    except RuntimeError:
        auto_falls_back = False
    (result,) = doctor.check_merge_kernels("cpu", capability=cap, cases=[("merge_quantize", torch.float32)])
    assert "RuntimeError: PTX" in result.detail
    if auto_falls_back:
        assert result.status == "WARN" and "falls back" in result.detail
    else:
        assert result.status == "FAIL" and "raises it too" in result.detail
        assert "DIFFLORA_MERGE_KERNELS=torch" in result.lines()[1]
