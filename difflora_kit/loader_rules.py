"""Which LoRA loader reads what, at which strength: each tool's key maps, modeled from its published source.

A LoRA file says, per module, W' = W + s * B @ A with s = alpha / r. Two things decide whether a tool
does what the file means:

    the keys  - which of the file's modules the tool maps onto a weight (the rest: "lora key not loaded",
                "unexpected keys", or nothing at all)
    the scale - where the tool takes alpha from: the safetensors header (peft's config), a kohya `.alpha`
                tensor, or nowhere (alpha = r, s = 1)

`readings(keys, header, family, module_names)` answers both for every loader the kit's users meet, from
the file's keys and shapes alone (nothing loaded, no model): one `Reading` per loader. Each rule below is
this kit's own code, written after the loader's source (cited in its docstring: repository, file,
function, the commit read); only name tables are transcribed. They are models of those loaders, checked
against the real loaders where the kit can run them (diffusers, the kit itself: tests/test_loader_rules.py)
and against ComfyUI's measured counts (SD 1.5 204/204 and 76/204, SDXL 734/734 and 174/734).

A file module is a key stem: the key without its LoRA suffix ("unet.down_blocks.0...to_q" of
"unet.down_blocks.0...to_q.lora_A.weight"; "lora_unet_double_blocks_0_img_attn_qkv" of a kohya key).
Its intended scale comes from the file itself (`intended_scales`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable

from . import diffsynth as diffsynth_format
from . import kohya, lora_formats
from .backends import registry

KIT, DIFFUSERS_PIPE, DIFFUSERS_ADAPTER = "difflora-kit", "diffusers load_lora_weights", "diffusers load_lora_adapter(path)"
COMFYUI, A1111, DIFFSYNTH = "ComfyUI", "AUTOMATIC1111", "DiffSynth-Studio"
LOADERS = (KIT, DIFFUSERS_PIPE, DIFFUSERS_ADAPTER, COMFYUI, A1111, DIFFSYNTH)
PREFIX = {row.key: row.lora_prefix for row in registry.FAMILIES}  # the key prefix of each family's diffusers file
UNET_FAMILIES = tuple(key for key, prefix in PREFIX.items() if prefix == "unet")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' / the kit's peft config in the header
# LoRA suffix pairs (A, B) a file may use; the stem is the key without it
SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_A.default.weight", ".lora_B.default.weight"),
            (".lora_down.weight", ".lora_up.weight"))


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one loader does with one file on one base."""

    loader: str
    """e.g. "ComfyUI", "diffusers load_lora_adapter(path)"."""
    applied: int
    """The file's modules this loader patches."""
    total: int
    """The file's modules (key stems with an A and a B)."""
    left_out: tuple[str, ...]
    """The file's modules it skips (all of them, sorted; callers show a few)."""
    strength: str
    """"right", "wrong" (some applied module gets another scale than the file means) or "n/a" (nothing
    applied, or the loader is not for this family)."""
    why: str
    """One short line: why modules are left out / why the strength is wrong; "" when all is well."""
    note: str = ""
    """Anything else the user meets there (e.g. AUTOMATIC1111 lists an SDXL file as an SD 1 LoRA)."""
    scales: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    """{applied module (stem): the scale this loader gives it}."""

    @property
    def complete(self) -> bool:
        return self.applied == self.total > 0 and self.strength == "right"


@dataclasses.dataclass(frozen=True)
class FileModule:
    stem: str
    style: str  # "peft" (lora_A/lora_B), "default" (lora_A.default, DiffSynth's), "kohya" (lora_down/lora_up)
    rank: int  # rows of A
    scale: float  # the scale the file means: alpha / r


# ---- the file itself ---------------------------------------------------------------------------------------
def file_modules(keys: dict[str, tuple[int, ...]], header: dict[str, str],
                 scalars: dict[str, float] | None = None) -> dict[str, FileModule]:
    """{stem: FileModule} of every A/B pair in `keys` (file key -> shape), with the scale the file means
    (`intended_scales`). `scalars`: values of the file's one-element tensors (kohya `.alpha`)."""
    out = {}
    for key, shape in keys.items():
        for (a, b), style in zip(SUFFIXES, ("peft", "default", "kohya")):
            if key.endswith(a) and key[: -len(a)] + b in keys:
                stem = key[: -len(a)]
                out[stem] = FileModule(stem, style, int(shape[0]), 1.0)
    scales = intended_scales(out, header, scalars or {})
    return {s: dataclasses.replace(m, scale=scales[s]) for s, m in out.items()}


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first of peft's rank/alpha pattern keys that matches module `name`, as peft resolves them
    (peft/utils/other.py get_pattern_key: re.match(rf"(.*\\.)?({key})$", name)); None when none does."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)


