"""Step 2's preset: how LoRA 1 enters the base before LoRA 2 trains. Three ways (`preset_mode`).

With W the full-precision weight, Q(.) bitsandbytes' row-wise int8 rounding and
D = s * (alpha/r) * B1 @ A1 the preset's update, the base that LoRA 2 trains on is

    mode      linear weights during step 2       how                                   kernel
    fuse      Q(W + D)      fp weights + D, quantized in one pass (loads the fp base)  merge_quantize
    requant   Q(Q(W) + D)   int8 weights re-merged (the base was loaded as int8)       remerge_int8
    adapter   Q(W) + D      LoRA 1 kept as a frozen peft adapter beside LoRA 2         none (exact)

Step 1 trained LoRA 1 against Q(W), so `adapter` reproduces step 1's model exactly; the two merge
modes add one rounding of at most half an int8 step per weight. Convolutions are never int8:
there the preset is fused in full precision in every mode but `adapter`.
Measured on the toy model (bench/preset_modes.py, kernels/README.md); the default follows them.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, lora, quant
from .config import PRESET_MODES, check_mode  # noqa: F401 (preset.PRESET_MODES: as the notebooks read it)
from .lora import PRESET_ADAPTER, load_frozen_adapter


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` ("a.b.c") of `root` by `module`."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def apply_preset(unet: nn.Module, preset: lora.LoraFile, strength: float = 1.0, mode: str = "fuse",
                 eight_bit: bool = True, backend: str = "auto") -> nn.Module:
    """Put `strength` x the preset LoRA into a freshly loaded full-precision denoiser and quantize its
    linears (if `eight_bit`), the way `mode` says; in place, returns `unet`.

    `backend` picks the merge kernels' implementation ("auto": Triton on CUDA sm80+, else PyTorch)."""
    check_mode(mode, eight_bit)
    lora.check_fits(unet, preset)
    if mode == "adapter":
        if eight_bit:
            quant.quantize_linears(unet)
        load_frozen_adapter(unet, preset, strength)
        return unet
    if not eight_bit:  # fuse in full precision; nothing is rounded
        lora.fuse_into(unet, preset, strength)
        return unet
    if mode == "requant":
        quant.quantize_linears(unet)  # the base as loaded in int8: Q(W)
    for name, (A, B) in preset.modules().items():
        module, scale = unet.get_submodule(name), strength * preset.scaling(name)  # after any quantizing
        device = module.weight.device  # the file's A, B are on the CPU; the denoiser may be on a GPU
        A, B = A.to(device), B.to(device)
        if type(module) is nn.Linear:  # fuse: fp W + D -> int8 in one pass
            CB, SCB = kernels.merge_quantize(module.weight.detach(), A, B, scale, backend=backend)
            set_submodule(unet, name, quant.int8_linear(CB, SCB, module.bias))
        elif mode == "requant" and isinstance(module, quant.int8_linear_class()):
            CB, SCB = kernels.remerge_int8(*quant.int8_state(module), A, B, scale, backend=backend)
            quant.set_int8_state(module, CB, SCB)
        else:  # convolutions (and any other float module) stay full precision
            lora.add_delta_(module, A, B, scale)
    quant.quantize_linears(unet)  # the linears the preset does not touch
    return unet


def effective_deltas(unet: nn.Module, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{linear name: W_eff - W_base} for the preset's int8 linears, W_eff as the forward sees it
    (dequantized int8, plus the frozen adapter's exact update in `adapter` mode). fp32 (out, in)."""
    out = {}
    for name, W in base_weights.items():
        module = unet.get_submodule(name)
        layer = getattr(module, "base_layer", module)  # peft wraps adapted layers
        W_eff = quant.dequantized_weight(layer)
        if hasattr(module, "lora_A") and PRESET_ADAPTER in module.lora_A:
            A, B = module.lora_A[PRESET_ADAPTER].weight, module.lora_B[PRESET_ADAPTER].weight
            W_eff = W_eff + lora.delta_weight(A.detach(), B.detach(), module.scaling[PRESET_ADAPTER])
        out[name] = W_eff - W.float()
    return out
