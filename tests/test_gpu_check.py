"""bench/gpu_check.sh, the one-call GPU check, rehearsed on the CPU: its dry mode runs every step's
set-up (the import folder, the GPU tests collected, the doctor's command line, notebooks 02/03/08
prepared with DEVICE='cuda' and compiled, the memory runs listed) and the same bookkeeping: the files
in $OUT, their names and number (the device tool returns at most 8), the time budget (480 s)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_imports  # noqa: E402
import gpu_memory  # noqa: E402

STEPS = ["install", "imports", "tests", "doctor", "notebooks", "memory"]
FILES = {"summary.txt", "memory.json", *(f"{s}.txt" for s in STEPS)}
LIMIT, MAX_FILES = 480, 8


def run_check(out: Path, *args, env_extra=None, timeout=1500) -> subprocess.CompletedProcess:
    """The script in dry mode with this Python, its files into `out`."""
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def summary_lines(out: Path) -> dict[str, str]:
    """{step or key: the rest of its line} from summary.txt ("tests: PASS in 3 s ...")."""
    lines = (out / "summary.txt").read_text().splitlines()
    return {m.group(1): m.group(2) for m in (re.match(r"^(\w+): (.*)$", line) for line in lines) if m}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    return run_check(out), out


def test_the_dry_run_passes_and_writes_the_files_a_gpu_run_writes(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    written = {p.name for p in out.iterdir()}
    assert written == FILES, f"unexpected files {written ^ FILES}"
    assert len(written) <= MAX_FILES and all(p.is_file() for p in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in written), "names the device tool returns"


def test_every_step_ran_its_set_up_within_the_budget(dry_run):
    proc, out = dry_run
    lines = summary_lines(out)
    bounds = re.search(r"step bounds add up to (\d+) s \(limit (\d+) s\)", lines["budget"])
    assert bounds and int(bounds.group(2)) == LIMIT and int(bounds.group(1)) <= LIMIT
    for step in STEPS:
        assert step in lines, f"no summary line for {step}"
    assert lines["install"].startswith("SKIP"), "no --wheels: nothing to install"
    for step in STEPS[1:]:
        assert lines[step].startswith("PASS"), f"{step}: {lines[step]}"
        assert (out / f"{step}.txt").read_text().strip(), f"{step}.txt is empty"
    assert re.match(r"0 failed", lines["all"])
    assert "files" in lines and f"at most {MAX_FILES}" in lines["files"]


def test_the_kit_comes_from_the_import_folder_not_an_install(dry_run):
    """On the device there is no editable install: difflora_kit.kernels must resolve from the folder
    the script builds (difflora_kit/ plus kernels/ as difflora_kit/kernels)."""
    _, out = dry_run
    text = (out / "imports.txt").read_text()
    kernels = re.search(r"^difflora_kit\.kernels\s+(\S+)", text, re.MULTILINE)
    assert kernels and "/kit/difflora_kit/kernels/__init__.py" in kernels.group(1), text
    assert "FAILED" not in text and "IMPORTS (dry run, found only): OK" in text


def test_the_steps_set_up_what_the_gpu_run_will_run(dry_run):
    _, out = dry_run
    tests = (out / "tests.txt").read_text()
    assert "test_kernels_gpu.py::" in tests and "test_quant_gpu.py::" in tests and "test_devices.py::" in tests
    notebooks = (out / "notebooks.txt").read_text()
    for name in ("02_lora_from_scratch", "03_the_8bit_base", "08_real_model_on_a_gpu"):
        assert re.search(rf"{name}\.ipynb: \d+ code cells compile; parameters .*'DEVICE': 'cuda'", notebooks), notebooks
    assert "difflora doctor" in (out / "doctor.txt").read_text()
    memory = (out / "memory.txt").read_text()
    assert "4 runs would be made" in memory and "| sd15 | 512 | on | 4 |" in memory and "| sdxl | 1024 | on | 0 |" in memory


def test_a_budget_over_the_limit_stops_before_anything_runs(tmp_path):
    proc = run_check(tmp_path, env_extra={"GPU_CHECK_LIMIT": "100"}, timeout=120)
    assert proc.returncode == 2
    assert "budget: FAIL" in (tmp_path / "summary.txt").read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"summary.txt"}


def test_bad_arguments_are_refused(tmp_path):
    for args in (["--only", "nosuch"], ["--frobnicate"]):
        proc = run_check(tmp_path, *args, timeout=60)
        assert proc.returncode == 2 and "gpu_check.sh:" in proc.stderr


def test_the_memory_runs_and_their_settings():
    runs = gpu_memory.runs_wanted("sd15,sdxl", None, "off,on", "0,4", False)
    assert [(r.model, r.resolution, r.checkpointing, r.offload) for r in runs] == [
        ("sd15", 512, False, 0), ("sd15", 512, True, 0), ("sd15", 512, True, 4),
        ("sdxl", 1024, False, 0), ("sdxl", 1024, True, 0), ("sdxl", 1024, True, 4)]  # no block swap without checkpointing
    with pytest.raises(ValueError, match="sd16"):
        gpu_memory.runs_wanted("sd16", None, "on", "0", False)
    with pytest.raises(ValueError, match="offload_blocks"):
        gpu_memory.dry_run(gpu_memory.runs_wanted("sd15", None, "on", "-1", False), 3)


def test_the_kit_folder_demand():
    origins = {"difflora_kit": "/w/kit/difflora_kit/__init__.py", "difflora_kit.kernels": "/repo/kernels/__init__.py"}
    assert gpu_imports.outside(None, origins) == []
    assert gpu_imports.outside("/w/kit", origins) == ["difflora_kit.kernels comes from /repo/kernels/__init__.py, "
                                                      "not from /w/kit/"]
