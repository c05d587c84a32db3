"""Which of a LoRA's modules a denoiser has, and why the others do not fit.

A LoRA that fits only in part does part of its job and says nothing: the most common "it loads but has
no effect" (DiffSynth-Studio #1587, ComfyUI's "lora key not loaded"). The kit never applies such a LoRA:
`lora.check_fits` refuses it with this module's account of it, and `difflora inspect` prints the same.

    lora:  {module: (out, in)}  from A (r, in[, kh, kw]) and B (out, r[, 1, 1])
    base:  {module: (out, in)}  from the denoiser's weights (a meta-device model is enough: shapes only)
    match: matched, missing (no such module), wrong_shape (same name, other widths), why (one line)

Pure functions on names and shapes: no model, no file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

# module names that only diffusers' older attention classes had (renamed to to_q, to_k, to_v, to_out.0)
OLD_ATTENTION = re.compile(r"(\.(query|key|value|proj_attn)$)|(\.processor\.)|(_lora$)")
# the denoiser architectures module names tell apart (not the registry's family keys: SD 1.x and SDXL share one)
UNET, FLUX_DIT, ZIMAGE_DIT = "unet", "flux-transformer", "zimage-transformer"
ARCHITECTURE_LABELS = {UNET: "a UNet (SD 1.x / SD 2.x / SDXL)", FLUX_DIT: "a FLUX transformer",
                       ZIMAGE_DIT: "a Z-Image transformer"}


@dataclasses.dataclass(frozen=True)
class Match:
    matched: tuple[str, ...]
    missing: tuple[str, ...]
    """modules the denoiser does not have"""
    wrong_shape: tuple[str, ...]
    """"name: LoRA 320x768, weight 320x1024" for modules it has at other widths"""
    why: str
    """one line: the likeliest reason for what does not fit ("" when everything fits)"""

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.missing) + len(self.wrong_shape)

    @property
    def left_out(self) -> int:
        return len(self.missing) + len(self.wrong_shape)

    def summary(self) -> str:
        """"all 204 modules fit", "none of its 76 modules fits", "130 of its 204 modules fit (74 left out)"."""
        if not self.left_out:
            return f"all {self.total} modules fit"
        if not self.matched:
            return f"none of its {self.total} modules fits"
        return f"{len(self.matched)} of its {self.total} modules fit ({self.left_out} left out)"

    def examples(self, k: int = 3) -> str:
        """The first `k` modules left out, for a message."""
        out = [*self.missing, *self.wrong_shape]
        return ", ".join(out[:k]) + (f" (and {len(out) - k} more)" if len(out) > k else "")


def architecture_of(names: Iterable[str]) -> str | None:
    """UNET, FLUX_DIT or ZIMAGE_DIT from module names alone (diffusers' names), else None."""
    names = list(names)
    heads = {n.split(".")[0] for n in names}
    if heads & {"single_transformer_blocks"} or ("transformer_blocks" in heads and any(".attn.add_q_proj" in n or
                                                                                      ".ff_context." in n for n in names)):
        return FLUX_DIT
    if "layers" in heads and any(".attention." in n for n in names):
        return ZIMAGE_DIT
    if heads & {"down_blocks", "up_blocks", "mid_block"}:
        return UNET
    return None


def reason(missing: Iterable[str], wrong_shape: Iterable[str], lora_names: Iterable[str],
           base_names: Iterable[str]) -> str:
    """Why modules do not fit, in one line: another family, diffusers' old attention names, other widths
    (another model of the same family), or another layout of the same family."""
    missing, wrong_shape = list(missing), list(wrong_shape)
    if not missing and not wrong_shape:
        return ""
    made_for, base = architecture_of(lora_names), architecture_of(base_names)
    if made_for and base and made_for != base:
        return f"it was made for {ARCHITECTURE_LABELS[made_for]}, the base is {ARCHITECTURE_LABELS[base]}"
    old = [n for n in missing if OLD_ATTENTION.search(n)]
    if old:
        return (f"{len(old)} use diffusers' old attention names (e.g. {old[0]}): load the file with "
                "pipe.load_lora_weights and save it again, or convert it with `difflora convert`")
    if wrong_shape and not missing:
        return ("same module names at other widths: made for another model of this family (e.g. SD 2.x's 1024-wide "
                "cross-attention, not SD 1.5's 768; or SDXL's refiner)")
    return "its modules are laid out differently: made for another model (or another version) of this family"


def match(lora_shapes: dict[str, tuple[int, int]], base_shapes: dict[str, tuple[int, ...]]) -> Match:
    """Match {module: (out, in)} of a LoRA against {module: weight shape} of a denoiser."""
    matched, missing, wrong = [], [], []
    for name, (out, inp) in sorted(lora_shapes.items()):
        shape = base_shapes.get(name)
        if shape is None:
            missing.append(name)
        elif (out, inp) != tuple(shape[:2]):
            wrong.append(f"{name}: LoRA {out}x{inp}, weight {shape[0]}x{shape[1]}")
        else:
            matched.append(name)
    why = reason(missing, [w.split(":")[0] for w in wrong], lora_shapes, base_shapes)
    return Match(tuple(matched), tuple(missing), tuple(wrong), why)
