"""loader_rules: which LoRA loader reads which of a file's modules, at which scale.

Oracles: ComfyUI's measured counts (v0.3.64 run on this CPU, 2026-12-03: SD 1.5 204/204 kohya and 76/204
peft keys, SDXL 734/734 and 174/734) on the real architectures' module names (public configs, meta
device: no weights); the real diffusers loaders and the kit's own lora.load + check_fits on the tiny
pipelines, module by module (which modules load, and each one's peft scaling)."""

import json

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from difflora_kit import backends, kohya, lora, loader_rules as lr
from difflora_kit.backends import registry
from difflora_kit.config import TrainConfig
from difflora_kit.tiny_models import make_tiny_pipeline


def real_names(family: str) -> list[str]:
    """Module names of the real `family` denoiser (its public config, built on the meta device)."""
    row = registry.get(family)
    with torch.device("meta"):
        model = getattr(diffusers, row.denoiser_class).from_config(row.public.unet)
    return [n for n, _ in model.named_modules() if n]


def meta_lora(family: str) -> lora.LoraFile:
    """The kit's default-target LoRA (rank 4) of the real `family` denoiser, shapes only (meta tensors)."""
    row = registry.get(family)
    with torch.device("meta"):
        model = getattr(diffusers, row.denoiser_class).from_config(row.public.unet)
    targets = TrainConfig().targets if row.denoiser_folder == "unet" else row.backend_class().targets_for(row.public.unet)
    lora.attach(model, 4, 4, targets)
    tensors, config = lora.adapter_state(model)
    return lora.LoraFile(tensors, config, {"base": family, "denoiser": row.lora_prefix})


def peft_keys(lf: lora.LoraFile, alpha: float) -> tuple[dict, dict]:
    """(keys -> shapes, header) of `lf` as lora.save writes it, with lora_alpha = alpha."""
    prefix = lf.meta["denoiser"]
    keys = {prefix + k[len("unet"):]: tuple(v.shape) for k, v in lf.tensors.items()}
    config = {**lf.config, "lora_alpha": alpha}
    return keys, {lr.METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}


def kohya_keys(lf: lora.LoraFile) -> tuple[dict, dict, dict]:
    """(keys -> shapes, header, alphas) of `lf` as lora.save_kohya writes it."""
    modules = lf.modules()
    tensors, header = kohya.to_kohya(modules, {n: lf.scaling(n) for n in modules}, lf.meta)
    keys = {k: tuple(v.shape) for k, v in tensors.items()}
    alphas = {k: float(keys[k[: -len(".alpha")] + ".lora_down.weight"][0]) for k in keys if k.endswith(".alpha")}
    return keys, header, alphas


def by_loader(readings):
    return {r.loader: r for r in readings}


@pytest.mark.parametrize("family, total, comfy_peft", [("sd15", 204, 76), ("sdxl", 734, 174)])
def test_comfyui_counts_match_the_measured_ones_on_real_unets(family, total, comfy_peft):
    names, lf = real_names(family), meta_lora(family)
    keys, header = peft_keys(lf, alpha=8.0)  # rank 4, alpha 8: the file means scale 2
    peft = by_loader(lr.readings(keys, header, family, names))
    assert (peft[lr.COMFYUI].applied, peft[lr.COMFYUI].total) == (comfy_peft, total)
    left = peft[lr.COMFYUI].left_out
    assert len(left) == total - comfy_peft and all(s.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or
                                                   s.endswith(".to_out.0") for s in left)  # attention only
    assert peft[lr.COMFYUI].strength == "wrong" and "scale 1" in peft[lr.COMFYUI].why  # no .alpha, header unread
    assert peft[lr.A1111].applied == 0 and peft[lr.DIFFSYNTH].applied == 0  # "unet." keys: nobody there
    assert peft[lr.DIFFUSERS_PIPE].complete and peft[lr.KIT].complete
    assert peft[lr.DIFFUSERS_ADAPTER].applied == total and peft[lr.DIFFUSERS_ADAPTER].strength == "wrong"
    folded = by_loader(lr.readings(*peft_keys(lf, alpha=4.0), family, names))  # alpha = r: strength in B
    assert folded[lr.COMFYUI].strength == "right" and folded[lr.DIFFUSERS_ADAPTER].complete

    kkeys, kheader, alphas = kohya_keys(lf)
    ko = by_loader(lr.readings(kkeys, kheader, family, names, alphas))
    for loader in (lr.COMFYUI, lr.A1111, lr.DIFFUSERS_PIPE, lr.KIT):
        assert ko[loader].complete and ko[loader].total == total, (loader, ko[loader])
    assert ko[lr.DIFFUSERS_ADAPTER].applied == 0  # no "unet." prefix
    assert ko[lr.A1111].note == ""  # the export writes kohya's own ss_base_model_version (sd_v1, sdxl_base_v1-0)
    old = {**kheader, "ss_base_model_version": "sdxl/base"}  # older exports wrote the --base string
    assert ("listed as SD1" in by_loader(lr.readings(kkeys, old, family, names, alphas))[lr.A1111].note) == \
        (family == "sdxl")


