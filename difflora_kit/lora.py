"""LoRA on the denoiser: attach with peft, save/load as diffusers-loadable safetensors, fuse.

A LoRA adapts a frozen weight W (out, in) by a low-rank update (Hu et al. 2021):

    W' = W + s * (alpha / r) * B @ A        A: (r, in)   B: (out, r)   B = 0 at init
         (out, in)  (out, r) @ (r, in)

For a convolution, A is itself a conv (r, in, kh, kw) and B a 1x1 conv (out, r, 1, 1): the
update is (B.flatten(1) @ A.flatten(1)).view(out, in, kh, kw).

Files: safetensors with diffusers' key names ("unet.<module>.lora_A.weight"), peft's config
under "lora_adapter_metadata", and the kit's own metadata (stage, base, rank, the training alpha,
preset hash, image hashes, version) under "difflora.*" keys. The strength is in the weights: every
file is written with alpha / r folded into B and alpha = r (fold_scale), so the loaders that ignore
the header (`unet.load_lora_adapter(path, prefix="unet")` with a plain path, ComfyUI, DiffSynth-Studio)
apply it at the same strength as `pipe.load_lora_weights(path)`. Older files (alpha != r in the header)
are read as before: their scale from the header.
kohya's keys (ComfyUI, AUTOMATIC1111) are converted by kohya.py: `save_kohya` writes them, `load` reads them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__, diffsynth, kohya, lora_formats, lora_match
from .backends import registry
from .files import atomic_file, check_lora_path

PREFIX = "unet"  # in memory every LoRA is keyed "unet.<module>..."
# In a file, keys carry the family's denoiser name (its registry row's lora_prefix: what its pipeline's
# load_lora_weights reads), recorded as meta "denoiser" when it is not "unet".
FILE_PREFIXES = tuple(dict.fromkeys((PREFIX, *(row.lora_prefix for row in registry.FAMILIES))))


def file_prefix(lora: "LoraFile") -> str:
    """The key prefix a LoRA is written with: diffusers' name of its denoiser (meta "denoiser")."""
    return lora.meta["denoiser"] if lora.meta.get("denoiser") in FILE_PREFIXES else PREFIX


def _other_prefix(tensors: dict) -> str | None:
    """The file prefix of keys that are not "unet." (e.g. a transformer's LoRA), or None."""
    return next((p for p in FILE_PREFIXES[1:] if any(k.startswith(f"{p}.") for k in tensors)), None)


DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PRESET_ADAPTER = "difflora_preset"  # the frozen preset adapter of step 2 (preset_mode="adapter")


class LoraMismatchError(ValueError):
    """A LoRA file does not fit the model it is applied to."""


class NonFiniteLoraError(ValueError):
    """A LoRA file holds NaN or infinite values."""


@dataclasses.dataclass
class LoraFile:
    """A LoRA in memory: diffusers-keyed tensors, the peft config dict, the kit's metadata."""

    tensors: dict[str, torch.Tensor]
    config: dict
    meta: dict

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (A, B)} with the "unet." prefix removed."""
        out = {}
        for key, a in self.tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key[len(PREFIX) + 1 : -len(".lora_A.weight")]
                out[name] = (a, self.tensors[key.replace(".lora_A.", ".lora_B.")])
        return out

    def scaling(self, name: str) -> float:
        """alpha / r for one module (peft's rank_pattern / alpha_pattern honoured)."""
        r = self.config.get("rank_pattern", {}).get(name, self.rank)
        alpha = self.config.get("alpha_pattern", {}).get(name, self.alpha)
        return float(alpha) / float(r)

    def digest(self) -> str:
        return tensors_digest(self.tensors)


def peft_config(rank: int, alpha: float, targets) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)


def attach(unet: nn.Module, rank: int, alpha: float, targets, name: str = "difflora") -> list[nn.Parameter]:
    """Add a trainable LoRA (B = 0) to the denoiser with peft; return its parameters.
    A frozen preset adapter (step 2, preset_mode="adapter") stays on beside it."""
    with warnings.catch_warnings():  # "multiple adapters": intended when a frozen preset adapter is there
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(peft_config(rank, alpha, targets), adapter_name=name)
    unet.set_adapters(active_presets(unet) + [name])
    unet.requires_grad_(False)  # after set_adapters: peft marks every active adapter trainable
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise LoraMismatchError(f"no module of the denoiser matches targets {list(targets)}")
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()  # LoRA weights stay fp32 whatever the base's dtype
    return params