def peft_config(header: dict[str, str], prefix: str) -> dict | None:
    """The peft config under the header's "lora_adapter_metadata", its "<prefix>." keys unprefixed; None
    when the header has none for this prefix."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return None
    config = {k[len(prefix) + 1:]: v for k, v in json.loads(raw).items() if k.startswith(f"{prefix}.")}
    return config or None


def peft_scale(config: dict, name: str, rank: int) -> float:
    """alpha / r that peft gives module `name` under `config` (rank_pattern and alpha_pattern honoured;
    no config value: alpha = r = the module's rank)."""
    r_key = pattern_key(config.get("rank_pattern") or {}, name)
    a_key = pattern_key(config.get("alpha_pattern") or {}, name)
    r = config["rank_pattern"][r_key] if r_key else config.get("r", rank)
    alpha = config["alpha_pattern"][a_key] if a_key else config.get("lora_alpha", r)
    return float(alpha) / float(r)


def split_prefix(stem: str) -> tuple[str, str]:
    """("unet", "down_blocks.0...") of a peft stem with a denoiser prefix; ("", stem) without one."""
    head, _, rest = stem.partition(".")
    return (head, rest) if head in PREFIX.values() and rest else ("", stem)


def intended_scales(mods: dict[str, FileModule], header: dict[str, str], scalars: dict[str, float]) -> dict[str, float]:
    """The scale each module means, from the file alone: a `.alpha` tensor beside it (kohya; alpha / rank),
    else the header's peft config (r, lora_alpha, rank_pattern, alpha_pattern), else alpha = rank (1)."""
    out = {}
    for stem, m in mods.items():
        if f"{stem}.alpha" in scalars:
            out[stem] = scalars[f"{stem}.alpha"] / m.rank
            continue
        prefix, name = split_prefix(stem)
        config = peft_config(header, prefix) if prefix and m.style != "kohya" else None
        out[stem] = peft_scale(config, name, m.rank) if config else 1.0
    return out


# ---- helpers shared by the rules ----------------------------------------------------------------------------
def _reading(loader: str, mods: dict[str, FileModule], applied: dict[str, float], why_out: str,
             why_scale: str, note: str = "") -> Reading:
    """A Reading from {applied stem: the scale this loader gives it}; strength right when every applied
    module gets the file's own scale (to 1e-6)."""
    left = tuple(sorted(set(mods) - set(applied)))
    wrong = [s for s, got in applied.items() if abs(got - mods[s].scale) > 1e-6 * max(1.0, abs(mods[s].scale))]
    strength = "n/a" if not applied else ("wrong" if wrong else "right")
    why = "; ".join(w for w in ((why_out if left else ""), (why_scale.format(**_scale_words(mods, applied, wrong))
                                                              if wrong else "")) if w)
    return Reading(loader, len(applied), len(mods), left, strength, why, note, dict(applied))


def _scale_words(mods, applied, wrong) -> dict:
    s = wrong[0]
    return {"n": len(wrong), "got": f"{applied[s]:g}", "want": f"{mods[s].scale:g}"}


def _unsupported(loader: str, mods: dict[str, FileModule], why: str) -> Reading:
    return Reading(loader, 0, len(mods), tuple(sorted(mods)), "n/a", why)


def _alpha_or_one(stem: str, m: FileModule, scalars: dict[str, float]) -> float:
    """The scale of a loader that reads only a `<stem>.alpha` tensor: alpha / rank, else 1."""
    alpha = scalars.get(f"{stem}.alpha")
    return alpha / m.rank if alpha is not None else 1.0


# ---- the UNet's two namings: diffusers' and the original LDM's ------------------------------------------------
def unet_layout(module_names: Iterable[str]) -> dict:
    """The UNet's block structure from its diffusers module names: resnets per down / up block and
    transformer blocks per attention (what ComfyUI's model_detection reads from a state dict)."""
    names = set(module_names)
    count = lambda pat: len({m.group(1) for n in names if (m := re.match(pat, n))})
    downs = count(r"down_blocks\.(\d+)\.")
    ups = count(r"up_blocks\.(\d+)\.")
    res_down = [count(rf"down_blocks\.{x}\.resnets\.(\d+)$") for x in range(downs)]
    res_up = [count(rf"up_blocks\.{x}\.resnets\.(\d+)$") for x in range(ups)]
    depth = lambda block: count(rf"{re.escape(block)}\.transformer_blocks\.(\d+)$")
    return {"res_down": res_down, "res_up": res_up,
            "down_depth": [[depth(f"down_blocks.{x}.attentions.{i}") for i in range(res_down[x])] for x in range(downs)],
            "up_depth": [[depth(f"up_blocks.{x}.attentions.{i}") for i in range(res_up[x])] for x in range(ups)],
            "mid_depth": depth("mid_block.attentions.0")}


# names transcribed from ComfyUI comfy/utils.py (UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_RESNET,
# UNET_MAP_BASIC), modules only (their ".weight" dropped)
ATTENTION_PARTS = ("proj_in", "proj_out", "norm")
TRANSFORMER_PARTS = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
RESNET_PARTS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
UNET_BASIC = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def unet_to_ldm(module_names: Iterable[str]) -> dict[str, str]:
    """{diffusers module: LDM module} of a UNet, as ComfyUI's comfy/utils.py unet_to_diffusers builds it
    (Comfy-Org/ComfyUI 09708ea; the same function since 2023): the modules ComfyUI knows a diffusers
    name for, and the original-checkpoint names AUTOMATIC1111 patches."""
    lay, out = unet_layout(module_names), {}

    def transformer(diff: str, ldm: str, depth: int) -> None:
        if depth > 0:
            out.update({f"{diff}.{p}": f"{ldm}.{p}" for p in ATTENTION_PARTS})
            out.update({f"{diff}.transformer_blocks.{t}.{p}": f"{ldm}.transformer_blocks.{t}.{p}"
                        for t in range(depth) for p in TRANSFORMER_PARTS})

    for x, res in enumerate(lay["res_down"]):
        n = 1 + (res + 1) * x
        for i in range(res):
            out.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{c}" for d, c in RESNET_PARTS.items()})
            transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", lay["down_depth"][x][i])
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    transformer("mid_block.attentions.0", "middle_block.1", lay["mid_depth"])
    for i, n in enumerate((0, 2)):
        out.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{c}" for d, c in RESNET_PARTS.items()})
    res_rev = list(reversed(lay["res_down"]))
    for x in range(len(lay["res_up"])):
        n, length = (res_rev[x] + 1) * x, res_rev[x] + 1
        for i in range(length):
            c = 1
            out.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{p}" for d, p in RESNET_PARTS.items()})
            depth = lay["up_depth"][x][i] if i < len(lay["up_depth"][x]) else 0
            if depth > 0:
                c += 1
                transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            if i == length - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update(UNET_BASIC)
    return out


# ---- FLUX and Z-Image: ComfyUI's maps from diffusers' names to the original ones ------------------------------
FLUX_DOUBLE = {"attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
               "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv",
               "attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2", "ff.linear_in": "img_mlp.0",
               "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
               "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
FLUX_SINGLE = {"attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1", "proj_mlp": "linear1",
               "norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
               "attn.norm_k": "norm.key_norm", "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "norm_out.linear": "final_layer.adaLN_modulation.1", "controlnet_x_embedder": "pos_embed_input"}
ZIMAGE_BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.norm_q", "attention.norm_k",
                "attention.to_out.0", "attention_norm1", "attention_norm2", "feed_forward.w1", "feed_forward.w2",
                "feed_forward.w3", "ffn_norm1", "ffn_norm2", "adaLN_modulation.0")
ZIMAGE_BASIC = ("final_layer.linear", "final_layer.adaLN_modulation.1", "x_embedder", "cap_embedder.0",
                "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")


def _blocks(names: Iterable[str], kind: str) -> int:
    return len({m.group(1) for n in names if (m := re.match(rf"{kind}\.(\d+)\.", n))})


def flux_to_bfl(module_names: Iterable[str]) -> dict[str, str]:
    """{diffusers module: BFL module} of a FLUX transformer, as ComfyUI's comfy/utils.py flux_to_diffusers
    builds it (Comfy-Org/ComfyUI 09708ea): q, k, v (and a single block's proj_mlp) land in slices of BFL's
    fused qkv / linear1."""
    names = list(module_names)
    out = {f"transformer_blocks.{i}.{d}": f"double_blocks.{i}.{b}"
           for i in range(_blocks(names, "transformer_blocks")) for d, b in FLUX_DOUBLE.items()}
    out.update({f"single_transformer_blocks.{i}.{d}": f"single_blocks.{i}.{b}"
                for i in range(_blocks(names, "single_transformer_blocks")) for d, b in FLUX_SINGLE.items()})
    return {**out, **FLUX_BASIC}


def zimage_to_comfy(module_names: Iterable[str]) -> dict[str, str]:
    """{diffusers module: ComfyUI (NextDiT) module} of a Z-Image transformer, as ComfyUI's comfy/utils.py
    z_image_to_diffusers builds it (Comfy-Org/ComfyUI 09708ea; q, k, v into the fused attention.qkv)."""
    names = list(module_names)
    fused = {"attention.to_q": "attention.qkv", "attention.to_k": "attention.qkv", "attention.to_v": "attention.qkv",
             "attention.to_out.0": "attention.out", "attention.norm_q": "attention.q_norm",
             "attention.norm_k": "attention.k_norm"}
    out = {f"{kind}.{i}.{p}": f"{kind}.{i}.{fused.get(p, p)}"
           for kind in ("layers", "context_refiner", "noise_refiner") for i in range(_blocks(names, kind))
           for p in ZIMAGE_BLOCK}
    return {**out, **{p: p for p in ZIMAGE_BASIC}}


# ---- ComfyUI ------------------------------------------------------------------------------------------------
def comfyui_key_map(family: str, module_names: list[str]) -> set[str]:
    """The LoRA key stems ComfyUI's model_lora_keys_unet maps for a base of `family` (denoiser only).

    Source: Comfy-Org/ComfyUI comfy/lora.py model_lora_keys_unet (commit 17358c8), comfy/utils.py
    unet_to_diffusers / flux_to_diffusers / z_image_to_diffusers (09708ea); the UNet part is unchanged
    since v0.3.x (the measured v0.3.64 maps the same). Every weight of the model in its own (LDM / BFL)
    names: "lora_unet_<name with _>" and "diffusion_model.<name>". A UNet's diffusers names: "lora_unet_"
    and "lycoris_" + name with _, and "" / "unet." + name with ".to_" -> ".processor.to_" and "to_out.0" ->
    "to_out" (the attention-processor LoRA names of diffusers <= 0.20: the current names of attention
    projections are not in the map). FLUX (Flux branch): "transformer.", "lycoris_", "lora_transformer_"
    and bare diffusers names. Z-Image (Lumina2 branch, newer than v0.3.64): "diffusion_model.",
    "transformer.", "lycoris_" and bare diffusers names."""
    out = set()
    if family in UNET_FAMILIES:
        table = unet_to_ldm(module_names)
        for diff, ldm in table.items():
            out |= {f"lora_unet_{ldm.replace('.', '_')}", f"diffusion_model.{ldm}",
                    f"lora_unet_{diff.replace('.', '_')}", f"lycoris_{diff.replace('.', '_')}"}
            old = diff.replace(".to_", ".processor.to_")
            old = old[:-2] if old.endswith(".to_out.0") else old
            out |= {old, f"unet.{old}"}
        return out
    table = flux_to_bfl(module_names) if family == "flux" else zimage_to_comfy(module_names)
    for diff, native in table.items():
        out |= {f"lora_unet_{native.replace('.', '_')}", f"diffusion_model.{native}",
                f"transformer.{diff}", f"lycoris_{diff.replace('.', '_')}", diff}
        if family == "flux":
            out.add(f"lora_transformer_{diff.replace('.', '_')}")
        else:
            out.add(f"diffusion_model.{diff}")
    return out


def comfyui(mods: dict[str, FileModule], header: dict, family: str, module_names: list[str],
            scalars: dict[str, float]) -> Reading:
    """ComfyUI's LoraLoader: comfy/sd.py load_lora_for_models -> comfy/lora_convert.py convert_lora (no
    conversion applies to these files) -> comfy/lora.py load_lora over model_lora_keys_unet's map.

    A stem loads when it is in the map and has one of LoRAAdapter.load's suffix pairs (comfy/weight_adapter/
    lora.py, Comfy-Org/ComfyUI 6f98b15: lora_up/lora_down, lora_B/lora_A, lora_B.default/lora_A.default
    in recent versions, ...); every other key is logged "lora key not loaded". The scale is
    "<stem>.alpha" / rank, or 1 when the file has no alpha tensor: the header is never read."""
    if family == "difflora-toy":
        return _unsupported(COMFYUI, mods, "the toy model is the kit's own: ComfyUI cannot load it")
    key_map = comfyui_key_map(family, module_names)
    applied = {s: _alpha_or_one(s, m, scalars) for s, m in mods.items() if s in key_map}
    why_out = ("ComfyUI maps attention projections only by diffusers' old names (attn1.processor.to_q): "
               "'lora key not loaded'" if family in UNET_FAMILIES and any(split_prefix(s)[0] for s in mods)
               else "not in ComfyUI's key map for this model: 'lora key not loaded'")
    return _reading(COMFYUI, mods, applied, why_out,
                    "ignores the header's lora_alpha: reads scale {got}, the file means {want} ({n} modules)")


# ---- AUTOMATIC1111 ------------------------------------------------------------------------------------------
RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}  # networks.py suffix_conversion["resnets"]


def a1111_compvis_name(stem: str) -> str:
    """AUTOMATIC1111's convert_diffusers_name_to_compvis (extensions-builtin/Lora/networks.py, commit
    873edba), UNet part: a kohya diffusers-style name to the LDM module name it patches."""
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{RESNET_SUFFIX.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
                   f"{RESNET_SUFFIX.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{RESNET_SUFFIX.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    )
    for pattern, name in rules:
        if m := re.match(pattern, stem):
            return name(m)
    return stem


def a1111_version(header: dict[str, str]) -> str:
    """The family AUTOMATIC1111 lists a LoRA under (extensions-builtin/Lora/network.py
    NetworkOnDisk.detect_version): SDXL when ss_base_model_version starts with "sdxl_", SD2 when ss_v2
    is "True", SD1 when the header has anything else, Unknown when it is empty."""
    if str(header.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(header.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if header else "Unknown"


def automatic1111(mods: dict[str, FileModule], header: dict, family: str, module_names: list[str],
                  scalars: dict[str, float]) -> Reading:
    """AUTOMATIC1111's Lora extension (extensions-builtin/Lora/networks.py load_network, commit 873edba;
    network.py 0a0efa3). Each key is split at its first "." (so "unet.down_blocks..." is module "unet":
    a peft-keyed file matches nothing), converted by convert_diffusers_name_to_compvis, else "lora_unet" ->
    "diffusion_model" (sgm-named SDXL files), and looked up among the checkpoint's LDM modules. Only
    lora_up/lora_down pairs make a LoRA module (network_lora.py). Scale: NetworkModule.calc_scale,
    "alpha" tensor / lora_down's rows, else 1; the header is read only to list the file (a1111_version)."""
    if family not in ("sd15", "sdxl"):
        return _unsupported(A1111, mods, "AUTOMATIC1111 loads SD 1.x / 2.x / SDXL / SD3 checkpoints: not this family")
    ldm = {f"diffusion_model_{v.replace('.', '_')}" for v in unet_to_ldm(module_names).values()}
    applied = {}
    for stem, m in mods.items():
        key = stem.split(".", 1)[0]
        if m.style == "kohya" and (a1111_compvis_name(key) in ldm or key.replace("lora_unet", "diffusion_model") in ldm):
            applied[stem] = _alpha_or_one(stem, m, scalars)
    want = {"sd15": "SD1", "sdxl": "SDXL"}[family]
    got = a1111_version(header)
    note = (f"listed as {got} LoRA (ss_base_model_version={header.get('ss_base_model_version', '')!r}): hidden "
            f"beside a {want} model unless 'show all LoRAs' is on" if got not in (want, "Unknown") else "")
    why_out = ("AUTOMATIC1111 reads kohya keys only (lora_unet_*.lora_down/lora_up): "
               "'Failed to match keys when loading network'")
    return _reading(A1111, mods, applied, why_out, "reads scale {got}, the file means {want} ({n} modules)", note)


# ---- diffusers ----------------------------------------------------------------------------------------------
def _kohya_unet_in_diffusers(mods: dict[str, FileModule], scalars: dict[str, float], module_names: set[str]):
    """{stem: scale} of a kohya UNet file through diffusers' own chain (called, not copied: the kit depends
    on diffusers): lora_conversion_utils._convert_unet_lora_key per name and
    _convert_non_diffusers_lora_to_diffusers for its network_alphas, utils/state_dict_utils.
    convert_unet_state_dict_to_peft, utils/peft_utils.get_peft_kwargs, then peft's pattern matching. On
    meta tensors (shapes only); ValueError when diffusers cannot rename a key."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _convert_unet_lora_key
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    sd, name_of, peft_sd = {}, {}, {}
    for stem, m in mods.items():
        if not stem.startswith("lora_unet_"):
            continue
        down, up = torch.empty((m.rank, 1), device="meta"), torch.empty((1, m.rank), device="meta")
        sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up})
        if f"{stem}.alpha" in scalars:
            sd[f"{stem}.alpha"] = torch.tensor(scalars[f"{stem}.alpha"])
        diff = _convert_unet_lora_key(f"{stem}.lora_down.weight")  # (rank, in) -> its diffusers name
        pair = convert_unet_state_dict_to_peft({diff: down, diff.replace(".down.", ".up."): up})
        name_of[stem] = next(k for k in pair if ".lora_A." in k).split(".lora_A.")[0]
        peft_sd.update(pair)
    _, alphas = _convert_non_diffusers_lora_to_diffusers(sd)
    ranks = {f"^{k}": v.shape[1] for k, v in peft_sd.items() if "lora_B" in k}  # as load_lora_adapter builds it
    alphas = {k[len("unet."):]: v for k, v in alphas.items() if k.startswith("unet.")}
    config = get_peft_kwargs(ranks, alphas or None, peft_sd, is_unet=True)
    return {stem: peft_scale(config, name, mods[stem].rank) for stem, name in name_of.items() if name in module_names}


def diffusers_pipeline(mods: dict[str, FileModule], header: dict, family: str, module_names: list[str],
                       scalars: dict[str, float]) -> Reading:
    """`pipe.load_lora_weights(path)` (diffusers 0.42.1, loaders/lora_pipeline.py): lora_state_dict reads
    the safetensors header (use_safetensors defaults to True there: lora_base._fetch_state_dict ->
    _load_sft_state_dict_metadata), so load_lora_adapter gets peft's config as `metadata` and builds the
    LoraConfig from it; without a config, alpha = r (get_peft_kwargs). Keys: the family's denoiser prefix
    ("unet." / "transformer."), modules matched by name (the rest: peft's "unexpected keys"). kohya files:
    SD / SDXL through _convert_non_diffusers_lora_to_diffusers (its alphas as network_alphas), FLUX through
    _convert_kohya_flux_lora_to_diffusers (alpha / rank folded into the weights; BFL's names, kohya.layout).
    Z-Image: ZImageLoraLoaderMixin strips "diffusion_model." and DiffSynth's ".default" and folds .alpha."""
    if family == "difflora-toy":
        return _unsupported(DIFFUSERS_PIPE, mods, "the toy pipeline has no load_lora_weights: use load_lora_adapter")
    names, prefix = set(module_names), PREFIX[family]
    styles = {m.style for m in mods.values()}
    if styles == {"kohya"}:
        if family in ("sd15", "sdxl"):
            try:
                applied = _kohya_unet_in_diffusers(mods, scalars, names)
            except ValueError as e:
                return _unsupported(DIFFUSERS_PIPE, mods, f"diffusers' kohya converter refuses it: {str(e)[:120]}")
        elif family == "flux":
            layout = kohya.flux_layout(module_names)
            applied = {s: mods[s].scale for s in mods if s in layout}  # alpha / rank folded by the converter
        else:
            return _unsupported(DIFFUSERS_PIPE, mods, "kohya keys of this family: not modeled")
        return _reading(DIFFUSERS_PIPE, mods, applied, "diffusers' kohya converter maps no module of this base",
                        "reads scale {got}, the file means {want} ({n} modules): diffusers keys a kohya alpha "
                        "of an attention layer under another name")
    applied = {}
    for stem, m in mods.items():
        head, name = split_prefix(stem)
        if family == "zimage" and not head and m.style == "default":
            head, name = prefix, name.removeprefix("diffusion_model.")
        if head == prefix and name in names:
            config = peft_config(header, prefix)
            applied[stem] = (scalars[f"{stem}.alpha"] / m.rank if f"{stem}.alpha" in scalars
                             else peft_scale(config, name, m.rank) if config else 1.0)
    return _reading(DIFFUSERS_PIPE, mods, applied,
                    f"no '{prefix}.' prefix or no such module in this {family} denoiser: peft's 'unexpected keys'",
                    "reads scale {got}, the file means {want} ({n} modules)")


def diffusers_adapter(mods: dict[str, FileModule], header: dict, family: str, module_names: list[str],
                      scalars: dict[str, float]) -> Reading:
    """`denoiser.load_lora_adapter(path, prefix=...)` with a plain file path (diffusers 0.42.1,
    loaders/peft.py PeftAdapterMixin.load_lora_adapter): _fetch_state_dict takes the .bin branch when
    use_safetensors is None and no weight_name ends in ".safetensors", and load_state_dict reads the
    tensors without the header, so metadata is None and get_peft_kwargs sets alpha = r: scale 1 for every
    module. (With use_safetensors=True or a dict and metadata=..., it reads the config.) Only keys under
    "<prefix>." are kept; kohya keys have none."""
    names, prefix = set(module_names), PREFIX[family]
    applied = {}
    for stem, m in mods.items():
        head, name = split_prefix(stem)
        if head == prefix and m.style == "peft" and name in names:
            applied[stem] = 1.0
    why_out = (f"keys without the '{prefix}.' prefix (kohya, DiffSynth) are dropped by prefix=\"{prefix}\""
               if any(not split_prefix(s)[0] for s in mods) else f"no such module in this {family} denoiser")
    return _reading(DIFFUSERS_ADAPTER, mods, applied, why_out,
                    "skips the header with a plain path: alpha = r, scale {got} where the file means {want} "
                    "({n} modules); pass use_safetensors=True or use load_lora_weights")


# ---- DiffSynth-Studio ---------------------------------------------------------------------------------------
DIFFSYNTH_FLUX_DOUBLE = {"attn.to_q": "attn.a_to_qkv", "attn.to_k": "attn.a_to_qkv", "attn.to_v": "attn.a_to_qkv",
                         "attn.add_q_proj": "attn.b_to_qkv", "attn.add_k_proj": "attn.b_to_qkv",
                         "attn.add_v_proj": "attn.b_to_qkv", "attn.to_out.0": "attn.a_to_out",
                         "attn.to_add_out": "attn.b_to_out", "ff.net.0.proj": "ff_a.0", "ff.net.2": "ff_a.2",
                         "ff_context.net.0.proj": "ff_b.0", "ff_context.net.2": "ff_b.2",
                         "norm1.linear": "norm1_a.linear", "norm1_context.linear": "norm1_b.linear"}
DIFFSYNTH_FLUX_SINGLE = {"attn.to_q": "to_qkv_mlp", "attn.to_k": "to_qkv_mlp", "attn.to_v": "to_qkv_mlp",
                         "proj_mlp": "to_qkv_mlp", "norm.linear": "norm.linear", "proj_out": "proj_out"}


def diffsynth_flux_names(module_names: Iterable[str]) -> dict[str, str]:
    """{diffusers module: DiffSynth module} of a FLUX transformer (diffsynth/utils/lora/flux.py
    FluxLoRALoader.diffusers_rename_dict, modelscope/DiffSynth-Studio 3ee3cc3; blocks.N / single_blocks.N)."""
    names = list(module_names)
    out = {f"transformer_blocks.{i}.{d}": f"blocks.{i}.{s}"
           for i in range(_blocks(names, "transformer_blocks")) for d, s in DIFFSYNTH_FLUX_DOUBLE.items()}
    out.update({f"single_transformer_blocks.{i}.{d}": f"single_blocks.{i}.{s}"
                for i in range(_blocks(names, "single_transformer_blocks")) for d, s in DIFFSYNTH_FLUX_SINGLE.items()})
    return out


def diffsynth_target(stem: str) -> str:
    """GeneralLoRALoader.get_name_dict's module name of a stem: a leading "diffusion_model." dropped,
    nothing else (no "unet." / "transformer." prefix is removed)."""
    return stem.removeprefix("diffusion_model.")


def diffsynth(mods: dict[str, FileModule], header: dict, family: str, module_names: list[str],
              scalars: dict[str, float]) -> Reading:
    """DiffSynth-Studio 2.x's BasePipeline.load_lora (diffsynth/diffusion/base_pipeline.py 96143aa):
    core.load_state_dict reads the tensors only (no header), then the pipeline's loader converts and fuses
    (diffsynth/utils/lora/general.py GeneralLoRALoader 237d178, flux.py FluxLoRALoader 3ee3cc3, sdxl.py
    SdxlLoRALoader 2c32063).

    General (SD, Z-Image): a B key names module `<key without lora_B[.default].weight, without a leading
    diffusion_model.>`: a "unet." / "transformer." prefix matches no module (it logs only a count); a
    "<stem>.alpha" tensor scales by alpha / rank, else 1. SDXL kohya files go through a table of the
    original LDM names ("lora_unet_input_blocks_4_1_..."): diffusers-style kohya names raise KeyError.
    FLUX: "transformer." keys are renamed to DiffSynth's modules, q/k/v fused (all three needed: KeyError
    otherwise), names outside the table kept and matching nothing (silently); kohya (BFL) names renamed
    by a table that covers every BFL linear; one alpha (the first .alpha tensor) scales all modules.
    Module names of DiffSynth's SD/SDXL/Z-Image models are taken to be diffusers' (its SDXL table's keys
    and its Z-Image files' keys are)."""
    if family == "difflora-toy":
        return _unsupported(DIFFSYNTH, mods, "the toy model is the kit's own")
    names = set(module_names)
    first_alpha = next((scalars[f"{s}.alpha"] / m.rank for s, m in mods.items() if f"{s}.alpha" in scalars), None)
    if family == "flux":
        table = diffsynth_flux_names(module_names)
        native = set(table.values())
        applied = {}
        if any(m.style == "kohya" for m in mods.values()):
            bfl = kohya.flux_layout(module_names)
            applied = {s: (first_alpha or 1.0) for s in mods if s in bfl}
        elif any(split_prefix(s)[0] == "transformer" for s in mods):
            present = {split_prefix(s)[1] for s in mods}
            for stem in mods:
                name = split_prefix(stem)[1]
                group = [d for d, t in table.items() if t == table.get(name) and not d.endswith("proj_mlp")]
                if name in table and any(p not in present for p in group):
                    return _unsupported(DIFFSYNTH, mods, f"FluxLoRALoader fuses q, k and v: {name} lacks a part "
                                        "(KeyError, nothing loads)")
                if name in table:
                    applied[stem] = first_alpha or 1.0
        else:
            # its own names pass through; fuse_lora_to_base_model then takes only "<module>.lora_B.weight" keys:
            # a `.default.` FLUX file fuses nothing (found by the kit's diffsynth.py on DiffSynth 2.1.12)
            applied = {s: _alpha_or_one(s, m, scalars) for s, m in mods.items()
                       if m.style == "peft" and diffsynth_target(s) in native}
        return _reading(DIFFSYNTH, mods, applied, "not in FluxLoRALoader's rename table: dropped silently",
                        "reads no header alpha: scale {got}, the file means {want} ({n} modules)")
    if family == "sdxl" and any(m.style == "kohya" for m in mods.values()):
        if not all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", s) for s in mods):
            return _unsupported(DIFFSYNTH, mods, "SdxlLoRALoader knows kohya keys only in the original LDM names "
                                "(lora_unet_input_blocks_*): KeyError on lora_unet_down_blocks_*")
        return _unsupported(DIFFSYNTH, mods, "LDM-named kohya SDXL keys: not modeled")
    applied = {s: _alpha_or_one(s, m, scalars) for s, m in mods.items() if diffsynth_target(s) in names}
    return _reading(DIFFSYNTH, mods, applied,
                    "GeneralLoRALoader keeps the key's prefix ('unet.', 'transformer.', 'lora_unet_'): no module "
                    "has that name ('0 tensors are fused')",
                    "reads no header alpha: scale {got}, the file means {want} ({n} modules)")


# ---- the kit itself -----------------------------------------------------------------------------------------
def difflora_kit(mods: dict[str, FileModule], header: dict, family: str, module_names: list[str],
                 scalars: dict[str, float]) -> Reading:
    """This kit's lora.load + lora.check_fits: the formats lora_formats detects and lora.load reads (diffusers/peft
    keys under "unet.", the family's, peft's or ComfyUI's prefix, peft config from the header with rank_pattern /
    alpha_pattern honoured; kohya keys through kohya.from_kohya and DiffSynth's through diffsynth.from_diffsynth,
    resolved against the base's module names, alpha per module). All or nothing: a file with any module
    the base lacks is refused with the names listed (LoraMismatchError), never half applied."""
    names = set(module_names)
    styles = {m.style for m in mods.values()}
    fmt = lora_formats.detect([s + ".lora_A.weight" if m.style == "peft" else s + ".lora_A.default.weight"
                               if m.style == "default" else s + ".lora_down.weight" for s, m in mods.items()], header)
    if styles == {"kohya"} and fmt.key == "kohya":
        layout = kohya.layout(module_names)
        missing = [s for s in mods if s not in layout]
        scale = {s: _alpha_or_one(s, m, scalars) for s, m in mods.items()}
    elif fmt.key == "diffsynth":  # diffsynth.from_diffsynth: DiffSynth's FLUX names, or diffusers' with ".default."
        layout = diffsynth_format.flux_layout(module_names) if diffsynth_format.family_of(
            [s + ".lora_A.weight" for s in mods]) == "flux" else {n: (n,) for n in names}
        missing = [s for s in mods if s not in layout]
        scale = {s: _alpha_or_one(s, m, scalars) for s, m in mods.items()}
    elif styles == {"peft"} and fmt.key in ("kit", "diffusers", "peft", "comfyui"):
        bare = {s: s[len(fmt.prefix):] if fmt.prefix else split_prefix(s)[1] for s in mods}
        missing = [s for s in mods if bare[s] not in names]
        scale = {s: m.scale for s, m in mods.items()}
    else:
        return _unsupported(KIT, mods, f"{fmt.label}: lora.load refuses it")
    if missing:
        return _unsupported(KIT, mods, f"refuses the file: {len(missing)} of its {len(mods)} modules are not in "
                            "this base (LoraMismatchError names them)")
    return _reading(KIT, mods, scale, "", "reads scale {got}, the file means {want} ({n} modules)")


RULES = {KIT: difflora_kit, DIFFUSERS_PIPE: diffusers_pipeline, DIFFUSERS_ADAPTER: diffusers_adapter,
         COMFYUI: comfyui, A1111: automatic1111, DIFFSYNTH: diffsynth}


def readings(keys: dict[str, tuple[int, ...]], header: dict[str, str], family: str, module_names: list[str],
             scalars: dict[str, float] | None = None) -> list[Reading]:
    """One Reading per loader (LOADERS order) of a LoRA file on a base of `family` ("difflora-toy", "sd15",
    "sdxl", "flux", "zimage") whose denoiser has diffusers module names `module_names`.

    keys: file key -> tensor shape; header: the safetensors metadata; scalars: values of the file's
    one-element tensors (kohya `.alpha`; `read_file` gives all three)."""
    if family not in PREFIX:
        raise ValueError(f"family must be one of {', '.join(PREFIX)}, got {family!r}")
    scalars = scalars or {}
    mods = file_modules(keys, header, scalars)
    names = list(module_names)
    return [RULES[loader](mods, header, family, names, scalars) for loader in LOADERS]


def read_file(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, float]]:
    """(keys -> shapes, header, one-element tensors' values) of a safetensors LoRA file, reading no
    large tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        scalars = {k: float(f.get_tensor(k).reshape(-1)[0]) for k, shape in keys.items()
                   if len(shape) <= 1 and (not shape or shape[0] == 1)}
    return keys, header, scalars
