"""DiffSynth-Studio's own key handling, transcribed for tests/test_diffsynth.py (the tests do not import it:
`diffsynth` needs torchvision, imageio, modelscope and more that the kit's environment does not have).

Source: DiffSynth-Studio 2.1.12, the PyPI wheel `diffsynth` (`pip download diffsynth --no-deps`, read
2026-12-03); the same loader code is in modelscope/DiffSynth-Studio at commit 3ee3cc31048980e89cd2d60d2526cfb76f290390
(diffsynth/utils/lora/general.py, flux.py). Each function names the file and function it follows and keeps
its logic; the module tables are read off the model classes. Run once against the package itself (its model
files imported from the unpacked wheel, 2026-12-03), these gave the same names, shapes and fused weights on
the tiny FLUX and Z-Image models as DiffSynth's own classes and functions.
"""

from __future__ import annotations

import torch

# diffsynth/models/flux_dit.py FluxJointTransformerBlock (AdaLayerNorm of models/general_modules.py: 6 d;
# FluxJointAttention: a_to_qkv, b_to_qkv 3 d; ff_a, ff_b: Linear(d, 4 d), GELU, Linear(4 d, d)):
# {module: (out, in)} in units of the block's width d
FLUX_DOUBLE_LINEARS = {"norm1_a.linear": (6, 1), "norm1_b.linear": (6, 1), "attn.a_to_qkv": (3, 1),
                       "attn.b_to_qkv": (3, 1), "attn.a_to_out": (1, 1), "attn.b_to_out": (1, 1),
                       "ff_a.0": (4, 1), "ff_a.2": (1, 4), "ff_b.0": (4, 1), "ff_b.2": (1, 4)}
# diffsynth/models/flux_dit.py FluxSingleTransformerBlock: AdaLayerNormSingle 3 d, to_qkv_mlp d * (3 + 4),
# proj_out (d, 5 d)
FLUX_SINGLE_LINEARS = {"norm.linear": (3, 1), "to_qkv_mlp": (7, 1), "proj_out": (1, 5)}
# diffsynth/models/z_image_dit.py ZImageTransformerBlock: Attention (to_q, to_k, to_v, to_out[0]), FeedForward
# (w1, w2, w3), adaLN_modulation = Sequential(Linear) when modulation=True (layers, noise_refiner; not context_refiner)
ZIMAGE_BLOCK_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ZIMAGE_MODULATION = "adaLN_modulation.0"


