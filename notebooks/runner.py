"""Run the course notebooks headless: the tests and scripts/render_notebooks.sh both use this.

    python notebooks/runner.py --fast                      # all notebooks, CI parameters, a timing table
    python notebooks/runner.py --fast --solutions 03       # one notebook, exercises solved from solutions/
    python notebooks/runner.py --html docs/notebooks       # learner defaults, rendered to HTML (nbconvert)
    python notebooks/runner.py --fast --solutions --plain 02 03 08 --set "DEVICE='cuda'"   # no Jupyter kernel
    python notebooks/runner.py --fast --solutions --check 08 --set "DEVICE='cuda'"         # prepare, compile, run nothing

A notebook is run top to bottom with nbclient in the `python3` kernel (the kernel of the Python
that runs this file: jupyter_client starts `sys.executable -m ipykernel_launcher`). Parameters are
injected papermill-style: a cell tagged "injected-parameters" goes right after the cell tagged
"parameters", so the notebook's own defaults stay visible above the overrides. With `solutions`,
the solution of each exercise (solutions/NN_solutions.py, one `# %% Exercise N.M` section each)
is inserted after the exercise cell, so the check cell below it verifies the solution.

`--plain` runs the same prepared cells without Jupyter: in order, in one fresh Python process, one
shared namespace (`execute_plain`), their output streamed as it comes. For a machine that has the
kit but no ipykernel/nbclient (the GPU check, bench/gpu_check.sh, needs only nbformat there); rich
outputs are not shown and widgets have no front end, so it suits notebooks without IPython syntax.
`--check` prepares each notebook (parameters, solutions) and compiles its code cells, running
nothing: a parameter the notebook lacks, or a syntax error, shows in a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PATTERN = "[0-9][0-9]_*.ipynb"
CI_PARAMETERS = {"FAST": True}
"""What the tests (and `--fast`) inject: shorter schedules, fewer seeds; each notebook reads FAST."""
SOLVED = "Exercise {}: solved"
"""What a check cell prints when an exercise's answer is right (the tests look for it)."""
EXERCISE = re.compile(r"^#\s*Exercise\s+(\d+\.\d+)\b", re.MULTILINE)
SECTION = re.compile(r"^# %% Exercise (\d+\.\d+)\s*$", re.MULTILINE)


def discover(folder: Path = HERE) -> list[Path]:
    """The course notebooks, in order: NN_name.ipynb."""
    return sorted(Path(folder).glob(PATTERN))


def tagged(nb, tag: str) -> list[int]:
    """Indices of the cells that carry `tag`."""
    return [i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]


def exercise_id(cell) -> str | None:
    """'2.1' for an exercise cell whose source starts with '# Exercise 2.1 ...'."""
    m = EXERCISE.search(cell.source)
    return m.group(1) if m else None


def solutions_file(notebook: Path) -> Path:
    return Path(notebook).parent / "solutions" / f"{Path(notebook).name[:2]}_solutions.py"


def read_solutions(path: Path) -> dict[str, str]:
    """{'2.1': code} from a solutions file (sections start with '# %% Exercise 2.1')."""
    if not Path(path).is_file():
        return {}
    text = Path(path).read_text()
    marks = list(SECTION.finditer(text))
    return {m.group(1): text[m.end() : (marks[i + 1].start() if i + 1 < len(marks) else len(text))].strip() + "\n"
            for i, m in enumerate(marks)}


