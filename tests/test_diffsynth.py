"""DiffSynth-Studio's native LoRA files in and out (difflora_kit/diffsynth.py), on the tiny FLUX and Z-Image models.

Oracles: DiffSynth-Studio's own key handling and FLUX weight converter, transcribed from its published source
into tests/diffsynth_keys.py (its loader fuses the exported file into DiffSynth-converted weights; that must equal
diffusers' weights with the kit's LoRA merged, then converted), and the weight changes themselves."""

import pytest
import torch

import diffsynth_keys as dk
from difflora_kit import backends, diffsynth, lora
from difflora_kit.tiny_models import make_tiny_pipeline

FLUX_EXTRA = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",  # beyond the
              "context_embedder", "proj_out", "time_text_embed.timestep_embedder.linear_1")  # default targets
FLUX_ODD = ("transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.attn.to_v")  # rank 2 in fused linears
ZIMAGE_ODD = ("layers.0.attention.to_k",)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return make_tiny_pipeline("flux", tmp_path_factory.mktemp("flux") / "base")


@pytest.fixture(scope="module")
def tiny_zimage(tmp_path_factory):
    return make_tiny_pipeline("zimage", tmp_path_factory.mktemp("zimage") / "base")


def random_lora(base, targets, odd) -> lora.LoraFile:
    """A LoRA on `base`'s denoiser with random A and B at rank 4, alpha 8 (scale 2), and the modules `odd` at
    rank 2, alpha 3 (scale 1.5): peft's rank_pattern / alpha_pattern (the config set here, whatever
    adapter_state writes)."""
    backend = backends.load_backend(base, "cpu")
    torch.manual_seed(0)
    lora.attach(backend.unet, 4, 8, (*backend.default_targets, *targets), "difflora")
    tensors, config = lora.adapter_state(backend.unet, "difflora")
    tensors = {k: torch.randn_like(v) * 0.1 for k, v in tensors.items()}
    for name in odd:
        tensors[f"unet.{name}.lora_A.weight"] = tensors[f"unet.{name}.lora_A.weight"][:2]
        tensors[f"unet.{name}.lora_B.weight"] = tensors[f"unet.{name}.lora_B.weight"][:, :2]
    config = {**config, "r": 4, "lora_alpha": 8.0, "rank_pattern": {n: 2 for n in odd},
              "alpha_pattern": {n: 3.0 for n in odd}}
    return lora.LoraFile(tensors, config, {"stage": "2", "base": str(base), "denoiser": "transformer"})


@pytest.fixture(scope="module")
def flux_lora(tiny_flux):
    return random_lora(tiny_flux, FLUX_EXTRA, FLUX_ODD)


@pytest.fixture(scope="module")
def zimage_lora(tiny_zimage):
    return random_lora(tiny_zimage, (), ZIMAGE_ODD)


def export(lora_file: lora.LoraFile, family: str) -> dict[str, torch.Tensor]:
    modules = lora_file.modules()
    return diffsynth.to_diffsynth(modules, {n: lora_file.scaling(n) for n in modules}, family)


def transformer(base, lora_file=None):
    """The base's diffusers transformer (FluxTransformer2DModel, ZImageTransformer2DModel), the LoRA merged in."""
    model = backends.load_backend(base, "cpu").unet
    if lora_file is not None:
        lora.fuse_into(model, lora_file)
    return model


def assert_same_deltas(got: lora.LoraFile, want: lora.LoraFile):
    """The same modules and, per module, the same weight change (alpha / r) B @ A to 1e-6."""
    want_deltas, got_deltas = lora.module_deltas(want), lora.module_deltas(got)
    assert set(got_deltas) == set(want_deltas)
    for name, delta in want_deltas.items():
        torch.testing.assert_close(got_deltas[name], delta, rtol=0, atol=1e-6)


