"""DiffSynth-Studio's own LoRA files (the technique's home): read them as the kit's LoRAs, write the kit's as theirs.

    kit / diffusers:  transformer_blocks.0.attn.to_q, .to_k, .to_v    A_j (r_j, in), B_j (out, r_j), s_j = alpha_j / r_j
                      (in memory "unet.<module>.lora_A.weight"; in the kit's FLUX file "transformer.<module>...")
    DiffSynth FLUX:   blocks.0.attn.a_to_qkv.lora_A[.default].weight  [A_q; A_k; A_v]                        (3R, in)
                      blocks.0.attn.a_to_qkv.lora_B[.default].weight  blockdiag(s_q B_q, s_k B_k, s_v B_v)   (3 out, 3R)
                      no alpha, no header: DiffSynth adds B @ A to the weight (scale 1)
    DiffSynth Z-Image, SD 1.x, SDXL:  the diffusers module name itself, no prefix, `.default.` infix
                      layers.0.attention.to_q.lora_A.default.weight     A     (r, in)
                      layers.0.attention.to_q.lora_B.default.weight     s B   (out, r)

    B @ A of a_to_qkv = [s_q B_q A_q; s_k B_k A_k; s_v B_v A_v]: the change of DiffSynth's fused weight,
                        rows in q, k, v order.

The `.default.` infix is what DiffSynth's trainer writes, and read here with or without it. FLUX is written
without it ("blocks.0.attn.a_to_qkv.lora_A.weight"): DiffSynth's FLUX pipeline (FluxLoRALoader, behind
`pipe.load_lora` and `--preset_lora_path`) passes keys in its own names through unchanged and then fuses only
"<module>.lora_B.weight" keys, so a `.default.` FLUX file, its own trainer's, fuses 0 modules and says only
"0 tensors are fused" (2.1.12, found by running its loader on this converter's output: without the infix
every module fused, exact to 1.5e-8). Its trainer's `--lora_checkpoint` reads both forms.

Where the names come from (DiffSynth-Studio 2.1.12, the PyPI wheel `diffsynth`, read 2026-12-03):
- diffusion/training_module.py `add_lora_to_model`: peft's inject_adapter_in_model with lora_alpha = lora_rank
  (adapter "default", hence the `.default.` infix); diffusion/logger.py `ModelLogger.save_model`: the trainable
  tensors, "pipe.dit." or "pipe.unet." cut off (--remove_prefix_in_ckpt), accelerate's safetensors save
  (header {"format": "pt"} only, never read back: core/loader/file.py reads tensors alone).
- utils/lora/general.py `GeneralLoRALoader` (`pipe.load_lora` and `--preset_lora_path` of Z-Image and SD 1.x;
  SDXL's SdxlLoRALoader and FLUX's FluxLoRALoader in utils/lora/ convert other formats first, then use it):
  a key's module is the key without "lora_A"/"lora_B", "default" and "weight" (a leading "diffusion_model."
  dropped); it adds B @ A; a "<module>.alpha" tensor (deprecated, never written) scales A by alpha / rank,
  read here too. The SD 1.x / SDXL trainers write the UNet's modules ("pipe.unet." cut off:
  examples/stable_diffusion*/model_training/lora/*.sh in the repository).
- utils/state_dict_converters/flux_dit.py `FluxDiTStateDictConverterFromDiffusers`: diffusers' FLUX modules
  -> DiffSynth's FluxDiT (models/flux_dit.py), q, k, v (and a single block's proj_mlp) concatenated in that
  row order, norm_out.linear's two halves swapped (diffusers: scale, shift; DiffSynth: shift, scale).
  These are kohya.py's BFL linears under other names, so the fusion is kohya's (kohya.fuse, kohya.split).
- models/z_image_dit.py, models/stable_diffusion_unet.py, models/stable_diffusion_xl_unet.py: the modules and
  shapes of diffusers' ZImageTransformer2DModel and UNet2DConditionModel, name for name: no renaming there.

Written: FLUX's fused linears at R = the largest rank of their parts (smaller parts zero-padded, a part the
LoRA leaves out a zero block), every other module at its own rank; each scale folded into B. DiffSynth's
inference loader takes any rank per module; its `--lora_checkpoint` (resume training into a rank-r adapter)
takes only files whose every module has the trainer's rank (a fused module has 3R or 4R).
Read: a fused module's block-diagonal B splits back into its parts (rank R each; an all-zero part is no
module); a LoRA trained in DiffSynth on the fused linear (B not block diagonal) gives each part the whole A
and its rows of B (rank r each, alpha r): exact either way.

A pure key converter (dicts in, dicts out), like kohya.py; files and the kit's LoraFile are lora.py's.
Keys that do not fit raise ValueError.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from . import kohya

A_KEY, B_KEY = ".lora_A.default.weight", ".lora_B.default.weight"  # what DiffSynth's trainer writes
PLAIN_A, PLAIN_B = ".lora_A.weight", ".lora_B.weight"  # its loaders read these too; its FLUX pipeline only these
ALPHA = ".alpha"  # "<module>.alpha": optional, deprecated in DiffSynth (GeneralLoRALoader reads it)
OTHER_FORMATS = ("unet.", "transformer.", "text_encoder", "diffusion_model.", "lora_unet_", "lora_te")
UNET_PREFIX, TRANSFORMER_PREFIX = kohya.UNET_PREFIX, kohya.TRANSFORMER_PREFIX

# Families whose DiffSynth-Studio pipelines read these files: {the kit's family key: label}
FAMILIES = {"flux": "FLUX.1", "zimage": "Z-Image", "sd15": "Stable Diffusion 1.x", "sdxl": "SDXL"}

# DiffSynth's FluxDiT blocks: {DiffSynth module in a block: diffusers' modules, in the order of the fused weight's rows}
DOUBLE_BLOCK = {"norm1_a.linear": ("norm1.linear",), "norm1_b.linear": ("norm1_context.linear",),
                "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "attn.a_to_out": ("attn.to_out.0",), "attn.b_to_out": ("attn.to_add_out",),
                "ff_a.0": ("ff.net.0.proj",), "ff_a.2": ("ff.net.2",),
                "ff_b.0": ("ff_context.net.0.proj",), "ff_b.2": ("ff_context.net.2",)}
SINGLE_BLOCK = {"norm.linear": ("norm.linear",), "to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                "proj_out": ("proj_out",)}
FLUX_BLOCKS = {"transformer_blocks": ("blocks", DOUBLE_BLOCK),
               "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK)}
# FluxDiT's modules outside the blocks: {diffusers: DiffSynth}
FLUX_OUTER = {"x_embedder": "x_embedder", "context_embedder": "context_embedder",
              "time_text_embed.timestep_embedder.linear_1": "time_embedder.timestep_embedder.0",
              "time_text_embed.timestep_embedder.linear_2": "time_embedder.timestep_embedder.2",
              "time_text_embed.guidance_embedder.linear_1": "guidance_embedder.timestep_embedder.0",
              "time_text_embed.guidance_embedder.linear_2": "guidance_embedder.timestep_embedder.2",
              "time_text_embed.text_embedder.linear_1": "pooled_text_embedder.0",
              "time_text_embed.text_embedder.linear_2": "pooled_text_embedder.2",
              "norm_out.linear": "final_norm_out.linear", "proj_out": "final_proj_out"}
HALVES_SWAPPED = "final_norm_out.linear"  # its output rows: diffusers' [scale; shift] as [shift; scale]


def module_of(key: str) -> str | None:
    """'blocks.0.attn.a_to_qkv.lora_A.default.weight' -> 'blocks.0.attn.a_to_qkv'; None for other keys."""
    for suffix in (A_KEY, B_KEY, PLAIN_A, PLAIN_B):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def is_diffsynth(keys: Iterable[str]) -> bool:
    """True for a DiffSynth-Studio LoRA: its A and B keys end in `.lora_A.default.weight` /
    `.lora_B.default.weight` (peft's adapter name, which diffusers' files never carry) with no diffusers,
    kohya or ComfyUI prefix; or, without the infix, they name DiffSynth's own FLUX modules (blocks.N...)."""
    lora = [k for k in keys if module_of(k) is not None]
    if not lora or any(k.startswith(OTHER_FORMATS) for k in lora):
        return False
    return all(k.endswith((A_KEY, B_KEY)) for k in lora) or family_of(lora) == "flux"