def load_frozen_adapter(unet: nn.Module, preset: LoraFile, strength: float = 1.0) -> None:
    """Load the preset as a peft adapter named PRESET_ADAPTER (diffusers' own loader), strength baked
    into B, frozen. `attach` keeps it active beside the adapter being trained."""
    tensors = {k: (v * strength if ".lora_B." in k else v) for k, v in preset.tensors.items()}
    metadata = {f"{PREFIX}.{k}": v for k, v in preset.config.items()}
    unet.load_lora_adapter(tensors, prefix=PREFIX, adapter_name=PRESET_ADAPTER, metadata=metadata)
    unet.set_adapters([PRESET_ADAPTER], [1.0])
    for name, p in unet.named_parameters():
        if f".{PRESET_ADAPTER}." in name:
            p.requires_grad_(False)


def active_presets(unet: nn.Module) -> list[str]:
    """[PRESET_ADAPTER] when the denoiser carries a frozen preset adapter, else []."""
    return [PRESET_ADAPTER] if PRESET_ADAPTER in (getattr(unet, "peft_config", None) or {}) else []


def adapter_state(unet: nn.Module, name: str = "difflora") -> tuple[dict[str, torch.Tensor], dict]:
    """(diffusers-keyed tensors, peft config dict) of an attached adapter: what its file will hold.

    The tensors are copies in fp32 on the CPU, wherever the denoiser is (a LoraFile is a file's
    content: a trained LoRA and the same LoRA loaded from disk compare and combine without moving
    anything). Whoever applies a LoraFile moves A and B to the weight's device (add_delta_,
    preset.apply_preset, streaming, diffusers' load_lora_adapter). A denoiser built on the meta
    device (shapes only) gives meta tensors: they have no values to copy."""
    sd = get_peft_model_state_dict(unet, adapter_name=name)
    tensors = {f"{PREFIX}.{k}": file_tensor(v) for k, v in sd.items()}
    config = unet.peft_config[name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    folded = fold_scale(LoraFile(tensors, json.loads(json.dumps(config, default=str)), {}))
    return folded.tensors, folded.config


def unit_scale_config(config: dict, ranks: dict[str, int]) -> dict:
    """A peft config whose scale alpha / r is 1 in every module, with per-module ranks `ranks` {module: rank}.

    The most common rank becomes r (ties: the larger); the others go to rank_pattern, with the same
    numbers in alpha_pattern (diffusers' `load_lora_adapter` and `LoraFile.scaling` read both)."""
    counts = collections.Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    return {**config, "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def fold_scale(lora: LoraFile) -> LoraFile:
    """The same LoRA with each module's alpha / r folded into its B and alpha = r everywhere.

        B' = (alpha / r) * B,  alpha' = r:   (alpha' / r) * B' @ A = (alpha / r) * B @ A   (same deltas)

    Every file the kit writes is in this form: a loader that ignores the header's lora_alpha (diffusers'
    `load_lora_adapter` given a plain path, ComfyUI and DiffSynth-Studio for peft keys) reads scale 1,
    which is then right. A LoRA already at scale 1 everywhere is returned as it is."""
    modules = lora.modules()
    if all(lora.scaling(n) == 1.0 for n in modules):
        return lora
    tensors = dict(lora.tensors)
    for name, (_, B) in modules.items():
        tensors[f"{PREFIX}.{name}.lora_B.weight"] = B * lora.scaling(name)  # (out, r[, 1, 1])
    ranks = {name: int(A.shape[0]) for name, (A, _) in modules.items()}
    return LoraFile(tensors, unit_scale_config(lora.config, ranks), dict(lora.meta))


def file_tensor(t: torch.Tensor) -> torch.Tensor:
    """A LoRA tensor as a file holds it: its own fp32 copy on the CPU (a meta tensor stays meta)."""
    device = t.device if t.is_meta else torch.device("cpu")
    return t.detach().to(device=device, dtype=torch.float32, copy=True).contiguous()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save(path: Path, lora: LoraFile) -> None:
    """Write a LoRA file atomically (never a half-written file under the final name), its scale folded
    into B (fold_scale: alpha = r in the header, so a loader that ignores the header gets it right too)."""
    lora = fold_scale(lora)
    prefix = file_prefix(lora)
    meta = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in lora.config.items()})}
    meta.update({f"difflora.{k}": str(v) for k, v in {**lora.meta, "kit_version": __version__}.items()})
    tensors = {prefix + k[len(PREFIX):]: v.contiguous() for k, v in lora.tensors.items()}  # "unet." -> the file's prefix
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