def assert_close_weights(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


# ---- what DiffSynth-Studio's loaders do with the exported files -----------------------------------
def test_flux_export_fuses_in_diffsynths_flux_pipeline_as_the_lora_does_in_diffusers(tiny_flux, flux_lora):
    tensors = export(flux_lora, "flux")
    base = dk.flux_weights(transformer(tiny_flux).state_dict())
    d = transformer(tiny_flux).config.num_attention_heads * transformer(tiny_flux).config.attention_head_dim
    for kind, table in (("blocks", dk.FLUX_DOUBLE_LINEARS), ("single_blocks", dk.FLUX_SINGLE_LINEARS)):
        block = {k[len(f"{kind}.0.") : -len(".weight")]: tuple(v.shape) for k, v in base.items()
                 if k.startswith(f"{kind}.0.") and k.endswith(".weight") and v.dim() == 2}
        assert block == {m: (o * d, i * d) for m, (o, i) in table.items()}  # the converter's = FluxDiT's blocks

    modules = {diffsynth.module_of(k) for k in tensors}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".default." not in k for k in tensors)
    assert {m.split(".", 2)[2] for m in modules if m.startswith("blocks.")} == set(dk.FLUX_DOUBLE_LINEARS)
    assert {m.split(".", 2)[2] for m in modules if m.startswith("single_blocks.")} == set(dk.FLUX_SINGLE_LINEARS)
    assert {m for m in modules if "blocks." not in m} == {"final_norm_out.linear", "x_embedder", "context_embedder",
                                                         "final_proj_out", "time_embedder.timestep_embedder.0"}
    for m in modules:  # each one a weight of DiffSynth's FluxDiT, and B @ A its shape
        A, B = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
        assert (B.shape[0], A.shape[1]) == tuple(base[f"{m}.weight"].shape) and A.shape[0] == B.shape[1]
    assert tensors["blocks.0.attn.b_to_qkv.lora_A.weight"].shape == (12, d)  # add_k_proj's rank 2 padded to 4

    fused, count = dk.load_lora(base, tensors, "flux")
    assert count == len(modules)  # no module skipped
    want = dk.flux_weights(transformer(tiny_flux, flux_lora).state_dict())  # merged in diffusers, then converted
    assert_close_weights(fused, want)
    assert max((want[k] - base[k]).abs().max() for k in base) > 1e-2  # the LoRA changes the weights
    # why FLUX is written without `.default.`: DiffSynth's FLUX loader fuses nothing with it
    infix = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in tensors.items()}
    assert dk.load_lora(base, infix, "flux")[1] == 0


def test_every_flux_linear_has_a_diffsynth_name(tiny_flux):
    names = backends.module_names(tiny_flux)
    linears = [n for n, m in transformer(tiny_flux).named_modules() if isinstance(m, torch.nn.Linear)]
    covered = {p for parts in diffsynth.flux_layout(names).values() for p in parts}
    assert set(linears) <= covered and len(linears) > 20


def test_zimage_export_fuses_in_diffsynth_as_the_lora_does_in_diffusers(tiny_zimage, zimage_lora):
    tensors = export(zimage_lora, "zimage")
    base = transformer(tiny_zimage).state_dict()  # ZImageDiT's names and shapes are diffusers' own
    for kind in ("layers.0.", "noise_refiner.0.", "context_refiner.0."):
        block = {k[len(kind) : -len(".weight")] for k, v in base.items() if k.startswith(kind) and v.dim() == 2}
        assert block == {*dk.ZIMAGE_BLOCK_LINEARS, *((dk.ZIMAGE_MODULATION,) if kind != "context_refiner.0." else ())}
    assert tensors and all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in tensors)
    assert {diffsynth.module_of(k) for k in tensors} == set(zimage_lora.modules())  # one to one

    fused, count = dk.load_lora(base, tensors, "zimage")
    assert count == len(zimage_lora.modules())
    assert_close_weights(fused, transformer(tiny_zimage, zimage_lora).state_dict())
    kit_keys = {f"transformer.{k[len('unet.'):]}": v for k, v in zimage_lora.tensors.items()}  # the kit's own file
    assert dk.load_lora(base, kit_keys, "zimage")[1] == 0  # why the kit writes this format for DiffSynth


# ---- round trips and imports ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_kit_to_diffsynth_to_kit_gives_the_same_weight_changes(family, request):
    base, kit = request.getfixturevalue(f"tiny_{family}"), request.getfixturevalue(f"{family}_lora")
    tensors = export(kit, family)
    assert diffsynth.is_diffsynth(tensors) and diffsynth.family_of(tensors) == family
    assert not diffsynth.is_diffsynth({f"transformer.{k[5:]}" for k in kit.tensors})  # the kit's file is not one
    back = lora.LoraFile(*diffsynth.from_diffsynth(tensors, backends.module_names(base), diffsynth.header(kit.meta)))
    assert_same_deltas(back, kit)
    assert back.meta == {**kit.meta, "imported_from": "diffsynth"}  # "denoiser": "transformer" included
    assert {kit.scaling(n) for n in kit.modules()} == {2.0, 1.5}
    assert {back.scaling(n) for n in back.modules()} == {1.0} and back.rank == 4  # scales folded into B


