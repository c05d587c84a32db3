"""Which backend a `--base` value means. The family is read from the model folder's config.

    "toy" (default)                 -> the shipped toy model, data_samples/toy_base
    a folder with model_index.json  -> its family: "difflora-toy" (a kit-made toy model),
                                       StableDiffusionPipeline -> "sd15", StableDiffusionXLPipeline -> "sdxl",
                                       FluxPipeline -> "flux" (a transformer/ folder instead of unet/)
    a hub id ("owner/name")         -> the same, from huggingface_hub's cache (downloaded when online)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .flux_backend import FAMILY as FLUX, PIPELINE as FLUX_PIPELINE
from .sd_backend import FAMILIES as SD_FAMILIES
from .toy.backend import DEFAULT_FOLDER, FAMILY, ToyBackend


def _from_hub(repo_id: str, configs_only: bool = False) -> Path | None:
    """The local snapshot of a hub model (fetched when online), or None. Only the pipeline's own
    components are fetched (model_index.json names them: no single-file checkpoints at the root,
    no safety checker, no fp16/EMA duplicates); `configs_only`: their JSON and text files alone."""
    try:
        from huggingface_hub import snapshot_download

        index = Path(snapshot_download(repo_id, allow_patterns=["model_index.json"])) / "model_index.json"
        parts = [k for k, v in json.loads(index.read_text()).items()
                 if isinstance(v, list) and k not in ("safety_checker", "feature_extractor", "image_encoder")]
        kinds = ["json", "txt"] if configs_only else ["json", "txt", "safetensors", "model"]
        return Path(snapshot_download(repo_id, allow_patterns=["model_index.json"] + [f"{p}/*.{k}" for p in parts for k in kinds],
                                      ignore_patterns=["*.fp16.safetensors", "*ema*", "*non_ema*"]))
    except Exception:  # offline and not cached, no such repo, no network: the caller explains
        return None


def resolve(base: str | Path = "toy", configs_only: bool = False) -> Path:
    """The local folder of `base`; a hub id is fetched (only its configs with `configs_only`)."""
    if str(base) == "toy":
        return DEFAULT_FOLDER
    path = Path(base)
    if not path.exists() and str(base).count("/") == 1 and not str(base).startswith((".", "/")):
        path = _from_hub(str(base), configs_only) or path
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--base {base}: not a model folder (no model_index.json there), nor a hub model available here. "
            "Use 'toy' for the built-in model, the path of a diffusers model folder, or a hub id while online."
        )
    return path


def family(base: str | Path = "toy") -> str:
    index = json.loads((resolve(base, configs_only=True) / "model_index.json").read_text())
    if "family" in index:
        return index["family"]
    known = {**SD_FAMILIES, FLUX_PIPELINE: FLUX}
    return known.get(index.get("_class_name", ""), index.get("_class_name", "unknown"))


def check_supported(base: str | Path = "toy") -> str:
    """The family of `base`, or a clear error when this version has no backend for it."""
    kind = family(base)
    if kind not in (FAMILY, *SD_FAMILIES.values(), FLUX):
        raise NotImplementedError(
            f"--base {base}: model family {kind!r} has no backend in this version of difflora-kit "
            f"(available: the toy model, Stable Diffusion 1.x (sd15), SDXL (sdxl) and FLUX.1 (flux))."
        )
    return kind


def sample_size(base: str | Path = "toy") -> int:
    """The image size the base draws (pixels): training images must have it (or be resized)."""
    kind, folder = check_supported(base), resolve(base)
    if kind == FLUX:  # the VAE's own sample_size (FLUX.1: 1024)
        return int(json.loads((folder / "vae" / "config.json").read_text()).get("sample_size") or 1024)
    size = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
    if kind == FAMILY:
        return size  # pixel space
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return size * 2 ** (len(vae["block_out_channels"]) - 1)  # latent size x the VAE's down-sampling


def load_backend(base: str | Path = "toy", device: str | None = None):
    """A fresh, full-precision backend for `base` (each call reloads: training modifies the denoiser).
    SD backends go to `device` (default: CUDA when available); the toy to `device` (default: the CPU)."""
    kind = check_supported(base)
    if kind == FAMILY:  # the toy stays on the CPU unless a device is named (it is small: a GPU gains little)
        return ToyBackend.load(resolve(base)).to(device or "cpu")
    from .sd_backend import StableDiffusionBackend

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == FLUX:
        from .flux_backend import FluxBackend

        return FluxBackend.load(resolve(base), device)
    return StableDiffusionBackend.load(resolve(base), device)


def module_names(base: str | Path = "toy") -> list[str]:
    """Names of the denoiser's modules, from its config alone (built on the meta device: no weights)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    model = FluxTransformer2DModel if check_supported(base) == FLUX else UNet2DConditionModel
    config = model.load_config(resolve(base) / denoiser_folder(base))
    with torch.device("meta"):
        unet = model.from_config(config)
    return [name for name, _ in unet.named_modules() if name]


def denoiser_folder(base: str | Path = "toy") -> str:
    """The denoiser's subfolder: "transformer" for FLUX, "unet" otherwise."""
    return "transformer" if family(base) == FLUX else "unet"


def base_digest(base: str | Path = "toy") -> str:
    """Short hash of the denoiser's weight files: LoRA metadata records which base a LoRA fits.
    Files over 256 MiB (real models) are hashed by size, head and tail, not read whole."""
    import hashlib

    h, chunk = hashlib.sha256(), 16 * 2**20
    for f in sorted((resolve(base) / denoiser_folder(base)).glob("*.safetensors")):
        size = f.stat().st_size
        if size <= 256 * 2**20:
            h.update(f.read_bytes())
            continue
        with f.open("rb") as fh:
            h.update(str(size).encode() + fh.read(chunk))
            fh.seek(size - chunk)
            h.update(fh.read(chunk))
    return h.hexdigest()[:16]
