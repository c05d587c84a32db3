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

FLUX: sd-scripts and ComfyUI name a FLUX LoRA by the modules of BFL's model, where one linear does
what several of diffusers' FluxTransformer2DModel do (diffusers' _convert_kohya_flux_lora_to_diffusers
maps them back):

    kit / diffusers:  transformer_blocks.0.attn.to_q, .to_k, .to_v    A_j (r, in), B_j (out, r), scale s_j
    kohya (BFL):      lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight  [A_q; A_k; A_v]                  (3R, in)
                      lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight    blockdiag(s_q B_q, s_k B_k, s_v B_v) (3 out, 3R)
                      lora_unet_double_blocks_0_img_attn_qkv.alpha             3R: alpha / rank = 1

    up @ down = [s_q B_q A_q; s_k B_k A_k; s_v B_v A_v]: the change of BFL's fused qkv weight, rows in q, k, v order.

The text stream's add_{q,k,v}_proj are txt_attn_qkv; a single block's q, k, v and proj_mlp are linear1
(4R); the other linears of the blocks map one to one (DOUBLE_BLOCK, SINGLE_BLOCK). A part the LoRA
leaves out is a zero block. Import splits a block-diagonal lora_up back into its parts (rank R each; a
part that is all zero is no module); a LoRA trained in kohya on the fused linear (lora_up not block
diagonal) gives each part the whole lora_down and its rows of lora_up: rank 3R or 4R, exact as well.

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
TRANSFORMER_PREFIX = "transformer"  # diffusers' key prefix of a FLUX transformer's LoRA (FluxPipeline's)
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

# BFL's linears of a FLUX block: {kohya suffix: diffusers' modules, in the order of the fused weight's rows}
DOUBLE_BLOCK = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
                "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
                "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "txt_attn_proj": ("attn.to_add_out",), "txt_mlp_0": ("ff_context.net.0.proj",),
                "txt_mlp_2": ("ff_context.net.2",), "txt_mod_lin": ("norm1_context.linear",)}
SINGLE_BLOCK = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation_lin": ("norm.linear",)}
BFL_BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE_BLOCK),
              "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK)}
MLP_RATIO = 4  # FluxSingleTransformerBlock's mlp_ratio: proj_mlp is (4 dim, dim), q, k and v are (dim, dim)


# sd-scripts' `ss_base_model_version` values (library/model_util.py, sdxl_model_util.py, flux_utils.py):
# AUTOMATIC1111 lists a LoRA as SDXL when it starts with "sdxl_", else as SD 1. Each family's is its
# registry row's kohya_version; without one, read from a UNet LoRA's cross-attention width (attn2.to_k's input).
CROSS_ATTENTION_VERSIONS = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
FLUX_VERSION = "flux1"


def base_model_version(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], version: str | None = None) -> str:
    """kohya's `ss_base_model_version` of a LoRA: `version` (its family's) when given, else from its
    modules (FLUX's names, a UNet's cross-attention width); "" when neither tells."""
    if version:
        return version
    if is_flux(modules):
        return FLUX_VERSION
    widths = {A.shape[1] for name, (A, _) in modules.items() if name.endswith("attn2.to_k")}
    return next((CROSS_ATTENTION_VERSIONS[w] for w in widths if w in CROSS_ATTENTION_VERSIONS), "")


def is_kohya(keys: Iterable[str]) -> bool:
    return any(k.startswith(KOHYA_PREFIX) for k in keys)


def is_flux(names: Iterable[str]) -> bool:
    """True for the module names of a FLUX transformer (or of a LoRA on one)."""
    return any(n.startswith(tuple(f"{kind}." for kind in BFL_BLOCKS)) for n in names)


def kohya_name(module: str) -> str:
    """'down_blocks.0.attentions.0.proj_in' -> 'lora_unet_down_blocks_0_attentions_0_proj_in'."""
    return KOHYA_PREFIX + module.replace(".", "_")


def flux_block(name: str) -> tuple[str, int] | None:
    """'single_transformer_blocks.3.attn.to_q' -> ('single_transformer_blocks', 3); None outside the blocks."""
    kind, _, rest = name.partition(".")
    i = rest.partition(".")[0]
    return (kind, int(i)) if kind in BFL_BLOCKS and i.isdigit() else None