def inject_parameters(nb, params: dict) -> None:
    """Insert `NAME = value` overrides right after the cell tagged "parameters" (papermill's way)."""
    where = tagged(nb, "parameters")
    if len(where) != 1:
        raise ValueError(f"a notebook needs exactly one cell tagged 'parameters'; found {len(where)}")
    source = nb.cells[where[0]].source
    unknown = [k for k in params if not re.search(rf"^{re.escape(k)}\s*=", source, re.MULTILINE)]
    if unknown:
        raise ValueError(f"parameters {unknown} are not defined in the notebook's parameters cell")
    lines = ["# Injected parameters (notebooks/runner.py)"] + [f"{k} = {v!r}" for k, v in params.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(where[0] + 1, cell)


def inject_solutions(nb, solutions: dict[str, str]) -> list[str]:
    """Insert each exercise's solution after its exercise cell; returns the exercise ids (in order)."""
    ids, out = [], []
    for cell in nb.cells:
        out.append(cell)
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            ex = exercise_id(cell)
            if ex not in solutions:
                raise ValueError(f"exercise {ex!r} has no '# %% Exercise {ex}' section in the solutions file")
            solution = nbformat.v4.new_code_cell(solutions[ex], metadata={"tags": ["injected-solution"]})
            solution.id = f"solution-{ex.replace('.', '-')}"
            out.append(solution)
            ids.append(ex)
    nb.cells = out
    return ids


def problems_when_committed(nb) -> list[str]:
    """Why a notebook is not fit to commit: outputs, execution counts, widget state."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            if cell.get("outputs"):
                found.append(f"cell {i} has outputs")
            if cell.get("execution_count") is not None:
                found.append(f"cell {i} has execution_count {cell.execution_count}")
        if "execution" in cell.get("metadata", {}):
            found.append(f"cell {i} has execution timing metadata")
    if "widgets" in nb.metadata:
        found.append("metadata.widgets (saved widget state) is present")
    return found


def clear(nb) -> None:
    """Strip outputs, execution counts, timings and widget state (what `problems_when_committed` checks)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata.pop("widgets", None)


def kernel_env(cache: Path) -> dict[str, str]:
    """The kernel's environment: this one, plus caches kept under `cache`, no hub access, one thread."""
    env = dict(os.environ)
    cache = Path(cache)
    defaults = {
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": cache / "hf", "MPLCONFIGDIR": cache / "matplotlib", "TRITON_CACHE_DIR": cache / "triton",
        "TORCHINDUCTOR_CACHE_DIR": cache / "inductor", "TMPDIR": cache / "tmp", "IPYTHONDIR": cache / "ipython",
        "JUPYTER_RUNTIME_DIR": cache / "jupyter" / "runtime", "JUPYTER_DATA_DIR": cache / "jupyter" / "data",
        "JUPYTER_CONFIG_DIR": cache / "jupyter" / "config",
    }
    # One PyTorch thread unless OMP_NUM_THREADS says otherwise: on a 2-core machine shared with other
    # jobs, two OpenMP threads made training ~10x slower (0.24 s a step with one thread, 2.3 s with
    # two, 2026-11-26); on an idle machine one thread costs ~1.6x. Learners' kernels are not affected.
    env.setdefault("OMP_NUM_THREADS", "1")
    for key, value in defaults.items():
        env.setdefault(key, str(value))
        if isinstance(value, Path):
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """os.environ = env within the block (jupyter_client writes its connection file from this process)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def prepare(notebook: Path, params: dict | None = None, solutions: bool = False) -> tuple:
    """(notebook with the parameters and, if `solutions`, each exercise's solution inserted, exercise ids)."""
    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    if params:
        inject_parameters(nb, params)
    exercises = inject_solutions(nb, read_solutions(solutions_file(notebook))) if solutions else []
    return nb, exercises


def code_cells(nb, label: str) -> list[tuple[str, str]]:
    """[(where, source)] of the code cells, `where` naming the notebook and the cell as the committed file
    counts them from 0 ("02_x.ipynb, cell 16"; an inserted one: "..., injected-solution after cell 20")."""
    out, index = [], -1
    for cell in nb.cells:
        injected = next((t for t in cell.get("metadata", {}).get("tags", []) if t.startswith("injected-")), None)
        index += injected is None
        if cell.cell_type == "code":
            out.append((f"{label}, {injected} after cell {index}" if injected else f"{label}, cell {index}", cell.source))
    return out


def compile_cells(nb, label: str) -> int:
    """Compile every code cell (a SyntaxError names the cell); the number of code cells."""
    cells = code_cells(nb, label)
    for where, source in cells:
        compile(source, where, "exec")
    return len(cells)


def execute(notebook: Path, params: dict | None = None, solutions: bool = False, cwd: Path | None = None,
            timeout: float = 600, cache: Path = ROOT / ".cache") -> dict:
    """Run one notebook top to bottom. Raises nbclient's CellExecutionError on the first failing cell
    and CellTimeoutError when the whole notebook runs past `timeout` seconds.

    Returns {"nb": executed notebook, "seconds": wall time, "exercises": ids whose solution ran}."""
    from nbclient import NotebookClient  # only here: --plain and --check need no Jupyter

    notebook = Path(notebook)
    nb, exercises = prepare(notebook, params, solutions)
    cwd = Path(cwd or notebook.parent)
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def remaining(cell) -> int:  # one budget for the whole notebook, not per cell
        return max(1, int(timeout - (time.monotonic() - started)))

    client = NotebookClient(nb, timeout_func=remaining, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    with environ(kernel_env(cache)):
        client.execute(cwd=str(cwd))
    return {"nb": nb, "seconds": time.monotonic() - started, "exercises": exercises}


PLAIN_CHILD = """
import json, sys
scope = {"__name__": "__main__"}
for where, source in json.load(open(sys.argv[1], encoding="utf-8")):
    exec(compile(source, where, "exec"), scope)
    if "matplotlib.pyplot" in sys.modules:  # as Jupyter's inline backend: each cell's figures are done with
        sys.modules["matplotlib.pyplot"].close("all")
"""
"""The process `execute_plain` starts: each cell compiled under its name (tracebacks say "cell 16"), run in one namespace."""


class PlainRunError(RuntimeError):
    """A notebook run by `execute_plain` raised (the traceback is in its output) or ran out of time."""


def execute_plain(notebook: Path, params: dict | None = None, solutions: bool = False, cwd: Path | None = None,
                  timeout: float = 600, cache: Path = ROOT / ".cache", echo=print) -> dict:
    """Run one notebook's prepared code cells in a fresh Python process, no Jupyter kernel: the cells in
    order, one namespace, matplotlib headless (Agg); `echo` gets each line of output as it comes.

    Returns {"seconds", "exercises", "output"}; raises PlainRunError when a cell raised (the output ends
    with its traceback) or the notebook ran past `timeout` seconds (the process is killed)."""
    notebook = Path(notebook)
    nb, exercises = prepare(notebook, params, solutions)
    cwd = Path(cwd or notebook.parent)
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**kernel_env(cache), "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        cells = Path(tmp) / "cells.json"
        cells.write_text(json.dumps(code_cells(nb, notebook.name)), encoding="utf-8")
        started, lines = time.monotonic(), []
        proc = subprocess.Popen([sys.executable, "-c", PLAIN_CHILD, str(cells)], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                lines.append(line)
                echo(line.rstrip("\n"))
            code = proc.wait()
        finally:
            timer.cancel()
    seconds, output = time.monotonic() - started, "".join(lines)
    if code != 0:
        why = f"ran past {timeout:.0f} s and was stopped" if seconds >= timeout else f"failed (exit {code})"
        raise PlainRunError(f"{notebook.name} {why}; its output ends:\n" + "".join(lines[-15:]))
    return {"seconds": seconds, "exercises": exercises, "output": output}


def unconfirmed(exercises: list[str], text: str) -> list[str]:
    """The exercises whose check cell did not print "Exercise N.M: solved" in `text`."""
    return [ex for ex in exercises if SOLVED.format(ex) not in text]


def outputs_text(nb) -> str:
    """All stream and text/plain outputs of an executed notebook, joined."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def to_html(nb, path: Path) -> None:
    """Write an executed notebook as a standalone HTML page (nbconvert)."""
    try:
        from nbconvert import HTMLExporter
    except ImportError as e:
        raise SystemExit("rendering needs nbconvert: pip install 'nbconvert>=7' (or the notebooks extra)") from e
    body, _ = HTMLExporter().from_notebook_node(nb)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(body, encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook numbers or names (default: all)")
    parser.add_argument("--fast", action="store_true", help=f"inject the CI parameters {CI_PARAMETERS}")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="another parameter (a Python literal), e.g. --set STEPS=40")
    parser.add_argument("--solutions", action="store_true", help="run each exercise's solution after it")
    parser.add_argument("--html", type=Path, help="write each executed notebook as HTML into this folder")
    parser.add_argument("--executed", type=Path, help="write each executed notebook (.ipynb, with outputs) into this folder")
    parser.add_argument("--cwd", type=Path, help="working folder of the kernels (default: notebooks/)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per notebook")
    parser.add_argument("--plain", action="store_true",
                        help="run the cells in a plain Python process, without Jupyter (see execute_plain)")
    parser.add_argument("--check", action="store_true", help="prepare each notebook and compile its cells; run nothing")
    args = parser.parse_args(argv)
    import ast

    params = dict(CI_PARAMETERS) if args.fast else {}
    for item in args.set:
        key, _, value = item.partition("=")
        params[key] = ast.literal_eval(value)
    chosen = [p for p in discover() if not args.names or any(p.name.startswith(n) for n in args.names)]
    if not chosen:
        print("no notebook matches", args.names, file=sys.stderr)
        return 2
    if args.check:
        for path in chosen:
            nb, exercises = prepare(path, params, args.solutions)
            print(f"{path.name}: {compile_cells(nb, path.name)} code cells compile; parameters {params}; "
                  f"solutions of {exercises or 'no exercise'} inserted")
        return 0
    if args.plain:
        return run_plain(chosen, params, args)
    rows = []
    for path in chosen:
        print(f"running {path.name} ...", flush=True)
        result = execute(path, params, args.solutions, args.cwd, args.timeout)
        rows.append((path.name, result["seconds"]))
        if args.executed:
            args.executed.mkdir(parents=True, exist_ok=True)
            nbformat.write(result["nb"], args.executed / path.name)
        if args.html:
            to_html(result["nb"], args.html / path.with_suffix(".html").name)
    print("\n| notebook | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.0f} |")
    print(f"| total | {sum(s for _, s in rows):.0f} |")
    return 0


def run_plain(chosen: list[Path], params: dict, args) -> int:
    """--plain: each notebook in turn (a failure does not stop the next one); a table; 1 if any failed."""
    rows = []
    for path in chosen:
        print(f"running {path.name} (plain Python, no Jupyter) ...", flush=True)
        try:
            result = execute_plain(path, params, args.solutions, args.cwd, args.timeout,
                                   echo=lambda line: print("   " + line, flush=True))
        except PlainRunError as e:
            print(f"FAILED: {e}", flush=True)
            rows.append((path.name, None, "FAILED"))
            continue
        missing = unconfirmed(result["exercises"], result["output"])
        rows.append((path.name, result["seconds"], f"exercises {missing} not confirmed" if missing else "ok"))
    print("\n| notebook | seconds | result |\n|---|---|---|")
    for name, seconds, outcome in rows:
        print(f"| {name} | {'-' if seconds is None else f'{seconds:.0f}'} | {outcome} |")
    return 0 if all(outcome == "ok" for _, _, outcome in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