def test_a_file_for_another_family_is_left_out_everywhere():
    names, lf = real_names("sd15"), meta_lora("sdxl")
    for reading in lr.readings(*peft_keys(lf, 4.0), "sd15", names):
        assert reading.applied < reading.total, reading
    assert by_loader(lr.readings(*peft_keys(lf, 4.0), "sd15", names))[lr.KIT].applied == 0  # all or nothing


def test_flux_and_zimage_on_public_configs():
    for family in ("flux", "zimage"):
        names, lf = real_names(family), meta_lora(family)
        got = by_loader(lr.readings(*peft_keys(lf, 8.0), family, names))
        assert got[lr.COMFYUI].applied == got[lr.COMFYUI].total and got[lr.COMFYUI].strength == "wrong"
        assert got[lr.A1111].strength == "n/a" and got[lr.DIFFUSERS_PIPE].complete
        assert got[lr.DIFFSYNTH].strength == "wrong" if family == "flux" else got[lr.DIFFSYNTH].applied == 0
    kkeys, kheader, alphas = kohya_keys(meta_lora("flux"))
    ko = by_loader(lr.readings(kkeys, kheader, "flux", real_names("flux"), alphas))
    assert all(ko[x].complete for x in (lr.COMFYUI, lr.DIFFUSERS_PIPE, lr.DIFFSYNTH, lr.KIT))


def test_unet_to_ldm_follows_comfyuis_layout_on_sdxl():
    table = lr.unet_to_ldm(real_names("sdxl"))
    assert table["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q"
    assert table["up_blocks.0.attentions.2.proj_out"] == "output_blocks.2.1.proj_out"
    assert table["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert table["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    assert lr.a1111_compvis_name("lora_unet_up_blocks_1_resnets_2_conv1") == "diffusion_model_output_blocks_5_0_in_layers_2"


# ---- against the real loaders, module by module (tiny pipelines) -------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return make_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "base")


@pytest.fixture(scope="module")
def rank4_alpha8(tiny_sd15, tmp_path_factory):
    """A random rank-4, alpha-8 LoRA file (scale 2) on the tiny SD 1.5 UNet, one module at rank 2 alpha 3."""
    unet = backends.load_backend(tiny_sd15, "cpu").unet
    torch.manual_seed(0)
    lora.attach(unet, 4, 4, TrainConfig().targets)
    tensors, config = lora.adapter_state(unet)
    tensors = {k: torch.randn_like(v) * 0.1 for k, v in tensors.items()}
    odd = sorted(lora.LoraFile(tensors, config, {}).modules())[0]
    tensors[f"unet.{odd}.lora_A.weight"] = tensors[f"unet.{odd}.lora_A.weight"][:2].contiguous()
    tensors[f"unet.{odd}.lora_B.weight"] = tensors[f"unet.{odd}.lora_B.weight"][:, :2].contiguous()
    config = {**config, "lora_alpha": 8, "rank_pattern": {odd: 2}, "alpha_pattern": {odd: 3.0}}
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(tensors, str(path), metadata={  # as lora.save wrote it before scales were folded into B
        "format": "pt", lr.METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()})})
    return path, odd


def peft_scalings(model, adapter: str) -> dict[str, float]:
    """{module: scaling} of every peft LoRA layer of `model` for `adapter` (what the loader set)."""
    return {n: float(m.scaling[adapter]) for n, m in model.named_modules() if adapter in getattr(m, "scaling", {})}


def rule_scales(reading, prefix="unet") -> dict[str, float]:
    return {stem[len(prefix) + 1:]: s for stem, s in reading.scales.items()}


