"""What kind of LoRA file this is, from its keys and header alone.

    format      example key                                                        written by
    kit         unet.down_blocks.0.attentions.0.proj_in.lora_A.weight + difflora.*   this kit
    diffusers   unet.<module>.lora_A.weight / transformer.<module>.lora_A.weight     diffusers, peft via diffusers
    peft        base_model.model.<module>.lora_A.weight                              peft's PeftModel.save_pretrained
    kohya       lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight (+ .alpha)   sd-scripts, the kit's export
                lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight            (FLUX, BFL's names)
    kohya-ldm   lora_unet_input_blocks_1_1_proj_in.lora_down.weight                original (LDM) UNet names
    diffsynth   layers.0.attention.to_q.lora_A.default.weight                      DiffSynth-Studio
                blocks.0.attn.a_to_qkv.lora_A.weight                               (FLUX, its own names)
    comfyui     diffusion_model.<module>.lora_A.weight                             ComfyUI's own saves
    diffusers-old  unet.<...>.attn1.processor.to_q_lora.down.weight                diffusers before 0.20

Pure: keys and header in, a Format out. Reading a format is lora.load's; checking it against a base,
lora_match's; `difflora inspect` puts them together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from . import diffsynth
from .backends import registry


@dataclasses.dataclass(frozen=True)
class Format:
    key: str
    """"kit", "diffusers", "peft", "kohya", "kohya-ldm", "diffsynth", "comfyui", "diffusers-old" or "unknown"."""
    label: str
    """For people: "kohya (sd-scripts' keys: ComfyUI, AUTOMATIC1111)"."""
    prefix: str = ""
    """The key prefix in front of the module names ("unet.", "transformer.", "diffusion_model.", ...)."""


LABELS = {
    "kit": "difflora-kit (diffusers/peft keys and the kit's metadata)",
    "diffusers": "diffusers/peft keys",
    "peft": "peft's own keys (PeftModel.save_pretrained)",
    "kohya": "kohya (sd-scripts' keys: ComfyUI, AUTOMATIC1111)",
    "kohya-ldm": "kohya keys in the original (LDM) UNet's names",
    "diffsynth": "DiffSynth-Studio native keys",
    "comfyui": "ComfyUI's own keys (diffusion_model. prefix)",
    "diffusers-old": "diffusers' old attention-processor keys (before diffusers 0.20)",
    "unknown": "not a LoRA format the kit knows",
}
LDM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
DIFFUSERS_PREFIXES = tuple(dict.fromkeys(f"{row.lora_prefix}." for row in registry.FAMILIES))  # "unet.", "transformer."


def _format(key: str, prefix: str = "") -> Format:
    return Format(key, LABELS[key], prefix)


def detect(keys: Iterable[str], header: dict | None = None) -> Format:
    """The format of a LoRA file with tensor names `keys` and safetensors metadata `header`."""
    keys, header = list(keys), header or {}
    if any(k.startswith(LDM_BLOCKS) for k in keys):
        return _format("kohya-ldm", "lora_unet_")
    if any(k.startswith("lora_unet_") for k in keys):
        return _format("kohya", "lora_unet_")
    if any("_lora.down.weight" in k or "_lora.up.weight" in k for k in keys):
        return _format("diffusers-old", "unet.")
    if diffsynth.is_diffsynth(keys):  # ".default." keys, or DiffSynth's FLUX names (blocks.N, single_blocks.N)
        return _format("diffsynth")
    lora_keys = [k for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if not lora_keys:
        return _format("unknown")
    for prefix, key in (("diffusion_model.", "comfyui"), ("base_model.model.", "peft")):
        if any(k.startswith(prefix) for k in lora_keys):
            return _format(key, prefix)
    prefix = next((p for p in DIFFUSERS_PREFIXES if any(k.startswith(p) for k in lora_keys)), "")
    if not prefix:  # peft keys of the bare model, no prefix (e.g. a transformer's, saved by hand)
        return _format("diffusers")
    return _format("kit" if any(k.startswith("difflora.") for k in header) else "diffusers", prefix)


def strip(tensors: dict, fmt: Format) -> dict:
    """The tensors of a prefixed peft-keyed file ("comfyui", "peft", no-prefix "diffusers") under the kit's
    in-memory keys "unet.<module>.lora_A.weight" (the module names as the file has them)."""
    return {"unet." + k[len(fmt.prefix):]: v for k, v in tensors.items() if k.startswith(fmt.prefix)
            and k.endswith((".lora_A.weight", ".lora_B.weight"))}