KOHYA_SUFFIX = ".kohya.safetensors"


def kohya_path(path: Path) -> Path:
    """lora2.safetensors -> lora2.kohya.safetensors: the kohya copy written beside a LoRA (save_files)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + KOHYA_SUFFIX)


def needs_kohya_copy(lora: LoraFile) -> bool:
    """True for a LoRA of a family whose peft-keyed file ComfyUI and AUTOMATIC1111 read only in part
    (SD 1.x, SDXL: their attention layers are 'lora key not loaded'; registry.Family.kohya_beside)."""
    family = lora.meta.get("family")
    return any(row.key == family and row.kohya_beside for row in registry.FAMILIES)


def save_files(path: Path, lora: LoraFile) -> list[Path]:
    """A LoRA as a user gets it from `pair`, `pairs`, `train` and `average`: PATH (peft keys: diffusers,
    peft, the kit) and, for SD 1.x / SDXL, PATH.kohya.safetensors beside it (ComfyUI, AUTOMATIC1111).
    Each written atomically, the peft file first. Returns the paths written."""
    save(path, lora)
    if not needs_kohya_copy(lora):
        return [Path(path)]
    save_kohya(kohya_path(path), lora)
    return [Path(path), kohya_path(path)]


def save_kohya(path: Path, lora: LoraFile) -> None:
    """Write `lora` in kohya keys (kohya.to_kohya: for ComfyUI and AUTOMATIC1111; a FLUX LoRA in BFL's
    names, as sd-scripts and ComfyUI write it), atomically."""
    modules = lora.modules()
    if file_prefix(lora) != PREFIX and not kohya.is_flux(modules):  # a transformer kohya has no names for here
        raise NotImplementedError(f"kohya keys are for UNet LoRAs (toy, SD 1.x, SDXL) and FLUX transformers: this "
                                  f"LoRA's denoiser is another {file_prefix(lora)!r}; "
                                  "kohya export is not for its family yet")
    family = next((row for row in registry.FAMILIES if row.key == lora.meta.get("family")), None)
    tensors, header = kohya.to_kohya(modules, {n: lora.scaling(n) for n in modules}, lora.meta,
                                     family.kohya_version if family else None)
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file (never a pickle); ValueError when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def save_diffsynth(path: Path, lora: LoraFile) -> None:
    """Write `lora` as DiffSynth-Studio's own LoRA file (diffsynth.to_diffsynth: its module names, FLUX's
    q/k/v fused, the scale folded into B: DiffSynth reads no alpha), atomically."""
    modules = lora.modules()
    family = diffsynth.family_for(modules, lora.meta.get("family"))
    tensors = diffsynth.to_diffsynth(modules, {n: lora.scaling(n) for n in modules}, family)
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=diffsynth.header(lora.meta))


def load(path: Path, module_names=None) -> LoraFile:
    """Read a LoRA file (safetensors only: never a pickle) in any format lora_formats knows: the kit's
    and diffusers' keys, peft's and ComfyUI's prefixes, kohya's (`lora_unet_*`) and DiffSynth-Studio's
    (converted: that needs `module_names()`, a callable giving the base denoiser's module names, see
    backends.module_names)."""
    path = check_lora_path(path)
    tensors, header = read_file(path)
    check_finite(path, tensors)
    try:
        return from_tensors(tensors, header, module_names)
    except LoraMismatchError as e:
        raise LoraMismatchError(f"{path}: {e}") from None


def _needs_names(fmt, module_names):
    if module_names is None:
        raise LoraMismatchError(f"a {fmt.label} LoRA: its module names are resolved against the base "
                                "model; load it with module_names (the CLI does this with --base)")
    return module_names()


def from_tensors(tensors: dict[str, torch.Tensor], header: dict[str, str], module_names=None) -> LoraFile:
    """A LoraFile of a file's tensors and header, whatever its format (lora.load without the file)."""
    fmt = lora_formats.detect(tensors, header)
    if fmt.key == "kohya":
        try:
            return LoraFile(*kohya.from_kohya(tensors, _needs_names(fmt, module_names), header))
        except ValueError as e:  # kohya modules that are not this base's, or no UNet / FLUX keys at all
            raise LoraMismatchError(str(e)) from e
    if fmt.key == "diffsynth":  # meta "denoiser" "transformer" for FLUX / Z-Image: written back with that prefix
        try:
            return LoraFile(*diffsynth.from_diffsynth(tensors, _needs_names(fmt, module_names), header))
        except ValueError as e:
            raise LoraMismatchError(str(e)) from e
    if fmt.key in ("kohya-ldm", "diffusers-old"):
        raise LoraMismatchError(f"{fmt.label}: the kit does not read them. Load the file in ComfyUI or AUTOMATIC1111 "
                                "(kohya LDM names), or with diffusers' pipe.load_lora_weights and save it again "
                                "with save_lora_weights (old attention keys): both are then read here")
    if fmt.key == "unknown":
        raise LoraMismatchError("holds no LoRA tensors the kit knows (no '*.lora_A.weight', kohya or "
                                "DiffSynth-Studio keys)")
    meta = {k[len("difflora.") :]: v for k, v in header.items() if k.startswith("difflora.")}
    if fmt.key in ("comfyui", "peft") or not fmt.prefix:  # prefixed or bare peft keys: "unet." in memory
        tensors = lora_formats.strip(tensors, fmt)
        meta["imported_from"] = fmt.key
    other = _other_prefix(tensors)
    if other is not None:  # a transformer's LoRA (FLUX): "unet." in memory
        tensors = {PREFIX + k[len(other):]: v for k, v in tensors.items() if k.startswith(f"{other}.")}
        header = {**header, DIFFUSERS_METADATA_KEY: json.dumps({PREFIX + k[len(other):]: v for k, v in
                  json.loads(header.get(DIFFUSERS_METADATA_KEY, "{}")).items()})} if DIFFUSERS_METADATA_KEY in header else header
        meta["denoiser"] = other
    if DIFFUSERS_METADATA_KEY in header:
        raw = json.loads(header[DIFFUSERS_METADATA_KEY])
        config = {k[len(PREFIX) + 1 :]: v for k, v in raw.items() if k.startswith(f"{PREFIX}.")}
    else:  # no config: rank from the shapes, alpha = rank (diffusers' convention)
        ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")]
        config = {"r": ranks[0], "lora_alpha": ranks[0]}
    return LoraFile(tensors, config, meta)


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A clear error naming the file and its first keys when any tensor holds NaN or infinity (a LoRA
    saved from a run that diverged: applied, it would turn every output into NaN)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLoraError(f"{path} holds NaN or infinite values in {len(bad)} of its {len(tensors)} tensors "
                                 f"(e.g. {', '.join(sorted(bad)[:3])}): it came from a training run that diverged. "
                                 "Retrain it (lower --lr or --alpha), or use another file")