def flux_layout(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{kohya key: the diffusers modules it covers} for every FLUX block that `names` have a module of:
    'lora_unet_double_blocks_0_img_attn_qkv' -> ('transformer_blocks.0.attn.to_q', '...to_k', '...to_v')."""
    blocks = sorted({block for block in map(flux_block, names) if block is not None})
    return {f"{KOHYA_PREFIX}{BFL_BLOCKS[kind][0]}_{i}_{suffix}": tuple(f"{kind}.{i}.{p}" for p in parts)
            for kind, i in blocks for suffix, parts in BFL_BLOCKS[kind][1].items()}


def layout(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{kohya key: the diffusers modules it covers} of a denoiser (or a LoRA) with modules `names`:
    BFL's fused names for a FLUX transformer, the module path itself for a UNet."""
    names = list(names)
    return flux_layout(names) if is_flux(names) else {kohya_name(n): (n,) for n in names}


def part_widths(parts: tuple[str, ...], dim: int) -> list[int]:
    """Output rows of each part of a BFL fused linear whose input is `dim` wide (q, k, v: dim; proj_mlp: 4 dim)."""
    return [MLP_RATIO * dim if p.endswith(".proj_mlp") else dim for p in parts]


def padded(A: torch.Tensor, B: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of rank R >= r: A (r, in[, kh, kw]) and B (out, r[, 1, 1]) zero-padded (product unchanged)."""
    r = A.shape[0]
    down = A.new_zeros((R, *A.shape[1:]))  # (R, in[, kh, kw])
    up = B.new_zeros((B.shape[0], R, *B.shape[2:]))  # (out, R[, 1, 1])
    down[:r], up[:, :r] = A, B
    return down, up


def fuse(key: str, parts: tuple[str, ...], modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
         scalings: dict[str, float], R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) of kohya module `key` covering `parts`, each part's scale folded into its up:
    one part: padded to rank R; n parts: down = [A_1; ...; A_n] (nR, in), up = blockdiag(s_j B_j) (sum out_j, nR)."""
    if len(parts) == 1:
        A, B = modules[parts[0]]
        return padded(A, B * scalings[parts[0]], R)
    A0 = next(modules[p][0] for p in parts if p in modules)
    dim, downs, ups = A0.shape[1], [], []
    for part, width in zip(parts, part_widths(parts, dim)):
        A, B = modules.get(part, (A0.new_zeros((0, dim)), A0.new_zeros((width, 0))))  # left out: rank 0, delta 0
        if (B.shape[0], A.shape[1]) != (width, dim):
            raise ValueError(f"{part} is {B.shape[0]}x{A.shape[1]}, not the {width}x{dim} of its share of "
                             f"BFL's fused {key}: not a FLUX transformer's LoRA")
        down, up = padded(A, B * scalings.get(part, 1.0), R)  # (R, in), (out_j, R)
        downs.append(down)
        ups.append(up)
    return torch.cat(downs), torch.block_diag(*ups)  # (nR, in), (sum out_j, nR)


def is_block_diagonal(rows: list[torch.Tensor], rank: int) -> bool:
    """True when lora_up's row blocks `rows` (out_j, rank) use only their own rank // n columns each."""
    n = len(rows)
    if rank % n:
        return False
    block = torch.arange(rank) // (rank // n)  # (rank,) which part each column belongs to
    return all(not row[:, block != j].any() for j, row in enumerate(rows))


def split(key: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
          parts: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{part: (A, B, alpha)} of kohya module `key` (down (rank, in), up (sum out_j, rank)), each part's
    delta (alpha_j / r_j) B_j A_j exactly the rows of (alpha / rank) up @ down that are its own."""
    if len(parts) == 1:
        return {parts[0]: (down, up, alpha)}
    rank, n, widths = down.shape[0], len(parts), part_widths(parts, down.shape[1])
    if sum(widths) != up.shape[0]:
        raise ValueError(f"{key}: lora_up has {up.shape[0]} rows where BFL's fused linear of a {down.shape[1]}-wide "
                         f"FLUX has {sum(widths)} ({' + '.join(map(str, widths))}): the LoRA was made for another model")
    rows = list(up.split(widths))  # (out_j, rank) each
    if not is_block_diagonal(rows, rank):  # trained on the fused linear: the whole down for each part
        return {p: (down, row, alpha) for p, row in zip(parts, rows)}
    r = rank // n  # alpha / n over rank / n: the same scale
    pieces = {p: (down[j * r : (j + 1) * r], rows[j][:, j * r : (j + 1) * r], alpha / n) for j, p in enumerate(parts)}
    return {p: (A, B, a) for p, (A, B, a) in pieces.items() if A.any() or B.any()}  # all zero: a part left out


def to_kohya(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scalings: dict[str, float],
             meta: dict, version: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) in kohya keys of the LoRA {module: (A, B)} with alpha / r = scalings[module]
    and the kit's metadata `meta`; `version`: kohya's ss_base_model_version of its family (base_model_version).

    Written in the one form every loader reads alike: each module's scale folded into lora_up, one
    rank R for all (lower ranks zero-padded: the padded components are 0, the product unchanged)
    and alpha = lora_down's rows everywhere (R; 3R or 4R for FLUX's fused linears), so alpha / r = 1.
    (diffusers' kohya loader mis-maps per-module alphas of a UNet's attention layers; ComfyUI and
    A1111 read them; with all equal nobody can differ.)"""
    groups = layout(modules)
    unmapped = sorted(set(modules) - {p for parts in groups.values() for p in parts})
    if unmapped:
        raise ValueError(f"{len(unmapped)} LoRA modules have no kohya name, e.g. {', '.join(unmapped[:3])}: "
                         "kohya's FLUX keys cover the linears of the double and single blocks only")
    R = max(A.shape[0] for A, _ in modules.values())
    tensors = {}
    for key, parts in groups.items():
        if any(p in modules for p in parts):
            down, up = fuse(key, parts, modules, scalings, R)
            tensors[f"{key}{DOWN}"], tensors[f"{key}{UP}"] = down, up
            tensors[f"{key}{ALPHA}"] = torch.tensor(float(down.shape[0]))
    header = {"ss_network_module": "networks.lora_flux" if is_flux(modules) else "networks.lora",
              "ss_network_dim": str(R), "ss_network_alpha": str(R), "ss_base_model_version": base_model_version(modules, version),
              **{f"difflora.{k}": str(v) for k, v in meta.items()}}
    return tensors, header


def from_kohya(tensors: dict[str, torch.Tensor], module_names: Iterable[str],
               header: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(diffusers-keyed tensors "unet.<module>.lora_A.weight", peft config dict, the kit's metadata)
    of kohya-keyed tensors; `module_names` are the base denoiser's modules (a UNet's or a FLUX transformer's)."""
    module_names = list(module_names)
    groups = layout(module_names)
    keys = sorted(k[: -len(DOWN)] for k in tensors if k.startswith(KOHYA_PREFIX) and k.endswith(DOWN))
    text = [k for k in tensors if k.startswith("lora_te") and k.endswith(DOWN)]
    unknown = [k for k in keys if k not in groups]
    if unknown:
        raise ValueError(f"{len(unknown)} kohya modules are not in this base's denoiser, e.g. "
                         f"{', '.join(unknown[:3])}: the LoRA was made for another model")
    if not keys:
        raise ValueError(f"no '{KOHYA_PREFIX}*{DOWN}' keys: not a kohya LoRA of a UNet or a FLUX transformer")
    parts = {}
    for key in keys:
        down, up, alpha = tensors[f"{key}{DOWN}"], tensors[f"{key}{UP}"], tensors.get(f"{key}{ALPHA}")
        alpha = float(alpha) if alpha is not None else float(down.shape[0])  # no alpha: scale 1
        parts.update(split(key, down, up, alpha, groups[key]))
    out, own = {}, dict(memory_format=torch.contiguous_format)  # own copies: split's pieces are views
    for name, (A, B, _) in parts.items():
        out[f"{UNET_PREFIX}.{name}.lora_A.weight"] = A.clone(**own)
        out[f"{UNET_PREFIX}.{name}.lora_B.weight"] = B.clone(**own)
    ranks, alphas = {n: A.shape[0] for n, (A, _, _) in parts.items()}, {n: a for n, (_, _, a) in parts.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
              "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha}}
    meta = {k[len("difflora.") :]: v for k, v in (header or {}).items() if k.startswith("difflora.")}
    if is_flux(module_names):
        meta["denoiser"] = TRANSFORMER_PREFIX  # written back with FluxPipeline's "transformer." keys (lora.save)
    meta["imported_from"] = "kohya" + (f" (text-encoder modules skipped: {len(text)})" if text else "")
    return out, config, meta