def flux_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffsynth/utils/state_dict_converters/flux_dit.py FluxDiTStateDictConverterFromDiffusers: a diffusers
    FluxTransformer2DModel state dict -> DiffSynth's FluxDiT one. Its one change for a model of another width:
    final_norm_out's rows are swapped at half of them (the source writes 3072, FLUX.1's width)."""
    global_rename_dict = {
        "context_embedder": "context_embedder", "x_embedder": "x_embedder",
        "time_text_embed.timestep_embedder.linear_1": "time_embedder.timestep_embedder.0",
        "time_text_embed.timestep_embedder.linear_2": "time_embedder.timestep_embedder.2",
        "time_text_embed.guidance_embedder.linear_1": "guidance_embedder.timestep_embedder.0",
        "time_text_embed.guidance_embedder.linear_2": "guidance_embedder.timestep_embedder.2",
        "time_text_embed.text_embedder.linear_1": "pooled_text_embedder.0",
        "time_text_embed.text_embedder.linear_2": "pooled_text_embedder.2",
        "norm_out.linear": "final_norm_out.linear", "proj_out": "final_proj_out",
    }
    rename_dict = {
        "proj_out": "proj_out", "norm1.linear": "norm1_a.linear", "norm1_context.linear": "norm1_b.linear",
        "attn.to_q": "attn.a_to_q", "attn.to_k": "attn.a_to_k", "attn.to_v": "attn.a_to_v",
        "attn.to_out.0": "attn.a_to_out", "attn.add_q_proj": "attn.b_to_q", "attn.add_k_proj": "attn.b_to_k",
        "attn.add_v_proj": "attn.b_to_v", "attn.to_add_out": "attn.b_to_out", "ff.net.0.proj": "ff_a.0",
        "ff.net.2": "ff_a.2", "ff_context.net.0.proj": "ff_b.0", "ff_context.net.2": "ff_b.2",
        "attn.norm_q": "attn.norm_q_a", "attn.norm_k": "attn.norm_k_a", "attn.norm_added_q": "attn.norm_q_b",
        "attn.norm_added_k": "attn.norm_k_b",
    }
    rename_dict_single = {
        "attn.to_q": "a_to_q", "attn.to_k": "a_to_k", "attn.to_v": "a_to_v", "attn.norm_q": "norm_q_a",
        "attn.norm_k": "norm_k_a", "norm.linear": "norm.linear", "proj_mlp": "proj_in_besides_attn",
        "proj_out": "proj_out",
    }
    state_dict_ = {}
    for name, param in state_dict.items():
        if name.endswith(".weight") or name.endswith(".bias"):
            suffix = ".weight" if name.endswith(".weight") else ".bias"
            prefix = name[: -len(suffix)]
            if prefix in global_rename_dict:
                if global_rename_dict[prefix] == "final_norm_out.linear":
                    half = param.shape[0] // 2  # the source: 3072
                    param = torch.concat([param[half:], param[:half]], dim=0)
                state_dict_[global_rename_dict[prefix] + suffix] = param
            elif prefix.startswith("transformer_blocks."):
                names = prefix.split(".")
                names[0] = "blocks"
                middle = ".".join(names[2:])
                if middle in rename_dict:
                    state_dict_[".".join(names[:2] + [rename_dict[middle]] + [suffix[1:]])] = param
            elif prefix.startswith("single_transformer_blocks."):
                names = prefix.split(".")
                names[0] = "single_blocks"
                middle = ".".join(names[2:])
                if middle in rename_dict_single:
                    state_dict_[".".join(names[:2] + [rename_dict_single[middle]] + [suffix[1:]])] = param
    for name in list(state_dict_.keys()):
        if "single_blocks." in name and ".a_to_q." in name:
            mlp = state_dict_.get(name.replace(".a_to_q.", ".proj_in_besides_attn."), None)
            if mlp is None:
                mlp = torch.zeros(4 * state_dict_[name].shape[0], *state_dict_[name].shape[1:],
                                  dtype=state_dict_[name].dtype)
            else:
                state_dict_.pop(name.replace(".a_to_q.", ".proj_in_besides_attn."))
            param = torch.concat([state_dict_.pop(name), state_dict_.pop(name.replace(".a_to_q.", ".a_to_k.")),
                                  state_dict_.pop(name.replace(".a_to_q.", ".a_to_v.")), mlp], dim=0)
            state_dict_[name.replace(".a_to_q.", ".to_qkv_mlp.")] = param
    for name in list(state_dict_.keys()):
        for component in ["a", "b"]:
            if f".{component}_to_q." in name:
                name_ = name.replace(f".{component}_to_q.", f".{component}_to_qkv.")
                param = torch.concat([state_dict_[name],
                                      state_dict_[name.replace(f".{component}_to_q.", f".{component}_to_k.")],
                                      state_dict_[name.replace(f".{component}_to_q.", f".{component}_to_v.")]], dim=0)
                state_dict_[name_] = param
                state_dict_.pop(name)
                state_dict_.pop(name.replace(f".{component}_to_q.", f".{component}_to_k."))
                state_dict_.pop(name.replace(f".{component}_to_q.", f".{component}_to_v."))
    return state_dict_


def get_name_dict(lora_state_dict: dict) -> dict[str, tuple[str, str, str | None]]:
    """diffsynth/utils/lora/general.py GeneralLoRALoader.get_name_dict: {module: (B key, A key, alpha key or None)}."""
    lora_name_dict = {}
    for key in lora_state_dict:
        if ".lora_up." in key:
            lora_A_key, lora_B_key = "lora_down", "lora_up"
        else:
            lora_A_key, lora_B_key = "lora_A", "lora_B"
        if lora_B_key not in key:
            continue
        keys = key.split(".")
        if len(keys) > keys.index(lora_B_key) + 2:
            keys.pop(keys.index(lora_B_key) + 1)
        keys.pop(keys.index(lora_B_key))
        if keys[0] == "diffusion_model":
            keys.pop(0)
        keys.pop(-1)
        target_name = ".".join(keys)
        key_alpha = key.replace(lora_B_key + ".weight", "alpha").replace(lora_B_key + ".default.weight", "alpha")
        if key_alpha == key or key_alpha not in lora_state_dict:
            key_alpha = None
        lora_name_dict[target_name] = (key, key.replace(lora_B_key, lora_A_key), key_alpha)
    return lora_name_dict


def general_convert(state_dict: dict) -> dict:
    """GeneralLoRALoader.convert_state_dict: {"<module>.lora_B.weight", "<module>.lora_A.weight"}, A scaled by
    alpha / rank where the file has an alpha."""
    name_dict = get_name_dict(state_dict)
    state_dict_ = {}
    for name, (up, down, alpha) in name_dict.items():
        weight_up, weight_down = state_dict[up], state_dict[down]
        if alpha is not None:
            weight_down = weight_down * (state_dict[alpha] / weight_down.shape[0])
        state_dict_[name + ".lora_B.weight"] = weight_up
        state_dict_[name + ".lora_A.weight"] = weight_down
    return state_dict_


def flux_convert(state_dict: dict) -> dict:
    """diffsynth/utils/lora/flux.py FluxLoRALoader.convert_state_dict: guess_resource finds kohya keys
    ("lora_unet_" in a key) or diffusers keys (a "transformer." prefix) and converts those (not transcribed:
    the tests never give it either); any other file, e.g. one in DiffSynth's own names, comes back unchanged."""
    for k in state_dict:
        if "lora_unet_" in k or k.startswith("transformer."):
            raise NotImplementedError("kohya and diffusers FLUX keys: not transcribed")
    return state_dict


