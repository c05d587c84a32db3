"""What this Python imports, from where: the first check of bench/gpu_check.sh.

    python bench/gpu_imports.py            # import everything the kit needs; name bitsandbytes' native library
    python bench/gpu_imports.py --dry-run  # only find each module (no import): where it would come from
    python bench/gpu_imports.py --kit-from /tmp/x/kit   # also fail unless the kit comes from that folder

Prints one line per package (version and file), the kit's own folder and the folder its
`difflora_kit.kernels` resolves to (pyproject maps kernels/ there; a plain checkout needs
bench/gpu_check.sh's import folder), and the native library bitsandbytes loaded
(libbitsandbytes_cudaXYZ.so on a GPU machine; a stand-in that only raises when called means the CUDA
library did not load). On CUDA it quantizes one fp16 tensor with bitsandbytes and asks the kit's rule
whether the merge kernels run in Triton for each dtype. Exit 1 when an import or the library fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys

PACKAGES = ("torch", "triton", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes",
            "nbformat", "difflora_kit", "difflora_kit.kernels")
"""Everything gpu_check.sh's steps import (nbformat: notebooks/runner.py --plain)."""


def where(name: str) -> str:
    """The file a module would be imported from (find_spec; imports its parent package only)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {name!r}")
    return spec.origin or ", ".join(spec.submodule_search_locations or []) or "?"


def bnb_library(bnb) -> tuple[bool, str]:
    """(the native library is a real one, its file or why not) from bitsandbytes.cextension."""
    from bitsandbytes import cextension

    lib = getattr(cextension, "lib", None)
    native = getattr(lib, "_lib", None)
    name = getattr(native, "_name", None)
    backend = getattr(cextension, "BNB_BACKEND", "?")
    if name is None:
        return False, f"no native library loaded ({type(lib).__name__}, backend {backend})"
    return True, f"{name} ({type(lib).__name__}, backend {backend})"


def outside(kit_from: str | None, origins: dict[str, str]) -> list[str]:
    """The kit's modules that do not come from `kit_from` (a folder; None: no demand)."""
    if kit_from is None:
        return []
    folder = kit_from.rstrip("/") + "/"
    return [f"{n} comes from {origins.get(n, 'nowhere')}, not from {folder}" for n in PACKAGES
            if n.startswith("difflora_kit") and not origins.get(n, "").startswith(folder)]


def dry_run(kit_from: str | None = None) -> int:
    failed, origins = 0, {}
    for name in PACKAGES:
        try:
            origins[name] = where(name)
            print(f"{name:22s} {origins[name]}")
        except (ImportError, ValueError) as e:
            failed += 1
            print(f"{name:22s} MISSING: {e}")
    for problem in outside(kit_from, origins):
        failed += 1
        print("FAILED:", problem)
    print(f"python {platform.python_version()} {sys.executable}")
    print("IMPORTS (dry run, found only):", "OK" if not failed else f"{failed} FAILED")
    return 1 if failed else 0


def real_run(kit_from: str | None = None) -> int:
    failed, modules = 0, {}
    for name in PACKAGES:
        try:
            module = modules[name] = importlib.import_module(name)
            print(f"{name:22s} {getattr(module, '__version__', ''):12s} {getattr(module, '__file__', '?')}")
        except Exception as e:  # an ImportError, or a broken CUDA install raising anything at import
            failed += 1
            print(f"{name:22s} FAILED: {type(e).__name__}: {e}")
    for problem in outside(kit_from, {n: getattr(m, "__file__", "") or "" for n, m in modules.items()}):
        failed += 1
        print("FAILED:", problem)
    print(f"python {platform.python_version()} {sys.executable}")
    torch = modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_available())
    if torch is not None:
        print(f"torch CUDA {torch.version.cuda}; " + (
            f"{torch.cuda.get_device_name(0)}, compute capability {torch.cuda.get_device_capability(0)}" if cuda
            else "no CUDA device"))
    if "bitsandbytes" in modules:
        ok, what = bnb_library(modules["bitsandbytes"])
        print("bitsandbytes library:", what)
        if cuda and not (ok and "cuda" in what):
            failed += 1
            print("FAILED: bitsandbytes has no CUDA library on a CUDA machine: the 8-bit base cannot run here")
        if cuda and ok:
            try:
                import bitsandbytes.functional as F

                x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
                CB, SCB, _ = F.int8_vectorwise_quant(x)
                torch.cuda.synchronize()
                print(f"bitsandbytes int8_vectorwise_quant on CUDA: CB {CB.dtype} {tuple(CB.shape)}, "
                      f"SCB {SCB.dtype} {tuple(SCB.shape)}")
            except Exception as e:
                failed += 1
                print(f"FAILED: bitsandbytes' CUDA quantizer: {type(e).__name__}: {e}")
    if cuda and "difflora_kit.kernels" in modules:
        kernels = modules["difflora_kit.kernels"]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            probe = torch.empty(1, device="cuda", dtype=dtype)
            print(f"merge kernels for {str(dtype):15s}: {'Triton' if kernels.use_triton(probe, dtype) else 'PyTorch reference'}")
    print("IMPORTS:", "OK" if not failed else f"{failed} FAILED")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="find each module without importing it")
    parser.add_argument("--kit-from", help="fail unless difflora_kit and difflora_kit.kernels come from this folder")
    args = parser.parse_args(argv)
    return dry_run(args.kit_from) if args.dry_run else real_run(args.kit_from)


if __name__ == "__main__":
    sys.exit(main())
