"""The 8-bit base: every nn.Linear of the denoiser becomes a bitsandbytes Linear8bitLt.

bitsandbytes' row-wise int8 ("LLM.int8()" without outliers, threshold 0):
    W [out, in] ~= CB [out, in] (int8) * SCB [out] (fp32 row absmax)[:, None] / 127
4x smaller than fp32. Convolutions stay in full precision (bitsandbytes has no int8 conv).
Merging a LoRA into the base happens *before* this (lora.fuse_into), in full precision.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an eval-mode cast warning on every call


def _bnb():
    import bitsandbytes as bnb

    return bnb


def quantize_linears(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `module` by an int8 Linear8bitLt, in place; returns `module`."""
    bnb = _bnb()
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            if type(layer) is nn.Linear:
                q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        has_fp16_weights=False, threshold=0.0)
                q.weight = bnb.nn.Int8Params(layer.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                if layer.bias is not None:
                    q.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
                setattr(child, attr, q.to(layer.weight.device))  # .to() quantizes: CB, SCB
    module.is_loaded_in_8bit = True  # peft then wraps these layers with its 8-bit LoRA layer
    return module


def int8_state(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB fp32 [out]) of a Linear8bitLt, wherever bitsandbytes keeps them."""
    CB = layer.weight.CB if layer.weight.CB is not None else layer.state.CB
    SCB = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return CB, SCB


def dequantized_weight(layer) -> torch.Tensor:
    """W ~= CB * SCB / 127: (out, in) fp32."""
    CB, SCB = int8_state(layer)
    return CB.float() * SCB.float()[:, None] / 127.0


def weight_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of the module's weights by storage kind: int8 linears (CB + SCB) and the rest."""
    bnb = _bnb()
    int8, other, seen = 0, 0, set()
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            CB, SCB = int8_state(m)
            int8 += CB.numel() * CB.element_size() + SCB.numel() * SCB.element_size()
            seen.add(id(m.weight))
    for p in module.parameters():
        if id(p) not in seen:
            other += p.numel() * p.element_size()
    return {"int8_linear": int8, "other": other, "total": int8 + other}
