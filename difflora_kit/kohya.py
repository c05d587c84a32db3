"""kohya-ss LoRA keys, for ComfyUI and AUTOMATIC1111 (export), and LoRAs trained there (import).

    kit / diffusers:  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  (r, in)
                      unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight  (out, r)
                      scale alpha / r from the peft config in the header
    kohya:            lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (= A)
                      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (= B)
                      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha            (scalar)
                      scale alpha / r with r = lora_down's rows, per module

The module path is the diffusers UNet's, dots replaced by underscores: what kohya's sd-scripts
writes for SD 1.x, and what ComfyUI's and diffusers' kohya loaders map back for SD 1.x and SDXL.
Underscores are ambiguous on the way back ("to_q" vs "to.q"), so import maps names through the
base denoiser's own module names: exact, and a LoRA for another model fails with the names listed.

A pure key converter (dicts in, dicts out, like diffusers' loaders/lora_conversion_utils.py):
reading and writing files, and the kit's LoraFile, are lora.py's (lora.save_kohya, lora.load).
Keys that do not fit raise ValueError; lora.load turns it into its LoraMismatchError.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

KOHYA_PREFIX = "lora_unet_"
UNET_PREFIX = "unet"  # diffusers' key prefix of a UNet's LoRA (the kit's lora.PREFIX)


def is_kohya(keys: Iterable[str]) -> bool:
    return any(k.startswith(KOHYA_PREFIX) for k in keys)


def _check_unet(names: Iterable[str]) -> None:
    """kohya keys here are UNet keys: a FLUX transformer's LoRA (kohya writes those as lora_unet_double_blocks_*
    / single_blocks_* with BFL's module names) gets a clear error."""
    if any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names):
        raise NotImplementedError("kohya keys are for UNet LoRAs (toy, SD 1.x, SDXL): "
                                  "kohya export and import are not for FLUX yet")


def kohya_name(module: str) -> str:
    """'down_blocks.0.attentions.0.proj_in' -> 'lora_unet_down_blocks_0_attentions_0_proj_in'."""
    return KOHYA_PREFIX + module.replace(".", "_")


def to_kohya(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scalings: dict[str, float],
             meta: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) in kohya keys of the LoRA {module: (A, B)} with alpha / r = scalings[module]
    and the kit's metadata `meta`.

    Written in the one form every loader reads alike: each module's scale folded into lora_up, one
    rank R for all (lower ranks zero-padded: the padded components are 0, the product unchanged)
    and alpha = R everywhere, so alpha / r = 1. (diffusers' kohya loader mis-maps per-module
    alphas of attention layers; ComfyUI and A1111 read them; with all equal nobody can differ.)"""
    _check_unet(modules)
    R = max(A.shape[0] for A, _ in modules.values())
    tensors = {}
    for name, (A, B) in modules.items():
        key, r = kohya_name(name), A.shape[0]
        down = torch.zeros((R, *A.shape[1:]), dtype=A.dtype)  # (R, in[, kh, kw])
        up = torch.zeros((B.shape[0], R, *B.shape[2:]), dtype=B.dtype)  # (out, R[, 1, 1])
        down[:r], up[:, :r] = A, B * scalings[name]
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(float(R))
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(R),
              "ss_network_alpha": str(R), "ss_base_model_version": str(meta.get("base", "")),
              **{f"difflora.{k}": str(v) for k, v in meta.items()}}
    return tensors, header


def from_kohya(tensors: dict[str, torch.Tensor], module_names: Iterable[str],
               header: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(diffusers-keyed tensors "unet.<module>.lora_A.weight", peft config dict, the kit's metadata)
    of kohya-keyed tensors; `module_names` are the base denoiser's modules."""
    module_names = list(module_names)
    _check_unet(module_names)
    by_kohya = {kohya_name(n): n for n in module_names}
    downs = sorted(k[: -len(".lora_down.weight")] for k in tensors
                   if k.startswith(KOHYA_PREFIX) and k.endswith(".lora_down.weight"))
    text = [k for k in tensors if k.startswith("lora_te") and k.endswith(".lora_down.weight")]
    unknown = [k for k in downs if k not in by_kohya]
    if unknown:
        raise ValueError(f"{len(unknown)} kohya modules are not in this base's denoiser, e.g. "
                         f"{', '.join(unknown[:3])}: the LoRA was made for another model")
    if not downs:
        raise ValueError("no 'lora_unet_*.lora_down.weight' keys: not a kohya UNet LoRA")
    out, ranks, alphas = {}, {}, {}
    for key in downs:
        name = by_kohya[key]
        A, B = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        out[f"{UNET_PREFIX}.{name}.lora_A.weight"], out[f"{UNET_PREFIX}.{name}.lora_B.weight"] = A, B
        ranks[name] = A.shape[0]
        alpha = tensors.get(f"{key}.alpha")
        alphas[name] = float(alpha) if alpha is not None else float(A.shape[0])  # no alpha: scale 1
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
              "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha}}
    meta = {k[len("difflora.") :]: v for k, v in (header or {}).items() if k.startswith("difflora.")}
    meta["imported_from"] = "kohya" + (f" (text-encoder modules skipped: {len(text)})" if text else "")
    return out, config, meta
