"""difflora_kit.kernels is the top-level kernels/ folder, installed under the package's own name."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_non_editable_install_imports_the_kernels(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(ROOT)], check=True, cwd=tmp_path)
    assert (site / "difflora_kit" / "kernels" / "lora_merge.py").is_file()
    assert not (site / "kernels").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import difflora_kit.kernels as k; print(k.__file__); print(k.merge_quantize.__module__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert str(site) in out.stdout and "difflora_kit.kernels.lora_merge" in out.stdout


def test_bitsandbytes_and_transformers_import_cleanly_from_the_repository_root():
    """With the repository root on sys.path (python -c from there), kernels/ must not pass for the
    PyPI `kernels` package nor run any of our code under that name."""
    code = ("import bitsandbytes, sys, difflora_kit.kernels as ours\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "top = sys.modules.get('kernels')\n"
            "print(is_kernels_available(), 'kernels.lora_merge' in sys.modules, hasattr(top, 'merge_quantize'),\n"
            "      ours.merge_quantize.__module__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False", "False", "difflora_kit.kernels.lora_merge"], out.stdout + out.stderr
