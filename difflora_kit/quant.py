"""The 8-bit base: every nn.Linear of the denoiser becomes a bitsandbytes Linear8bitLt.

bitsandbytes' row-wise int8 ("LLM.int8()" without outliers, threshold 0):
    W [out, in] ~= CB [out, in] (int8) * SCB [out] (fp32 row absmax)[:, None] / 127
4x smaller than fp32. Convolutions stay in full precision (bitsandbytes has no int8 conv).
A preset LoRA enters this base in one of three ways (difflora_kit.preset): fused into the
full-precision weights while quantizing (kernel merge_quantize), re-merged into the int8 weights
(kernel remerge_int8), or kept beside them as a frozen adapter.

The base is *weight-only* on every device (W8A16, or W8A32 in fp32): each call dequantizes the
int8 weight to the input's dtype and multiplies in that dtype; the activations are never quantized.
bitsandbytes' own Linear8bitLt does that on a CPU in train mode, but on CUDA it quantizes every
input row to int8 as well (W8A8, int32 accumulate, fp16 out), which the kit does not: every claim of
the kit was measured with weight-only arithmetic, and a diffusion model's activations carry outlier
channels that row-wise int8 activations crush (bench/w8a8_cost.py measures what W8A8 would cost:
bench/results/w8a8_cost.md). Peers keep the base weight-only too: DiffSynth-Studio (fp8 weights,
bf16 compute), ai-toolkit (qfloat8 weights), kohya's sd-scripts (--fp8_base).
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an eval-mode cast warning on every call


def dequantize(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = CB * SCB[:, None] / 127 in `dtype`: CB int8 (out, in), SCB fp32 (out,) -> (out, in).

    bitsandbytes' own op order (its weight-only matmul MatMul8bitFp, and MatMul8bitLt's input
    gradient): the int8 codes cast to `dtype`, times the fp32 row scale / 127, rounded to `dtype`."""
    return CB.to(dtype, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))  # (out, in)


class FrozenInt8Matmul(torch.autograd.Function):
    """y = x @ W.T + b for a frozen row-wise int8 weight W = dequantize(CB, SCB, x.dtype), keeping
    nothing of x for the backward pass: with W frozen, dL/dx = dL/dy @ W needs only W.

        x (..., in) -> y (..., out); CB int8 (out, in); SCB fp32 (out,); bias (out,) or None, frozen

    Weight-only on every device, forward and backward alike: the int8 weight is dequantized to x's
    dtype at each call (a temporary of out*in elements, freed after the matmul: no full-precision copy
    lives between calls) and multiplied in that dtype; x itself is never quantized (module docstring:
    why not bitsandbytes' int8 activations on CUDA). On a CPU this is bitsandbytes' own train-mode
    path op for op, so outputs and gradients equal Linear8bitLt's bit for bit there.

    bitsandbytes' own matmul keeps x as a plain attribute of its autograd context whenever x needs a
    gradient (for a weight gradient that a frozen base never needs); outside autograd's saved tensors,
    so gradient checkpointing cannot drop it either. Under a LoRA that is one more copy of every
    linear's input for the whole forward pass (difflora_kit.plan counts the difference)."""

    @staticmethod
    def forward(ctx, x, CB, SCB, bias):
        ctx.save_for_backward(CB, SCB)  # the weight: nothing of x
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return torch.nn.functional.linear(x, dequantize(CB, SCB, x.dtype), bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        CB, SCB = ctx.saved_tensors
        W = dequantize(CB, SCB, ctx.x_dtype)  # (out, in)
        grad_x = torch.matmul(grad_y.to(ctx.x_dtype), W).reshape(ctx.x_shape)  # (..., out) @ (out, in) -> (..., in)
        return grad_x, None, None, None


class Int8Linear(bnb.nn.Linear8bitLt):
    """bitsandbytes' Linear8bitLt (int8 weights, threshold 0) for a frozen base, weight-only:
    - it computes the same on every device, in train and eval mode: the int8 weight dequantized to the
      input's dtype, then a float matmul (FrozenInt8Matmul). bitsandbytes' own layer does that only on
      a CPU in train mode; in eval mode, and on CUDA always, it quantizes the activations to int8 too,
      so a model sampled after `.eval()`, or trained on a GPU, differed from the one measured here;
    - it keeps nothing of its input for the backward pass (FrozenInt8Matmul).
    peft sees a Linear8bitLt and wraps it as usual; the weight and bias never get gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.CB is not None:
            self.init_8bit_state()  # bitsandbytes moves CB/SCB from the weight to self.state
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return FrozenInt8Matmul.apply(x, self.state.CB, self.state.SCB, bias)


def quantize_weight(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' row-wise int8 quantization of a weight (out, in), from its fp16 cast, where it is:
    CB int8 (out, in), SCB fp32 (out,)."""
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.detach().half())
    return CB, SCB


def quantize_linears(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `module` by an Int8Linear on the same device, in place.

    bitsandbytes' quantizer (its fp16 cast of the weight, then row absmax) runs where the weight
    is, CPU or CUDA; no full-precision copy is kept. Returns `module`."""
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            if type(layer) is nn.Linear:
                with torch.no_grad():
                    CB, SCB = quantize_weight(layer.weight)  # (out, in), (out,)
                setattr(child, attr, int8_linear(CB, SCB, layer.bias))
    module.is_loaded_in_8bit = True  # peft then wraps these layers with its 8-bit LoRA layer
    return module


def int8_linear_class() -> type:
    return bnb.nn.Linear8bitLt


def int8_linear(CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """An Int8Linear holding the given row-wise int8 weight: CB int8 (out, in), SCB fp32 (out,).

    Built on the meta device, so no full-precision weight is ever allocated for it."""
    out_features, in_features = CB.shape
    q = Int8Linear(in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=0.0,
                   device="meta")
    q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB.float())
    q.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    return q


def set_int8_state(layer, CB: torch.Tensor, SCB: torch.Tensor) -> None:
    """Give a Linear8bitLt new int8 weights in place (wherever bitsandbytes currently keeps them)."""
    layer.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB.float())
    layer.state.CB, layer.state.SCB = None, None


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


def int8_linear_storage(module: nn.Module) -> dict[str, int]:
    """What the int8 linears really hold in memory: bytes of every distinct tensor storage reachable
    from them (parameters, buffers, CB/SCB wherever bitsandbytes put them, any other tensor
    attribute), against the ideal `out*in` int8 bytes + 4 bytes of scale a row (+ the bias).
    `held > ideal` means a higher-precision copy is kept somewhere."""
    seen, held, ideal = set(), 0, 0

    def count(t):
        nonlocal held
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held += storage.nbytes()

    for m in module.modules():
        if not isinstance(m, bnb.nn.Linear8bitLt):
            continue
        out_features, in_features = m.out_features, m.in_features
        ideal += out_features * in_features + 4 * out_features
        ideal += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False), *vars(m).values(),
                  *vars(m.weight).values(), *vars(m.state).values()]:
            count(t)
    return {"held": held, "ideal": ideal}
