"""Which base model a `--base` value means, resolved once into a `Base` that is passed down.

    "toy" (default)                 -> the shipped toy model, data_samples/toy_base
    a folder with model_index.json  -> its family: the row of registry.py whose pipelines name its
                                       `_class_name` (a kit-made toy model says "family" itself)
    a hub id ("owner/name")         -> the same, from huggingface_hub's cache (downloaded when online)

    base = backends.resolve_base("out/tiny_sdxl")   # Base(spec, folder, family row)
    backend = backends.load_backend(base)           # a fresh backend (base.py's interface)

Every function here takes a `Base` or the string itself (then resolved on the spot).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from typing import TYPE_CHECKING

from ..paths import TOY_BASE as DEFAULT_FOLDER
from ..quiet import quiet_loading
from . import registry
from .registry import Family

if TYPE_CHECKING:  # importing this package stays light: torch and the model libraries load with a backend
    from .base import Backend


@dataclasses.dataclass(frozen=True)
class Base:
    """A resolved base model: what the user gave, its local folder and its family's row."""

    spec: str
    """As given: "toy", a folder, a hub id (LoRA metadata records it)."""
    folder: Path
    family: Family
    configs_only: bool = False
    """True: only the configs were fetched (a hub id planned before downloading)."""

    def __str__(self) -> str:
        return self.spec


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


def resolve(base: str | Path | Base = "toy", configs_only: bool = False) -> Path:
    """The local folder of `base`; a hub id is fetched (only its configs with `configs_only`)."""
    if isinstance(base, Base) and not (base.configs_only and not configs_only):
        return base.folder
    spec = str(base)
    if spec == "toy":
        return DEFAULT_FOLDER
    path = Path(spec)
    if not path.exists() and spec.count("/") == 1 and not spec.startswith((".", "/")):
        path = _from_hub(spec, configs_only) or path
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--base {spec}: not a model folder (no model_index.json there), nor a hub model available here. "
            "Use 'toy' for the built-in model, the path of a diffusers model folder, or a hub id while online."
        )
    return path


def _family_key(folder: Path) -> str:
    """The family named by a folder's model_index.json (its pipeline class), or the class name itself."""
    index = json.loads((folder / "model_index.json").read_text())
    if "family" in index:
        return index["family"]
    row = registry.by_pipeline(index.get("_class_name", ""))
    return row.key if row is not None else index.get("_class_name", "unknown")


def resolve_base(base: str | Path | Base = "toy", configs_only: bool = False) -> Base:
    """`base` resolved: its folder and its family's row; a clear error when no backend has its family."""
    if isinstance(base, Base) and not (base.configs_only and not configs_only):
        return base
    folder = resolve(base, configs_only)
    key = _family_key(folder)
    try:
        row = registry.get(key)
    except NotImplementedError:
        raise NotImplementedError(f"--base {base}: model family {key!r} has no backend in this version of "
                                  f"difflora-kit (available: {registry.available()})") from None
    return Base(str(base), folder, row, configs_only)


def family(base: str | Path | Base = "toy") -> str:
    """The family key of `base` (its registry row's key); a folder of an unknown pipeline gives its class name."""
    if isinstance(base, Base):
        return base.family.key
    return _family_key(resolve(base, configs_only=True))


def check_supported(base: str | Path | Base = "toy") -> str:
    """The family of `base`, or a clear error when this version has no backend for it."""
    return resolve_base(base, configs_only=True).family.key


def sample_size(base: str | Path | Base = "toy") -> int:
    """The image size the base draws (pixels): training images must have it (or be resized)."""
    base = resolve_base(base, configs_only=True)
    return base.family.backend_class().folder_sample_size(base.folder)


DEVICE_VARIABLE = "DIFFLORA_DEVICE"


def default_device() -> str:
    """Where a backend goes unless a device is named: $DIFFLORA_DEVICE when set (cpu, cuda, cuda:1),
    else CUDA when there is one, else the CPU. Noise is drawn on the CPU either way, so a seed gives
    the same pictures on both devices (within the GPU's rounding)."""
    import torch

    forced = os.environ.get(DEVICE_VARIABLE, "").strip()
    if forced:
        return check_device(forced, f"${DEVICE_VARIABLE}")
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, where: str = "--device") -> str:
    """`device` if this machine has it; a clear error naming `where` it came from otherwise."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{where} {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where} {device!r}: this machine has no CUDA GPU (torch {torch.__version__}); use cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"{where} {device!r}: there are {torch.cuda.device_count()} CUDA devices here")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} {device!r}: the kit runs on cpu or cuda")
    return device


def load_backend(base: str | Path | Base = "toy", device: str | None = None, denoiser=None) -> Backend:
    """A fresh, full-precision backend for `base` (each call reloads: training modifies the denoiser),
    on `device` (default: default_device()); `denoiser`: one already built instead (streamed, or shapes
    only to encode first: streaming.meta_denoiser, then LatentBackend.attach_denoiser; pair.prepare_base)."""
    base = resolve_base(base)
    with quiet_loading():  # no "Loading weights" bars: a pair loads the base three times
        return base.family.backend_class().load(base.folder, device or default_device(), denoiser=denoiser)


def _meta_denoiser(base: str | Path | Base):
    """The denoiser built from its config alone on the meta device: names and shapes, no weights."""
    import diffusers
    import torch

    base = resolve_base(base, configs_only=True)
    model = getattr(diffusers, base.family.denoiser_class)
    config = model.load_config(base.folder / base.family.denoiser_folder)
    with torch.device("meta"):
        return model.from_config(config)


def module_names(base: str | Path | Base = "toy") -> list[str]:
    """Names of the denoiser's modules, from its config alone (built on the meta device: no weights)."""
    return [name for name, _ in _meta_denoiser(base).named_modules() if name]


def weight_shapes(base: str | Path | Base = "toy") -> dict[str, tuple[int, ...]]:
    """{module: weight shape} of the denoiser's modules that have a weight, from its config alone."""
    import torch

    return {name: tuple(m.weight.shape) for name, m in _meta_denoiser(base).named_modules()
            if name and isinstance(getattr(m, "weight", None), torch.Tensor)}


def denoiser_folder(base: str | Path | Base = "toy") -> str:
    """The denoiser's subfolder: "unet" or "transformer" (the family's row says)."""
    return resolve_base(base, configs_only=True).family.denoiser_folder


def base_digest(base: str | Path | Base = "toy") -> str:
    """Short hash of the denoiser's weight files: LoRA metadata records which base a LoRA fits.
    Files over 256 MiB (real models) are hashed by size, head and tail, not read whole."""
    import hashlib

    base = resolve_base(base)
    h, chunk = hashlib.sha256(), 16 * 2**20
    for f in sorted((base.folder / base.family.denoiser_folder).glob("*.safetensors")):
        size = f.stat().st_size
        if size <= 256 * 2**20:
            h.update(f.read_bytes())
            continue
        with f.open("rb") as fh:
            h.update(str(size).encode() + fh.read(chunk))
            fh.seek(size - chunk)
            h.update(fh.read(chunk))
    return h.hexdigest()[:16]
