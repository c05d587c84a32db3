"""The course notebooks: committed clean, and each runs top to bottom with the CI parameters.

Each notebook is executed by nbclient in the `python3` kernel (this Python's ipykernel), with
FAST = True injected after its "parameters" cell (notebooks/runner.py), every exercise's solution
inserted after the exercise (so the check cells verify the solutions too), in one shared working
folder (so notebook 5 picks up the LoRA 1 that notebook 4 saved; run alone it trains its own).
Adding a notebook is one line in NOTEBOOKS; a notebook file that is not listed fails a test.
"""

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
_spec = importlib.util.spec_from_file_location("notebook_runner", NOTEBOOKS_DIR / "runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


@dataclasses.dataclass(frozen=True)
class Run:
    """How the tests run one notebook."""

    budget_s: int = 180
    """Wall-clock limit for the whole notebook with the CI parameters (the target is 3 minutes
    each on a 2-core CPU; the limit is a timeout, not the target: shared machines are slower)."""
    params: tuple = ()
    """(name, value) pairs injected on top of runner.CI_PARAMETERS."""
    needs_cuda: bool = False
    """Skip on a machine without CUDA (notebook 8, a real model)."""
    on_stand_in: bool = False
    """Without CUDA, this notebook runs with DEVICE='cuda' under the stand-in CUDA device instead
    (tests/test_notebooks_on_cuda.py: its CUDA paths, a tensor left on the CPU fails); on a GPU it runs here."""


TIMEOUT_FACTOR = 5  # a machine busy with other jobs is slower (measured up to ~3x with one thread)

NOTEBOOKS = {  # one line per notebook
    "01_setup_and_tour": Run(),
    "02_lora_from_scratch": Run(on_stand_in=True),
    "03_the_8bit_base": Run(on_stand_in=True),
    "04_step1_overfit_lora1": Run(),
    "05_step2_lora2_difference": Run(on_stand_in=True),
    "06_lora2_strength_slider": Run(on_stand_in=True),
    "07_averaging_many_pairs": Run(),
    "08_real_model_on_a_gpu": Run(on_stand_in=True),  # without a GPU: a tiny random pipeline of the same classes
}


def notebook_path(name: str) -> Path:
    return NOTEBOOKS_DIR / f"{name}.ipynb"


def read(name: str):
    return nbformat.read(notebook_path(name), as_version=4)


def test_the_notebooks_left_to_the_stand_in_run_there():
    """A notebook marked on_stand_in is skipped here without a GPU: it must be one that
    tests/test_notebooks_on_cuda.py runs, or no CPU machine would run it at all."""
    spec = importlib.util.spec_from_file_location("notebooks_on_cuda", Path(__file__).parent / "test_notebooks_on_cuda.py")
    on_cuda = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, on_cuda)  # its dataclasses look their module up there
    spec.loader.exec_module(on_cuda)
    assert {n for n, run in NOTEBOOKS.items() if run.on_stand_in} == set(on_cuda.NOTEBOOKS)