def family_of(keys: Iterable[str]) -> str | None:
    """The model a DiffSynth LoRA is for, from its key names alone: "flux" (FluxDiT's blocks / single_blocks),
    "zimage" (ZImageDiT's layers / refiners), "unet" (a UNet: SD 1.x or SDXL, which one the names do not
    tell), or None."""
    names = [m for m in map(module_of, keys) if m is not None]
    if any(n.startswith(("blocks.", "single_blocks.")) for n in names):
        return "flux"
    if any(n.startswith(("layers.", "noise_refiner.", "context_refiner.")) for n in names):
        return "zimage"
    if any(n.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for n in names):
        return "unet"
    return None


def flux_layout(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{DiffSynth FLUX module: the diffusers modules it covers} for every FLUX block `names` have a module
    of, and for the modules outside the blocks that `names` hold:
    'blocks.0.attn.a_to_qkv' -> ('transformer_blocks.0.attn.to_q', '...to_k', '...to_v')."""
    names = list(names)
    blocks = sorted({block for block in map(kohya.flux_block, names) if block is not None})
    groups = {f"{FLUX_BLOCKS[kind][0]}.{i}.{module}": tuple(f"{kind}.{i}.{p}" for p in parts)
              for kind, i in blocks for module, parts in FLUX_BLOCKS[kind][1].items()}
    groups.update({ours: (theirs,) for theirs, ours in FLUX_OUTER.items() if theirs in names})
    return groups


def swap_halves(B: torch.Tensor) -> torch.Tensor:
    """B (2d, r) with its two halves of rows swapped: [B_1; B_2] -> [B_2; B_1] (its own inverse)."""
    first, second = B.chunk(2)  # (d, r) each
    return torch.cat([second, first])  # (2d, r)


def to_diffsynth(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scalings: dict[str, float],
                 family: str) -> dict[str, torch.Tensor]:
    """DiffSynth-keyed tensors of the LoRA {diffusers module: (A, B)} with alpha / r = scalings[module] on a
    `family` model ("flux", "zimage", "sd15" or "sdxl"): each scale folded into B (DiffSynth's scale is 1);
    FLUX's q, k, v (and a single block's proj_mlp) fused as DiffSynth's linears are, keys without `.default.`."""
    if family not in FAMILIES:
        raise ValueError(f"DiffSynth-Studio has no {family!r} model: its LoRA files are for "
                         f"{', '.join(FAMILIES.values())}")
    if family != "flux":
        if kohya.is_flux(modules):
            raise ValueError(f"these are a FLUX transformer's modules, e.g. {next(iter(modules))}: not a "
                             f"{FAMILIES[family]} LoRA")
        return {k: t for n, (A, B) in modules.items()
                for k, t in ((f"{n}{A_KEY}", A.contiguous()), (f"{n}{B_KEY}", (B * scalings[n]).contiguous()))}
    # FLUX: no `.default.` infix (the module docstring: DiffSynth's FLUX pipeline fuses nothing with it)
    groups = flux_layout(modules)
    unmapped = sorted(set(modules) - {p for parts in groups.values() for p in parts})
    if unmapped:
        raise ValueError(f"{len(unmapped)} LoRA modules have no DiffSynth FLUX name, e.g. {', '.join(unmapped[:3])}: "
                         "DiffSynth's FluxDiT names the linears of the blocks, the embedders and the final layer")
    tensors = {}
    for name, parts in groups.items():
        present = [p for p in parts if p in modules]
        if not present:
            continue
        if len(parts) == 1:
            A, B = modules[parts[0]]
            B = B * scalings[parts[0]]
        else:
            R = max(modules[p][0].shape[0] for p in present)
            A, B = kohya.fuse(name, parts, modules, scalings, R)  # (nR, in), (sum out_j, nR)
        if name == HALVES_SWAPPED:
            B = swap_halves(B)
        tensors[f"{name}{PLAIN_A}"], tensors[f"{name}{PLAIN_B}"] = A.contiguous(), B.contiguous()
    return tensors


def header(meta: dict) -> dict[str, str]:
    """safetensors metadata of a DiffSynth file the kit writes: accelerate's {"format": "pt"} and the kit's
    metadata as "difflora.*" (DiffSynth reads no header: these are for the kit alone)."""
    return {"format": "pt", **{f"difflora.{k}": str(v) for k, v in meta.items()}}


def family_for(names: Iterable[str], recorded: str | None = None) -> str:
    """The family key to_diffsynth needs for a LoRA on diffusers modules `names`: the one the kit recorded,
    else from the names (SD 1.x and SDXL are written alike here: a UNet counts as "sd15")."""
    if recorded in FAMILIES:
        return recorded
    names = list(names)
    kind = {"FLUX": "flux", "Z-Image": "zimage", "UNet (SD 1.x / SDXL)": "sd15"}.get(label(names))
    if kind is None:
        raise ValueError(f"DiffSynth-Studio has no LoRA format for these modules (e.g. {', '.join(names[:2])}): "
                         f"it covers {', '.join(FAMILIES.values())}")
    return kind


def is_unet(names: Iterable[str]) -> bool:
    return any(n.startswith("down_blocks.") for n in names)


def label(names: Iterable[str]) -> str:
    """What kind of denoiser module names (diffusers' or DiffSynth's) belong to, for messages; "" when unknown."""
    names = list(names)
    if kohya.is_flux(names) or any(n.startswith(("blocks.", "single_blocks.")) for n in names):
        return "FLUX"
    if any(n.startswith(("layers.", "noise_refiner.", "context_refiner.")) for n in names):
        return "Z-Image"
    return "UNet (SD 1.x / SDXL)" if is_unet(names) else ""


def check_fused(name: str, A: torch.Tensor, B: torch.Tensor, parts: tuple[str, ...]) -> None:
    """A clear error when DiffSynth's fused `name` does not have the rows of all its parts for its width."""
    widths = kohya.part_widths(parts, A.shape[1])
    if B.shape[0] != sum(widths):
        short = [p.rpartition(".")[2] for p in parts]
        raise ValueError(f"{name}: lora_B has {B.shape[0]} rows where DiffSynth's fused {'/'.join(short)} linear of a "
                         f"{A.shape[1]}-wide FLUX has {sum(widths)} ({' + '.join(map(str, widths))}): a part of "
                         f"{'/'.join(short)} is missing, or the LoRA was made for another model")


def peft_config(parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict:
    """peft config {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"} of {module: (A, B, alpha)}."""
    ranks, alphas = {n: A.shape[0] for n, (A, _, _) in parts.items()}, {n: a for n, (_, _, a) in parts.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
            "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha}}


def lora_pair(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, alpha) of DiffSynth module `name`: alpha from "<name>.alpha" if the file has one (as GeneralLoRALoader
    reads it; DiffSynth never writes one, and its FLUX pipeline would not read it), else the rank (scale 1)."""
    A = tensors.get(f"{name}{A_KEY}", tensors.get(f"{name}{PLAIN_A}"))
    B = tensors.get(f"{name}{B_KEY}", tensors.get(f"{name}{PLAIN_B}"))
    if A is None or B is None:
        raise ValueError(f"{name}: the file has its lora_{'B' if A is None else 'A'} but not its "
                         f"lora_{'A' if A is None else 'B'}: a damaged or partial DiffSynth LoRA")
    alpha = tensors.get(f"{name}{ALPHA}")
    return A, B, float(alpha) if alpha is not None else float(A.shape[0])


def from_diffsynth(tensors: dict[str, torch.Tensor], module_names: Iterable[str],
                   header: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(diffusers-keyed tensors "unet.<module>.lora_A.weight", peft config dict, the kit's metadata) of a
    DiffSynth-Studio LoRA; `module_names` are the base denoiser's diffusers modules (FLUX, Z-Image or a UNet)."""
    module_names = list(module_names)
    groups = flux_layout(module_names) if kohya.is_flux(module_names) else {n: (n,) for n in module_names}
    strange = sorted(k for k in tensors if module_of(k) is None and not k.endswith(ALPHA))
    if strange:
        raise ValueError(f"{len(strange)} keys are not DiffSynth LoRA keys ('<module>{A_KEY}', '<module>{B_KEY}'), "
                         f"e.g. {', '.join(strange[:3])}: not a DiffSynth-Studio LoRA")
    names = sorted({m for m in map(module_of, tensors) if m is not None})
    if not names:
        raise ValueError(f"no '*{A_KEY}' keys: not a DiffSynth-Studio LoRA")
    unknown = [n for n in names if n not in groups]
    if unknown:
        theirs = label(unknown)
        why = f" (its names are a {theirs}'s; this base is a {label(module_names)})" if theirs else ""
        raise ValueError(f"{len(unknown)} DiffSynth modules are not in this base's denoiser, e.g. "
                         f"{', '.join(unknown[:3])}: the LoRA was made for another model{why}")
    parts = {}
    for name in names:
        A, B, alpha = lora_pair(tensors, name)  # (rank, in), (out, rank)
        if name == HALVES_SWAPPED:
            B = swap_halves(B)
        if len(groups[name]) > 1:
            check_fused(name, A, B, groups[name])
        parts.update(kohya.split(name, A, B, alpha, groups[name]))
    if not parts:
        raise ValueError("every lora_B of this DiffSynth LoRA is zero: it changes nothing (an untrained LoRA?)")
    out, own = {}, dict(memory_format=torch.contiguous_format)  # own copies: split's pieces are views
    for name, (A, B, _) in parts.items():
        out[f"{UNET_PREFIX}.{name}.lora_A.weight"] = A.clone(**own)
        out[f"{UNET_PREFIX}.{name}.lora_B.weight"] = B.clone(**own)
    meta = {k[len("difflora.") :]: v for k, v in (header or {}).items() if k.startswith("difflora.")}
    if not is_unet(module_names):
        meta["denoiser"] = TRANSFORMER_PREFIX  # written back with the pipeline's "transformer." keys (lora.save)
    meta["imported_from"] = "diffsynth"
    return out, peft_config(parts), meta
