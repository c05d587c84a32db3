"""Streaming the base onto the device in 8-bit, the preset LoRA fused on the way.

    full load (from_pretrained, then preset.apply_preset)    streaming (this module)
    the whole denoiser in `dtype` on the device               the denoiser built on the meta device (no weights);
    then each linear fused + quantized                         then one layer at a time, read from the memory-mapped
                                                               safetensors shards:  W (dtype, device) [+ s B1 A1] -> CB, SCB
    loading peak: the full denoiser in `dtype`                loading peak: the 8-bit denoiser + the largest layer in flight

    model = streaming.load_denoiser(base, "cuda", torch.bfloat16, preset=lora1, mode="fuse")
    backend = backends.load_backend(base, "cuda", denoiser=model)

Every layer goes one way, named by `load_steps` (the memory plan, `loading_peak`, walks the same list,
so what it predicts is what runs). The ops are those of preset.apply_preset and quant.quantize_linears,
so the result is the same, bit for bit:

    kind          which modules                                 ops
    int8          an nn.Linear the preset does not touch         bnb int8_vectorwise_quant(W.half())
    int8+fuse     an nn.Linear of the preset, mode fuse          kernels.merge_quantize(W, A, B, s)
    int8+requant  an nn.Linear of the preset, mode requant       int8_vectorwise_quant(W.half()), then kernels.remerge_int8
    fp            everything else                                its tensors in `dtype`
    fp+fuse       another module of the preset (convolutions),   W += s B @ A in full precision (lora.delta_weight)
                  or any of them with eight_bit=False
    adapter mode: int8 and fp only, then the frozen peft adapter (lora.load_frozen_adapter).

Bytes a layer keeps are counted as plan.weight_bytes counts them (int8 linear: out*in + 4 a row + the
bias in dtype; anything else: its own tensors in dtype). Bytes in flight while a layer loads are read off
the code it runs (kernels/lora_merge.py, bitsandbytes' quantizer), per kind and device: `_in_flight`.
The streamed model owns its memory (nothing is left pointing into the files' memory maps), so on a
CPU too what it holds is anonymous memory, as on a GPU it is device memory.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import backends, lora
from .backends import Base
from .config import check_mode
from .devices import compute_dtype

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"  # a sharded checkpoint: {"weight_map": {key: file}}
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
KINDS = ("int8", "int8+fuse", "int8+requant", "fp", "fp+fuse")


# ----------------------------------------------------------------------------- the walk
@dataclasses.dataclass
class LoadStep:
    """One module holding tensors of its own, and the way it loads."""

    name: str
    """Its name in the denoiser ("" for the root)."""
    module: nn.Module
    kind: str
    """One of KINDS (the module docstring's table)."""
    rank: int = 0
    """The preset's rank on this module (0: the preset does not touch it here)."""

    def tensors(self) -> list[tuple[str, bool]]:
        """(attribute, is a parameter) of the module's own parameters and buffers."""
        m = self.module
        return [(k, True) for k, v in m._parameters.items() if v is not None] + \
               [(k, False) for k, v in m._buffers.items() if v is not None]

    def key(self, attr: str) -> str:
        return f"{self.name}.{attr}" if self.name else attr

    def in_checkpoint(self, attr: str, is_param: bool) -> bool:
        return is_param or attr not in self.module._non_persistent_buffers_set


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def load_steps(model: nn.Module, preset_ranks: Mapping[str, int] | None = None, mode: str = "fuse",
               eight_bit: bool = True) -> list[LoadStep]:
    """The loading of `model`, one step per module with tensors of its own, in module order.
    `preset_ranks`: {module name: rank} of the preset LoRA (None: no preset)."""
    ranks = {} if preset_ranks is None or mode == "adapter" else dict(preset_ranks)  # adapter: nothing fused
    steps = []
    for name, module in model.named_modules():
        if not _own_tensors(module):
            continue
        rank = ranks.get(name, 0)
        if eight_bit and type(module) is nn.Linear:  # the test of quant.quantize_linears and preset.apply_preset
            kind = "int8" if not rank else f"int8+{mode}"
        else:
            kind = "fp+fuse" if rank else "fp"
        steps.append(LoadStep(name, module, kind, rank))
    return steps


def preset_ranks(preset: lora.LoraFile | Mapping[str, int] | None) -> dict[str, int] | None:
    """{module name: rank} of a LoRA file (a mapping is returned as it is)."""
    if preset is None or isinstance(preset, Mapping):
        return None if preset is None else dict(preset)
    return {name: A.shape[0] for name, (A, B) in preset.modules().items()}


def target_ranks(model: nn.Module, targets, rank: int) -> dict[str, int]:
    """{module name: rank} of the LoRA that peft would put on `targets` (for the plan: no file yet)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = lora.peft_config(rank, rank, targets)
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)  # the layers peft's LoRA adapts
    return {name: rank for name, m in model.named_modules()
            if name and isinstance(m, kinds) and check_target_module_exists(config, name)}


# ----------------------------------------------------------------------------- the plan of it
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype, device="meta").element_size()


def kept_bytes(step: LoadStep, dtype: torch.dtype) -> int:
    """What the layer holds once loaded, as plan.weight_bytes counts it."""
    size, m = _itemsize(dtype), step.module
    if step.kind.startswith("int8"):
        return m.weight.numel() + 4 * m.out_features + (m.bias.numel() * size if m.bias is not None else 0)
    return sum(t.numel() for t in _own_tensors(m)) * size


def _merge_kind(device: torch.device, dtype: torch.dtype, backend: str) -> str:
    """Which implementation of the merge kernels runs: "triton" or "torch" (the kernels' "auto" rule on
    this card; planned without the card: Triton for bf16 and fp16, the kit's dtypes on sm80+ and on a T4)."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    if torch.cuda.is_available():
        from . import kernels

        return "triton" if kernels.use_triton(torch.empty(0, dtype=dtype, device=device)) else "torch"
    return "triton" if dtype in (torch.bfloat16, torch.float16) else "torch"


def _in_flight(step: LoadStep, dtype: torch.dtype, device: torch.device, merge: str) -> int:
    """Device bytes of this layer at the worst moment of its loading (what it keeps included).

    n = out*in weight elements, s = dtype's bytes. What is read from a file is a view of its memory map
    (file pages, or host memory before a copy to a GPU): only the copy in `dtype` is device memory.
      int8          W (s n) + W.half() (2n unless s = 2) + bitsandbytes' quantizer: on CPU |W| (2n), then
                    W*127/absmax and its round (fp32: 4n + 4n); on CUDA one kernel writing CB (n)
      int8+fuse     W + merge_quantize: torch: an fp32 copy (4n) quantized in place to CB (n);
                    triton: only rank-padded fp32 A, B (4 r16 (in + out), r16 = lora_merge.rank_pad(r)) and CB
      int8+requant  the int8 phase, then (W freed) CB + remerge_int8 (as merge_quantize) + CB'
      fp+fuse       the weight + lora.delta_weight's two fp32 temporaries (B @ A, then times s: 8n)
    The preset's A and B move to the device (4 r (in + out)) on a GPU."""
    s, m, r = _itemsize(dtype), step.module, step.rank
    cpu = device.type == "cpu"
    kept = kept_bytes(step, dtype)
    if step.kind == "fp":
        return kept
    if step.kind == "fp+fuse":
        n, out = m.weight.numel(), m.weight.shape[0]
        return kept + 8 * n + (0 if cpu else 4 * r * (n // out + out))
    n, out, in_ = m.weight.numel(), m.out_features, m.in_features
    bias = 0 if m.bias is None else m.bias.numel() * s
    cb = n + 4 * out
    lora_ab = 0 if cpu or not r else 4 * r * (in_ + out)
    from .kernels.lora_merge import rank_pad  # the kernels' padded rank (a power of two, at least 16)

    r16 = rank_pad(r)
    merge_tmp = 4 * n if merge == "torch" else 4 * r16 * (in_ + out)  # kernels/lora_merge.py: reference vs Triton
    quant = s * n + (0 if s == 2 else 2 * n) + (8 * n if cpu else cb)
    if step.kind == "int8":
        return bias + quant
    if step.kind == "int8+fuse":
        return bias + s * n + merge_tmp + cb + lora_ab
    return bias + max(quant, cb + merge_tmp + cb + lora_ab)  # int8+requant


@dataclasses.dataclass
class LoadingPeak:
    resident: int
    """The loaded denoiser (as plan.weight_bytes counts it), the frozen adapter included."""
    peak: int
    """The highest point of the walk: what loaded before the worst layer, plus that layer in flight."""
    layer: str
    """The module at that point."""
    in_flight: int
    """That layer's bytes at its worst moment (its kept bytes included)."""


def loading_peak(model: nn.Module, dtype: torch.dtype, eight_bit: bool = True,
                 preset: lora.LoraFile | Mapping[str, int] | None = None, mode: str = "fuse",
                 device: str | torch.device = "cuda", backend: str = "auto") -> LoadingPeak:
    """Predicted device memory of `load_denoiser` with these settings, from the model's shapes (a meta
    model will do; not one already loaded). `preset`: the LoRA file, or {module name: rank}
    (`target_ranks`). Allocator slack is not in it."""
    device = torch.device(device)
    merge = _merge_kind(device, dtype, backend)
    ranks = preset_ranks(preset)
    resident, best = 0, LoadingPeak(0, 0, "", 0)
    for step in load_steps(model, ranks, mode, eight_bit):
        flight = _in_flight(step, dtype, device, merge)
        if resident + flight > best.peak:
            best = LoadingPeak(0, resident + flight, step.name, flight)
        resident += kept_bytes(step, dtype)
    if mode == "adapter" and ranks:  # fp32 A (r, in[, kh, kw]) and B (out, r) beside the frozen layers
        for name, r in ranks.items():
            w = model.get_submodule(name).weight
            resident += 4 * r * (w.numel() // w.shape[0] + w.shape[0])
        best.peak = max(best.peak, resident)
    best.resident = resident
    return best


# ----------------------------------------------------------------------------- reading the checkpoint
class Shards:
    """The denoiser's safetensors file(s), each memory-mapped on first use and closed once read through.

    A sharded checkpoint has INDEX_FILE ({"weight_map": {key: file}}); an unsharded one SINGLE_FILE."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        from safetensors import safe_open

        self._safe_open = safe_open
        if (folder / INDEX_FILE).is_file():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            self.files = {key: folder / file for key, file in weight_map.items()}
        elif (folder / SINGLE_FILE).is_file():
            with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                self.files = {key: folder / SINGLE_FILE for key in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} is there; the denoiser is read "
                                    "from safetensors only (pickled .bin files are never loaded)")
        self._left = {}
        for path in self.files.values():
            self._left[path] = self._left.get(path, 0) + 1
        self._open = {}

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self._open:
            self._open[path] = self._safe_open(str(path), framework="pt", device="cpu")
        return path, self._open[path]

    def read(self, key: str) -> torch.Tensor:
        """The tensor: CPU, the file's dtype, a view of the file's memory map (copy it before writing or
        keeping it). A file's map is dropped after its last key (unmapped once no view is left)."""
        path, f = self._handle(key)
        tensor = f.get_tensor(key)
        self._left[path] -= 1
        if self._left[path] == 0:
            del self._open[path]
        return tensor

    def close(self) -> None:
        self._open.clear()


def empty_denoiser(cls, folder: Path, dtype: torch.dtype) -> nn.Module:
    """The denoiser of `folder`'s config: parameters on the meta device (made in `dtype`), buffers real
    (computed under default dtype `dtype`, as from_pretrained makes them; non-persistent ones are
    not in the checkpoint)."""
    import accelerate

    config = cls.load_config(folder)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with accelerate.init_empty_weights(include_buffers=False):
            return cls.from_config(config)
    finally:
        torch.set_default_dtype(default)


def _check_keys(steps: list[LoadStep], shards: Shards, folder: Path) -> None:
    wanted = {s.key(a) for s in steps for a, p in s.tensors() if s.in_checkpoint(a, p)}
    missing = sorted(wanted - set(shards.files))
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} of the denoiser's tensors, e.g. "
                         f"{', '.join(missing[:5])}: it is not a checkpoint of this config")
    unexpected = sorted(set(shards.files) - wanted)
    if unexpected:  # diffusers' from_pretrained warns and loads
        warnings.warn(f"{folder}: {len(unexpected)} tensors of the checkpoint are not in the denoiser and are "
                      f"skipped, e.g. {', '.join(unexpected[:5])}")


def _dtype(base: Base, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype`, or the family's: fp32 for the toy, else devices.compute_dtype(device)."""
    return dtype or (torch.float32 if base.family.full_precision else compute_dtype(device))


def meta_denoiser(base: str | Path | Base, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> nn.Module:
    """The base's denoiser with no weights (empty_denoiser): what a backend is built around while its
    encoders encode first (pair.prepare_base), replaced by load_denoiser's (attach_denoiser)."""
    import diffusers

    base = backends.resolve_base(base)
    cls = getattr(diffusers, base.family.denoiser_class)
    return empty_denoiser(cls, base.folder / base.family.denoiser_folder, _dtype(base, torch.device(device), dtype))


# ----------------------------------------------------------------------------- the loader
def load_denoiser(base: str | Path | Base, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  preset: lora.LoraFile | None = None, strength: float = 1.0, mode: str = "fuse",
                  eight_bit: bool = True, backend: str = "auto") -> nn.Module:
    """The base's denoiser on `device`, streamed layer by layer from its safetensors: the same model as
    from_pretrained in `dtype` followed by preset.apply_preset(preset, strength, mode, eight_bit, backend)
    (or quant.quantize_linears without a preset, when `eight_bit`), without ever holding the whole
    denoiser in `dtype`. `dtype` None: the family's (fp32 for the toy, else devices.compute_dtype)."""
    import diffusers

    from . import kernels, quant
    from .preset import set_submodule

    check_mode(mode, eight_bit)
    base = backends.resolve_base(base)
    device = torch.device(device)
    row = base.family
    dtype = _dtype(base, device, dtype)
    folder = base.folder / row.denoiser_folder
    cls = getattr(diffusers, row.denoiser_class)
    model = empty_denoiser(cls, folder, dtype)
    if preset is not None:
        lora.check_fits(model, preset)  # before reading anything: shapes are on the meta model
    modules = preset.modules() if preset is not None else {}
    keep_fp32 = list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    steps = load_steps(model, preset_ranks(preset), mode, eight_bit)
    shards = Shards(folder)
    _check_keys(steps, shards, folder)

    def read(step: LoadStep, attr: str, like: torch.Tensor) -> torch.Tensor:
        key = step.key(attr)
        t = shards.read(key)
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{folder}: {key} has shape {tuple(t.shape)} in the checkpoint, {tuple(like.shape)} in the config")
        target = t.dtype  # from_pretrained's rule: floating tensors in dtype (fp32 for _keep_in_fp32_modules)
        if t.is_floating_point():
            target = torch.float32 if any(k in key.split(".") for k in keep_fp32) else dtype
        return t.to(device=device, dtype=target, copy=True)  # its own memory: the file's map can go

    try:
        with torch.no_grad():
            for step in steps:
                m = step.module
                if step.kind.startswith("int8"):
                    W = read(step, "weight", m.weight)
                    bias = None if m.bias is None else read(step, "bias", m.bias)
                    if step.kind == "int8+fuse":
                        A, B = (t.to(device) for t in modules[step.name])
                        CB, SCB = kernels.merge_quantize(W, A, B, strength * preset.scaling(step.name), backend=backend)
                    else:
                        CB, SCB = quant.quantize_weight(W)  # as quant.quantize_linears
                        if step.kind == "int8+requant":
                            W = None  # freed before the re-merge
                            A, B = (t.to(device) for t in modules[step.name])
                            CB, SCB = kernels.remerge_int8(CB, SCB, A, B, strength * preset.scaling(step.name),
                                                           backend=backend)
                    W = None
                    set_submodule(model, step.name, quant.int8_linear(CB, SCB, bias))
                    continue
                for attr, is_param in step.tensors():
                    old = m._parameters[attr] if is_param else m._buffers[attr]
                    if step.in_checkpoint(attr, is_param):
                        value = read(step, attr, old)
                    else:  # a non-persistent buffer, computed when the model was built
                        value = old.to(device)
                    if is_param:
                        m._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
                    else:
                        m._buffers[attr] = value
                if step.kind == "fp+fuse":  # as preset.apply_preset / lora.fuse_into: W += (s B @ A) in W's dtype
                    lora.add_delta_(m, *modules[step.name], strength * preset.scaling(step.name))
    finally:
        shards.close()
    model.register_to_config(_name_or_path=folder)
    model.eval()  # from_pretrained's
    if eight_bit:
        model.is_loaded_in_8bit = True  # peft then wraps the int8 layers with its 8-bit LoRA layer
    if preset is not None and mode == "adapter":
        lora.load_frozen_adapter(model, preset, strength)
    return model