def test_every_notebook_is_listed_and_every_listed_notebook_exists():
    on_disk = {p.stem for p in runner.discover(NOTEBOOKS_DIR)}
    assert on_disk == set(NOTEBOOKS), (
        f"notebooks not in NOTEBOOKS: {sorted(on_disk - set(NOTEBOOKS))}; "
        f"listed but missing: {sorted(set(NOTEBOOKS) - on_disk)}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    problems = runner.problems_when_committed(nb)
    assert not problems, f"{name}.ipynb: {problems}. Clear outputs before committing (Kernel > Restart and clear)."


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_layout(name):
    """Objectives first, runtime stated, the Colab cell, one parameters cell with FAST, exercises with solutions."""
    nb = read(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "You will learn" in first.source, "learning objectives come first"
    assert re.search(r"\*\*Runtime:\*\* .*\d.*CPU", first.source) and "GPU" in first.source, \
        "the first cell states the runtime on a CPU and on a GPU"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert '"google.colab" in sys.modules' in code[0].source, "the first code cell detects Colab"
    assert "torch" not in re.findall(r"pip\", \"install\".*", code[0].source)[0], "Colab's torch is never reinstalled"
    params = runner.tagged(nb, "parameters")
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert re.search(r"^FAST = False\b", nb.cells[params[0]].source, re.MULTILINE), "parameters define FAST = False"
    assert re.search(r'^DEVICE = "auto"', nb.cells[params[0]].source, re.MULTILINE), \
        'parameters define DEVICE = "auto" (bench/gpu_check.sh and the stand-in CUDA device set DEVICE = "cuda")'
    assert "DEVICE_VARIABLE" in "".join(c.source for c in code), "DEVICE reaches the kit (DIFFLORA_DEVICE)"
    exercises = [runner.exercise_id(nb.cells[i]) for i in runner.tagged(nb, "exercise")]
    assert None not in exercises, "an exercise cell starts with '# Exercise N.M'"
    solutions = runner.read_solutions(runner.solutions_file(notebook_path(name)))
    assert exercises and set(exercises) == set(solutions), \
        f"exercises {exercises} and solutions {sorted(solutions)} (solutions/{name[:2]}_solutions.py) differ"
    for i in runner.tagged(nb, "exercise"):
        after = nb.cells[i + 1]
        assert "check" in after.metadata.get("tags", []), f"the cell after exercise {exercises[0]} is its check cell"
        assert runner.SOLVED.format(runner.exercise_id(nb.cells[i])) in after.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_cells_and_solutions_compile(name):
    """A syntax error shows here in milliseconds, not after minutes of training."""
    for i, cell in enumerate(read(name).cells):
        if cell.cell_type == "code":
            compile(cell.source, f"{name}.ipynb, cell {i}", "exec")
    for ex, source in runner.read_solutions(runner.solutions_file(notebook_path(name))).items():
        compile(source, f"solutions/{name[:2]}_solutions.py, exercise {ex}", "exec")


def test_kernel_is_this_python(tmp_path):
    """nbclient's kernel_name="python3" starts the ipykernel of the Python running the tests (the venv's)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import sys; print(sys.executable)")]
    path = tmp_path / "00_probe.ipynb"
    nbformat.write(nb, path)
    result = runner.execute(path, cwd=tmp_path, timeout=120)
    printed = result["nb"].cells[0].outputs[0]["text"].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()


def test_parameters_are_injected_after_the_parameters_cell():
    nb = read("01_setup_and_tour")
    at = runner.tagged(nb, "parameters")[0]
    runner.inject_parameters(nb, {"FAST": True, "SEEDS": 1})
    assert nb.cells[at + 1].source.splitlines()[1:] == ["FAST = True", "SEEDS = 1"]
    with pytest.raises(ValueError, match="not defined"):
        runner.inject_parameters(read("01_setup_and_tour"), {"STEPZ": 3})


def probe_notebook(folder: Path, cells: list[str]) -> Path:
    """A notebook NN_probe.ipynb in `folder`: a parameters cell (FAST), then `cells` as code cells."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("FAST = False\nDEVICE = 'auto'", metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    path = folder / "00_probe.ipynb"
    nbformat.write(nb, path)
    return path


def test_plain_mode_runs_the_prepared_cells_in_one_namespace(tmp_path):
    """--plain (bench/gpu_check.sh on a machine without Jupyter): the injected parameters, then each cell
    in turn, sharing names; output streamed; the working folder honoured."""
    path = probe_notebook(tmp_path, ["x = 40 if FAST else 0", "import os\nprint('x + 2 =', x + 2, os.getcwd())"])
    lines = []
    result = runner.execute_plain(path, {"FAST": True}, cwd=tmp_path / "work", timeout=120, echo=lines.append)
    assert lines == [f"x + 2 = 42 {tmp_path / 'work'}"] and result["output"].strip() == lines[0]
    assert runner.unconfirmed(["1.1"], "Exercise 1.1: solved") == [] and runner.unconfirmed(["1.2"], "") == ["1.2"]


def test_plain_mode_names_the_failing_cell_as_the_committed_file_counts_it(tmp_path):
    path = probe_notebook(tmp_path, ["y = 1", "raise ValueError('boom')"])
    with pytest.raises(runner.PlainRunError, match=r"(?s)failed \(exit 1\).*00_probe\.ipynb, cell 2.*ValueError: boom"):
        runner.execute_plain(path, {"FAST": True}, cwd=tmp_path, timeout=120, echo=lambda line: None)
    slow = probe_notebook(tmp_path, ["import time\ntime.sleep(60)"])
    with pytest.raises(runner.PlainRunError, match="ran past 3 s"):
        runner.execute_plain(slow, cwd=tmp_path, timeout=3, echo=lambda line: None)


def test_check_mode_prepares_and_compiles_without_running(tmp_path, capsys):
    """--check: a parameter the notebook lacks fails in a second (notebook 08 once had no DEVICE)."""
    assert runner.main(["02", "08", "--fast", "--solutions", "--check", "--set", "DEVICE='cuda'"]) == 0
    assert "08_real_model_on_a_gpu.ipynb: " in capsys.readouterr().out
    with pytest.raises(ValueError, match="not defined"):
        runner.main(["08", "--check", "--set", "DEVIZE='cuda'"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_cwd):
    run = NOTEBOOKS[name]
    if run.on_stand_in:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("runs with DEVICE='cuda' under the stand-in CUDA device: tests/test_notebooks_on_cuda.py")
    if run.needs_cuda:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    params = {**runner.CI_PARAMETERS, **dict(run.params)}
    result = runner.execute(notebook_path(name), params, solutions=True, cwd=notebook_cwd,
                            timeout=run.budget_s * TIMEOUT_FACTOR)  # raises on the first failing cell
    text = runner.outputs_text(result["nb"])
    missing = [ex for ex in result["exercises"] if runner.SOLVED.format(ex) not in text]
    assert not missing, f"the check cells did not confirm the solutions of exercises {missing}"
    print(f"{name}: {result['seconds']:.0f} s (budget {run.budget_s} s)")