def _same_setting(saved, wanted) -> bool:
    """Metadata values are strings in the file: equal as strings, or as numbers ("8" and 8.0)."""
    if str(saved) == str(wanted):
        return True
    try:
        return float(str(saved)) == float(str(wanted))
    except ValueError:
        return False


def load_matching(path: Path, wanted: dict, module_names=None) -> tuple[LoraFile | None, str]:
    """(the LoRA at `path`, "") when the file exists and its metadata has every setting in `wanted`;
    else (None, why): the file is missing or unreadable, or which settings differ (saved vs wanted).

    Values are compared as the file stores them, as strings (numbers also by value: "8" == 8.0);
    a key the file lacks counts as differing. For reusing a LoRA another run saved, e.g.
    `lora1, why = lora.load_matching(path, {"stage": "1", "rank": 8, "steps": 100})`."""
    path = Path(path)
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        saved = load(path, module_names)
    except ValueError as e:  # not safetensors, unreadable, not a LoRA (LoraMismatchError is a ValueError)
        return None, f"unreadable LoRA file: {e}"  # e names the path
    differs = [f"{k}={saved.meta.get(k, '(missing)')!s} (wanted {v})" for k, v in wanted.items()
               if k not in saved.meta or not _same_setting(saved.meta[k], v)]
    if differs:
        return None, f"{path} was trained with other settings: " + ", ".join(differs)
    return saved, ""


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A, for linear (A: (r, in), B: (out, r)) or conv (A: (r, in, kh, kw), B: (out, r, 1, 1))."""
    delta = B.flatten(1).float() @ A.flatten(1).float()  # (out, r) @ (r, in*kh*kw) -> (out, in*kh*kw)
    return scale * delta.view(B.shape[0], *A.shape[1:])


def lora_shapes(lora: LoraFile) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of a LoRA: the weight shape each of its modules changes."""
    return {name: (int(B.shape[0]), int(A.shape[1])) for name, (A, B) in lora.modules().items()}