def test_a_lora_trained_in_diffsynth_on_the_fused_linears_imports_exactly(tiny_flux):
    """B not block diagonal: each part gets the whole A and its rows of B, whatever the rank; an alpha tensor
    (DiffSynth's deprecated form) is read as GeneralLoRALoader reads it: alpha / rank."""
    torch.manual_seed(0)
    names, d = backends.module_names(tiny_flux), 32
    qkv, qkv_mlp, ff = "blocks.0.attn.a_to_qkv", "single_blocks.0.to_qkv_mlp", "blocks.0.ff_a.0"
    A1, B1, A2, B2 = torch.randn(5, d), torch.randn(3 * d, 5), torch.randn(4, d), torch.randn(7 * d, 4)
    tensors = {f"{qkv}.lora_A.default.weight": A1, f"{qkv}.lora_B.default.weight": B1,
               f"{qkv}.alpha": torch.tensor(2.0),
               f"{qkv_mlp}.lora_A.default.weight": A2, f"{qkv_mlp}.lora_B.default.weight": B2,
               f"{ff}.lora_A.weight": torch.randn(3, d), f"{ff}.lora_B.weight": torch.randn(4 * d, 3)}
    assert diffsynth.is_diffsynth(tensors) and diffsynth.family_of(tensors) == "flux"
    back = lora.LoraFile(*diffsynth.from_diffsynth(tensors, names))
    deltas = lora.module_deltas(back)
    double = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    single = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert set(deltas) == {*double, *single, "transformer_blocks.0.ff.net.0.proj"}
    torch.testing.assert_close(torch.cat([deltas[n] for n in double]), 2.0 / 5 * B1 @ A1, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([deltas[n] for n in single]), B2 @ A2, rtol=0, atol=1e-5)
    assert back.meta["imported_from"] == "diffsynth" and back.meta["denoiser"] == "transformer"


def test_a_part_the_lora_leaves_out_is_a_zero_block_and_comes_back_as_no_module():
    torch.manual_seed(0)
    d = 8
    modules = {f"transformer_blocks.0.attn.{p}": (torch.randn(2, d), torch.randn(d, 2)) for p in ("to_q", "to_v")}
    tensors = diffsynth.to_diffsynth(modules, {n: 0.5 for n in modules}, "flux")
    B = tensors["blocks.0.attn.a_to_qkv.lora_B.weight"]  # (3 d, 6): k's rows and columns zero
    assert B.shape == (3 * d, 6) and not B[d : 2 * d].any() and not B[:, 2:4].any()
    back = lora.LoraFile(*diffsynth.from_diffsynth(tensors, [*modules, "transformer_blocks.0.attn.to_k"]))
    assert set(back.modules()) == set(modules)
    for name, (A, B) in modules.items():
        torch.testing.assert_close(lora.module_deltas(back)[name], 0.5 * B @ A, rtol=0, atol=1e-6)


# ---- clear errors ---------------------------------------------------------------------------------
def test_a_lora_for_another_model_is_a_clear_error(tiny_flux, tiny_zimage, flux_lora, zimage_lora):
    flux_file, zimage_file = export(flux_lora, "flux"), export(zimage_lora, "zimage")
    with pytest.raises(ValueError, match=r"not in this base's denoiser, e.g. blocks\.0\..*"
                                         r"a FLUX's; this base is a Z-Image"):
        diffsynth.from_diffsynth(flux_file, backends.module_names(tiny_zimage))
    with pytest.raises(ValueError, match=r"e.g. context_refiner\.0\..*a Z-Image's; this base is a FLUX"):
        diffsynth.from_diffsynth(zimage_file, backends.module_names(tiny_flux))
    deeper = {k.replace("blocks.0.", "blocks.1."): v for k, v in flux_file.items()}  # a FLUX with more blocks
    with pytest.raises(ValueError, match=r"blocks\.1\..*another model"):
        diffsynth.from_diffsynth(deeper, backends.module_names(tiny_flux))
    with pytest.raises(ValueError, match="1 keys are not DiffSynth LoRA keys .*, e.g. transformer.x_embedder.lora_A"):
        diffsynth.from_diffsynth({"transformer.x_embedder.lora_A": torch.zeros(1)}, backends.module_names(tiny_flux))


