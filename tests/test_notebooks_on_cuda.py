"""The course notebooks with DEVICE = "cuda", on the CPU, under the stand-in CUDA device
(difflora_kit.stand_in_cuda): a tensor a notebook leaves on the CPU fails here as it would on Colab.

Each notebook runs as tests/test_notebooks.py runs it (notebooks/runner.py's execute(): FAST = True,
every exercise's solution inserted, one shared working folder), plus DEVICE = "cuda", in a Jupyter
kernel started under the stand-in (stand_in_cuda.environment: a generated sitecustomize switches it
on before the kernel imports torch). The card is the course's: a Colab T4 (sm75, the fp16 rule,
Triton's merge kernels only for fp32). Notebook 08 runs its tiny pipeline on it in fp16, as a T4
learner would.

A probe cell appended to each notebook (runner.prepare is wrapped here, the notebook file is not
touched) prints what the kernel saw: torch.cuda on the stand-in card, the ops run on stand-in tensors,
and the devices of every model the notebook left in its namespace. The tests check that the CUDA path
was taken: without the stand-in (or with DEVICE ignored) the notebook would pass on the CPU and prove
nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest

from difflora_kit import stand_in_cuda

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
_spec = importlib.util.spec_from_file_location("notebook_runner_on_cuda", NOTEBOOKS_DIR / "runner.py")
runner = importlib.util.module_from_spec(_spec)  # this file's own copy: the wrap below stays here
_spec.loader.exec_module(runner)


@dataclasses.dataclass(frozen=True)
class OnCuda:
    """How one notebook runs under the stand-in."""

    card: str = "7.5"
    """The stand-in's compute capability (7.5: a Colab T4)."""
    budget_s: int = 300
    """Wall-clock limit (a timeout, not a target). Measured 2026-12-03 on a shared 2-core CPU, FAST: 17-185 s
    a notebook, 1x (02) to 2.6x (08) the kernel's CPU time of the plain CPU run."""


NOTEBOOKS = {  # the notebooks issue 18 names; each on the card a learner of the course has
    "02_lora_from_scratch": OnCuda(),
    "03_the_8bit_base": OnCuda(),
    "05_step2_lora2_difference": OnCuda(),
    "06_lora2_strength_slider": OnCuda(),
    "08_real_model_on_a_gpu": OnCuda(),
}
TIMEOUT_FACTOR = 3  # a machine busy with other jobs is slower

PROBE_MARK = "stand-in probe: "
PROBE = '''# Injected by tests/test_notebooks_on_cuda.py: where this notebook's work ran
import json as _json
import resource as _resource

import torch as _torch

import difflora_kit.stand_in_cuda as _stand_in


def _modules_of(value):
    """The torch modules a value holds: itself, a backend's or a pipeline's components."""
    if isinstance(value, _torch.nn.Module):
        return [value]
    parts = getattr(value, "components", None) if not isinstance(value, type) else None
    if not isinstance(parts, dict):
        parts = vars(value) if hasattr(value, "__dict__") and not isinstance(value, type) else {}
    return [v for v in parts.values() if isinstance(v, _torch.nn.Module)]


_models = {}
for _name, _value in list(globals().items()):
    if _name.startswith("_") or isinstance(_value, type(_json)):
        continue
    for _m in _modules_of(_value):
        _devices = {str(t.device) for t in list(_m.parameters()) + list(_m.buffers())}
        if _devices:
            _models.setdefault(_name, set()).update(_devices)
print("''' + PROBE_MARK + '''" + _json.dumps({
    "active": _stand_in.is_active(), "capability": list(_stand_in.stats.capability),
    "cuda_available": _torch.cuda.is_available(), "device_variable": DEVICE,
    "ops": _stand_in.stats.ops, "made": _stand_in.stats.made,
    "kernel_cpu_s": round(sum(_resource.getrusage(_resource.RUSAGE_SELF)[:2]), 1),
    "models": {k: sorted(v) for k, v in _models.items()},
}))
'''


