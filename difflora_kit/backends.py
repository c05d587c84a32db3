"""Which backend a `--base` value means. The family is read from the model folder's config.

    "toy" (default)          -> the shipped toy model, data_samples/toy_base
    a folder with model_index.json -> its family: "difflora-toy" (a kit-made toy model)
"""

from __future__ import annotations

import json
from pathlib import Path

from .toy.backend import DEFAULT_FOLDER, FAMILY, ToyBackend


def resolve(base: str | Path = "toy") -> Path:
    if str(base) == "toy":
        return DEFAULT_FOLDER
    path = Path(base)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--base {base}: not a model folder (no model_index.json there). Use 'toy' for the built-in model "
            "or the path of a diffusers model folder."
        )
    return path


def family(base: str | Path = "toy") -> str:
    index = json.loads((resolve(base) / "model_index.json").read_text())
    return index.get("family") or index.get("_class_name", "unknown")


def check_supported(base: str | Path = "toy") -> str:
    """The family of `base`, or a clear error when this version has no backend for it."""
    kind = family(base)
    if kind != FAMILY:
        raise NotImplementedError(
            f"--base {base}: model family {kind!r} has no backend in this version of difflora-kit "
            f"(available: the toy model). Real Stable Diffusion backends are planned."
        )
    return kind


def sample_size(base: str | Path = "toy") -> int:
    """The image size the base draws (pixels): training images must have it (or be resized)."""
    check_supported(base)
    return json.loads((resolve(base) / "unet" / "config.json").read_text())["sample_size"]


def load_backend(base: str | Path = "toy"):
    """A fresh, full-precision backend for `base` (each call reloads: training modifies the denoiser)."""
    check_supported(base)
    return ToyBackend.load(resolve(base))


def base_digest(base: str | Path = "toy") -> str:
    """Short hash of the denoiser's weight file: LoRA metadata records which base a LoRA fits."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((resolve(base) / "unet").glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