def test_diffusers_rules_predict_the_real_loaders_scale_per_module(tiny_sd15, rank4_alpha8, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path, odd = rank4_alpha8
    names = backends.module_names(tiny_sd15)
    got = by_loader(lr.readings(*lr.read_file(path)[:2], "sd15", names, lr.read_file(path)[2]))
    assert lr.file_modules(*lr.read_file(path)[:2])[f"unet.{odd}"].scale == 1.5

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="a")  # a plain path: header skipped
    real = peft_scalings(unet, "a")
    assert rule_scales(got[lr.DIFFUSERS_ADAPTER]) == real and set(real.values()) == {1.0}
    assert got[lr.DIFFUSERS_ADAPTER].strength == "wrong"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, use_safetensors=True)
    pipe.load_lora_weights(str(path), adapter_name="b")
    real = peft_scalings(pipe.unet, "b")
    assert rule_scales(got[lr.DIFFUSERS_PIPE]) == real and real[odd] == 1.5 and set(real.values()) == {2.0, 1.5}
    assert got[lr.DIFFUSERS_PIPE].complete

    kpath = tmp_path / "kohya.safetensors"
    lora.save_kohya(kpath, lora.load(path))
    keys, header, scalars = lr.read_file(kpath)
    ko = by_loader(lr.readings(keys, header, "sd15", names, scalars))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, use_safetensors=True)
    pipe.load_lora_weights(str(kpath), adapter_name="k")
    real = peft_scalings(pipe.unet, "k")
    assert len(real) == ko[lr.DIFFUSERS_PIPE].applied == ko[lr.DIFFUSERS_PIPE].total and set(real.values()) == {1.0}
    assert set(ko[lr.DIFFUSERS_PIPE].scales.values()) == {1.0} and ko[lr.DIFFUSERS_PIPE].complete


def test_diffusers_kohya_rule_reproduces_the_alpha_mismapping(tiny_sd15, tmp_path):
    """A kohya file whose alphas differ between modules: the rule predicts every module's real scale."""
    from diffusers import StableDiffusionPipeline

    names = backends.module_names(tiny_sd15)
    torch.manual_seed(0)
    wanted = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.proj_in",
              "down_blocks.0.resnets.0.conv1", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"]
    unet = backends.load_backend(tiny_sd15, "cpu").unet
    modules = dict(unet.named_modules())
    tensors = {}
    for i, name in enumerate(wanted):
        w = modules[name].weight
        stem = kohya.kohya_name(name)
        tensors[f"{stem}.lora_down.weight"] = torch.randn(4, *w.shape[1:])
        tensors[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.ndim == 4 else []))
        tensors[f"{stem}.alpha"] = torch.tensor(float(i + 1))  # 1, 2, 3, 4: per-module alphas
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path))
    got = by_loader(lr.readings(*lr.read_file(path)[:2], "sd15", names, lr.read_file(path)[2]))[lr.DIFFUSERS_PIPE]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, use_safetensors=True)
    pipe.load_lora_weights(str(path), adapter_name="k")
    real = peft_scalings(pipe.unet, "k")
    assert {n: got.scales[kohya.kohya_name(n)] for n in real} == real and len(real) == len(wanted)
    want = {n: (i + 1) / 4 for i, n in enumerate(wanted)}  # what the file means: alpha / 4
    wrong = {n for n in real if real[n] != want[n]}
    assert wrong == {wanted[0]} and got.strength == "wrong"  # the attention projection's alpha is keyed elsewhere


def test_kit_rule_agrees_with_lora_load_and_check_fits(tiny_sd15, rank4_alpha8, tmp_path):
    path, _ = rank4_alpha8
    unet = backends.load_backend(tiny_sd15, "cpu").unet
    keys, header, scalars = lr.read_file(path)
    kit = by_loader(lr.readings(keys, header, "sd15", backends.module_names(tiny_sd15), scalars))[lr.KIT]
    assert len(lora.check_fits(unet, lora.load(path))) == kit.applied == kit.total and kit.strength == "right"
    other = make_tiny_pipeline("sdxl", tmp_path / "sdxl")
    kit = by_loader(lr.readings(keys, header, "sdxl", backends.module_names(other), scalars))[lr.KIT]
    with pytest.raises(lora.LoraMismatchError):
        lora.check_fits(backends.load_backend(other, "cpu").unet, lora.load(path))
    assert kit.applied == 0 and "refuses" in kit.why


def test_readings_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        lr.readings({}, {}, "sd3", [])