def weight_shapes(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """{module: weight shape} of every module of the denoiser with a weight (a meta-device one will do)."""
    shapes = {}
    for name, module in unet.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor):
            shapes[name] = tuple(weight.shape)
    return shapes


def check_shapes(lora: LoraFile, shapes: dict[str, tuple[int, ...]]) -> lora_match.Match:
    """The match of a LoRA against a denoiser's {module: weight shape} (weight_shapes, or
    backends.weight_shapes from the config alone); a LoraMismatchError when any module does not fit (none or
    only some: a LoRA applied in part has part of its effect, silently), saying how many, which and why."""
    found = lora_match.match(lora_shapes(lora), shapes)
    if found.left_out:
        made_for = f" (its metadata says base={lora.meta['base']!r})" if lora.meta.get("base") else ""
        raise LoraMismatchError(
            f"the LoRA was made for another base: {found.summary()} in this denoiser, e.g. {found.examples()}. "
            f"{found.why[0].upper() + found.why[1:]}. "
            f"Nothing was applied (in part it would do part of its job, silently). Use the base it was made for"
            f"{made_for}; `difflora inspect LORA --base BASE` lists every module")
    return found


def check_fits(unet: nn.Module, lora: LoraFile) -> dict[str, nn.Module]:
    """{name: module} for every LoRA module; check_shapes' LoraMismatchError when any does not fit."""
    found = check_shapes(lora, weight_shapes(unet))
    modules = dict(unet.named_modules())
    return {n: modules[n] for n in found.matched}


@torch.no_grad()
def fuse_into(unet: nn.Module, lora: LoraFile, strength: float = 1.0) -> None:
    """W += strength * (alpha/r) * B @ A in the full-precision weights, in place (before quantizing)."""
    for name, module in check_fits(unet, lora).items():
        A, B = lora.modules()[name]
        if not torch.is_floating_point(module.weight) or module.weight.dtype == torch.int8:
            raise TypeError(f"{name} is quantized: fuse the preset LoRA before quantize_linears()")
        add_delta_(module, A, B, strength * lora.scaling(name))


@torch.no_grad()
def add_delta_(module: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """module.weight += scale * B @ A in the weight's own dtype, in place. A, B (from a file, on the
    CPU) are moved to the weight's device."""
    w = module.weight  # (out, in[, kh, kw])
    w += delta_weight(A.to(w.device), B.to(w.device), scale).to(w.dtype)


def module_deltas(lora: LoraFile, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """{module name: strength * (alpha/r) * B @ A}: the exact weight change the LoRA makes."""
    return {n: delta_weight(A, B, strength * lora.scaling(n)) for n, (A, B) in lora.modules().items()}