def _prepare_with_probe(prepare):
    def prepare_and_probe(notebook, params=None, solutions=False):
        nb, exercises = prepare(notebook, params, solutions)
        cell = nbformat.v4.new_code_cell(PROBE, metadata={"tags": ["injected-probe"]})
        cell.id = "injected-probe"
        nb.cells.append(cell)
        return nb, exercises

    return prepare_and_probe


runner.prepare = _prepare_with_probe(runner.prepare)  # execute() looks prepare up in its module


def probe_facts(nb) -> dict:
    """What the probe cell printed."""
    text = runner.outputs_text(nb)
    line = next((line for line in text.splitlines() if line.startswith(PROBE_MARK)), None)
    assert line is not None, "the probe cell printed nothing: the notebook did not reach its end"
    return json.loads(line[len(PROBE_MARK):])


def kernel_environment(card: str, tmp: Path) -> dict[str, str]:
    """os.environ for runner.execute: the stand-in on `card`, the tests' caches, no forced device."""
    cache = os.environ.get(stand_in_cuda.CACHE_VARIABLE) or str(ROOT / ".cache" / "stand_in_cuda")
    base = {**os.environ, stand_in_cuda.CACHE_VARIABLE: cache, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
            "TRITON_CACHE_DIR": str(tmp / "triton"), "MPLCONFIGDIR": str(tmp / "mpl")}
    for name in ("DIFFLORA_DEVICE", "DIFFLORA_MERGE_KERNELS"):
        base.pop(name, None)
    return stand_in_cuda.environment(card, folder=Path(cache), base=base)


@pytest.fixture(scope="module")
def shared_cwd(request, tmp_path_factory):
    """The notebooks' shared working folder: the session's `notebook_cwd` where a conftest provides it (then
    notebook 05 picks up the LoRA 1 that tests/test_notebooks.py's notebook 04 saved), else one for this file
    (05 trains its own LoRA 1; 06 reads 05's LoRA 2 either way)."""
    try:
        return request.getfixturevalue("notebook_cwd")
    except pytest.FixtureLookupError:
        return tmp_path_factory.mktemp("notebooks_on_cuda")


@pytest.fixture(scope="module")
def no_real_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the stand-in is for CPU-only machines (bench/gpu_check.sh runs the GPU)")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_stand_in_cuda(name, shared_cwd, no_real_gpu, tmp_path):
    run = NOTEBOOKS[name]
    params = {**runner.CI_PARAMETERS, "DEVICE": "cuda"}
    with runner.environ(kernel_environment(run.card, tmp_path)):
        result = runner.execute(NOTEBOOKS_DIR / f"{name}.ipynb", params, solutions=True, cwd=shared_cwd,
                                timeout=run.budget_s * TIMEOUT_FACTOR)  # raises on the first failing cell
    nbformat.write(result["nb"], tmp_path / f"{name}.ipynb")  # the executed notebook, to read when it fails
    text = runner.outputs_text(result["nb"])
    missing = runner.unconfirmed(result["exercises"], text)
    assert not missing, f"the check cells did not confirm the solutions of exercises {missing}"
    facts = probe_facts(result["nb"])
    assert facts["active"] and facts["cuda_available"], "the kernel did not start under the stand-in CUDA device"
    assert facts["capability"] == [int(run.card[0]), int(run.card[-1])] and facts["device_variable"] == "cuda"
    assert facts["ops"] > 1000, f"only {facts['ops']} ops ran on stand-in (cuda) tensors: the CUDA path was not taken"
    on_cuda = {k for k, v in facts["models"].items() if v == ["cuda:0"]}
    assert on_cuda, f"no model of the notebook is on cuda: {facts['models']}"
    print(f"{name} on a stand-in sm{run.card.replace('.', '')}: {result['seconds']:.0f} s ({facts['kernel_cpu_s']:.0f} s of "
          f"CPU in the kernel), {facts['ops']} ops on "
          f"stand-in tensors; models {facts['models']}")