def test_a_fused_linear_without_all_its_parts_is_a_clear_error(tiny_flux):
    names, d = backends.module_names(tiny_flux), 32
    tensors = {"blocks.0.attn.a_to_qkv.lora_A.default.weight": torch.randn(4, d),
               "blocks.0.attn.a_to_qkv.lora_B.default.weight": torch.randn(2 * d, 4)}  # q and k only
    with pytest.raises(ValueError, match=r"a_to_qkv: lora_B has 64 rows where DiffSynth's fused to_q/to_k/to_v "
                                         r"linear of a 32-wide FLUX has 96 \(32 \+ 32 \+ 32\): "
                                         r"a part of to_q/to_k/to_v is missing"):
        diffsynth.from_diffsynth(tensors, names)
    del tensors["blocks.0.attn.a_to_qkv.lora_B.default.weight"]
    with pytest.raises(ValueError, match="a_to_qkv: the file has its lora_A but not its lora_B"):
        diffsynth.from_diffsynth(tensors, names)


def test_families_and_modules_diffsynth_has_no_names_for_are_clear_errors():
    A, B = torch.zeros(2, 8), torch.zeros(8, 2)

    def one(name):  # ({name: (A, B)}, {name: 1.0})
        return {name: (A, B)}, {name: 1.0}

    with pytest.raises(ValueError, match="DiffSynth-Studio has no 'difflora-toy' model"):
        diffsynth.to_diffsynth(*one("mid_block.attentions.0.proj_in"), "difflora-toy")
    with pytest.raises(ValueError, match="a FLUX transformer's modules, .* not a Z-Image LoRA"):
        diffsynth.to_diffsynth(*one("transformer_blocks.0.attn.to_q"), "zimage")
    with pytest.raises(ValueError, match="no DiffSynth FLUX name, e.g. transformer_blocks.0.attn.norm_q"):
        diffsynth.to_diffsynth(*one("transformer_blocks.0.attn.norm_q"), "flux")


def test_sd_and_sdxl_loras_keep_the_unets_module_names():
    """DiffSynth's SD 1.x and SDXL UNets name their modules as diffusers' UNet2DConditionModel: one to one,
    `.default.` infix, no "unet." prefix; a conv's 1x1 B as DiffSynth's loader squeezes it."""
    torch.manual_seed(0)
    modules = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (torch.randn(4, 8), torch.randn(8, 4)),
               "mid_block.attentions.0.proj_in": (torch.randn(2, 8, 1, 1), torch.randn(8, 2, 1, 1))}
    scalings = {n: 0.25 * (i + 1) for i, n in enumerate(modules)}
    tensors = diffsynth.to_diffsynth(modules, scalings, "sdxl")
    assert sorted(tensors) == sorted(f"{n}.lora_{x}.default.weight" for n in modules for x in "AB")
    assert diffsynth.is_diffsynth(tensors) and diffsynth.family_of(tensors) == "unet"
    weights = {f"{n}.weight": torch.zeros(B.shape[0], *A.shape[1:]) for n, (A, B) in modules.items()}
    fused, count = dk.load_lora(weights, tensors, "sdxl")
    assert count == 2
    back = lora.LoraFile(*diffsynth.from_diffsynth(tensors, [*modules, "conv_in", "down_blocks.0.resnets.0.conv1"]))
    assert "denoiser" not in back.meta  # a UNet's LoRA: the kit's "unet." keys
    for name, (A, B) in modules.items():
        want = lora.delta_weight(A, B, scalings[name])
        torch.testing.assert_close(fused[f"{name}.weight"], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(lora.module_deltas(back)[name], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_a_diffsynth_file_written_by_the_kit_reads_back_through_lora_load(family, request, tmp_path):
    """The file path a user takes: lora.save_diffsynth (what `difflora convert --to diffsynth` calls), then
    lora.load with the base's module names (as --base gives them): detected as DiffSynth's, same deltas,
    written back with the pipeline's "transformer." prefix."""
    from difflora_kit import lora_formats

    base, the_lora = request.getfixturevalue(f"tiny_{family}"), request.getfixturevalue(f"{family}_lora")
    path = tmp_path / "diffsynth.safetensors"
    lora.save_diffsynth(path, the_lora)
    tensors, header = lora.read_file(path)
    assert lora_formats.detect(tensors, header).key == "diffsynth"
    with pytest.raises(lora.LoraMismatchError, match="resolved against the base"):
        lora.load(path)  # its names need the base
    back = lora.load(path, module_names=lambda: backends.module_names(base))
    assert back.meta["imported_from"] == "diffsynth" and back.meta["denoiser"] == "transformer"
    assert_same_deltas(back, the_lora)
    lora.save(tmp_path / "kit.safetensors", back)
    assert all(k.startswith("transformer.") for k in lora.read_file(tmp_path / "kit.safetensors")[0])