# the loader class of each pipeline (self.lora_loader): FluxImagePipeline FluxLoRALoader, ZImagePipeline and
# StableDiffusionPipeline the base GeneralLoRALoader, StableDiffusionXLPipeline SdxlLoRALoader (utils/lora/sdxl.py:
# its own conversion for "lora_unet_" keys only, then GeneralLoRALoader's)
CONVERTERS = {"flux": flux_convert, "zimage": general_convert, "sd15": general_convert, "sdxl": general_convert}


def load_lora(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], family: str,
              alpha: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """(the weights after, how many modules were fused) of diffsynth/diffusion/base_pipeline.py
    BasePipeline.load_lora (hotload=False): `lora = lora_loader.convert_state_dict(lora)`, then
    `lora_loader.fuse_lora_to_base_model(module, lora, alpha)` (utils/lora/general.py), which converts once
    more with the same (sub)class's convert_state_dict and adds alpha * B @ A to the weight of every module
    named by a "<name>.lora_B.weight" key; it prints the count. `weights`: the model's state dict."""
    convert = CONVERTERS[family]
    state_dict = convert(convert(dict(lora)))
    lora_layer_names = {i.replace(".lora_B.weight", "") for i in state_dict if i.endswith(".lora_B.weight")}
    out, updated_num = dict(weights), 0
    for name in sorted(lora_layer_names):
        if f"{name}.weight" in weights:  # `for name, module in model.named_modules(): if name in lora_layer_names`
            weight_up, weight_down = state_dict[name + ".lora_B.weight"], state_dict[name + ".lora_A.weight"]
            if len(weight_up.shape) == 4:
                weight_lora = alpha * torch.mm(weight_up.squeeze(3).squeeze(2), weight_down.squeeze(3).squeeze(2))
                weight_lora = weight_lora.unsqueeze(2).unsqueeze(3)
            else:
                weight_lora = alpha * torch.mm(weight_up, weight_down)
            out[f"{name}.weight"] = weights[f"{name}.weight"] + weight_lora
            updated_num += 1
    return out, updated_num
