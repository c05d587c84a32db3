"""kohya keys of FLUX LoRAs: BFL's fused linears (q, k, v in one; a single block's q, k, v and MLP in one).

Oracles: diffusers' own FLUX kohya converter (FluxPipeline.lora_state_dict, load_lora_weights) and the
weight changes themselves. diffusers' converter hard-codes FLUX.1's widths for a single block's linear1
(3072, 3072, 3072, 12288), so linear1 goes through it at those widths (no model), and the tiny pipeline's
end-to-end check through load_lora_weights covers every other module."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difflora_kit import backends, cli, kohya, lora, sample
from difflora_kit.config import TrainConfig
from difflora_kit.pair import prepare_base
from difflora_kit.tiny_models import make_tiny_pipeline

FLUX1_DIM = 3072  # FLUX.1's hidden width: a single block's linear1 is (3 * 3072 + 4 * 3072, 3072)
LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return make_tiny_pipeline("flux", tmp_path_factory.mktemp("flux") / "base")


@pytest.fixture(scope="module")
def random_lora(tiny_flux):
    """A LoRA on the tiny FLUX transformer's default targets with random A and B, and one part of a fused
    linear (the text stream's add_k_proj) at rank 2 with its own alpha."""
    backend = backends.load_backend(tiny_flux, "cpu")
    torch.manual_seed(0)
    lora.attach(backend.unet, 4, 2, backend.default_targets, "difflora")
    tensors, config = lora.adapter_state(backend.unet, "difflora")
    tensors = {k: torch.randn_like(v) * 0.1 for k, v in tensors.items()}
    odd = "transformer_blocks.0.attn.add_k_proj"
    tensors[f"unet.{odd}.lora_A.weight"] = tensors[f"unet.{odd}.lora_A.weight"][:2]
    tensors[f"unet.{odd}.lora_B.weight"] = tensors[f"unet.{odd}.lora_B.weight"][:, :2]
    config = {**config, "rank_pattern": {odd: 2}, "alpha_pattern": {odd: 3.0}}
    return lora.LoraFile(tensors, config, {"stage": "2", "base": str(tiny_flux), "denoiser": "transformer"})


def _delta_on(A, B, scale, x):
    """scale * B @ A @ x without forming B @ A: (out, r) @ ((r, in) @ (in, k)) -> (out, k)."""
    return scale * B.float() @ (A.float() @ x)


def _assert_same_deltas(got: lora.LoraFile, want: lora.LoraFile):
    """The same modules and, per module, the same weight change (alpha / r) B @ A to 1e-6."""
    want_deltas, got_deltas = lora.module_deltas(want), lora.module_deltas(got)
    assert set(got_deltas) == set(want_deltas)
    for name, delta in want_deltas.items():
        torch.testing.assert_close(got_deltas[name], delta, rtol=0, atol=1e-6)


# ---- the converter on plain dicts (no model) ----------------------------------------------------
def test_fused_export_is_what_diffusers_flux_converter_maps_back_at_flux1_widths():
    torch.manual_seed(0)
    d = FLUX1_DIM

    def module(out, inp, r=2):
        return torch.randn(r, inp) * 0.1, torch.randn(out, r) * 0.1

    modules = {"transformer_blocks.0.attn.to_q": module(d, d), "transformer_blocks.0.attn.to_k": module(d, d),
               "transformer_blocks.0.attn.to_v": module(d, d, r=1),  # padded to rank 2 inside the fused qkv
               "transformer_blocks.0.attn.add_q_proj": module(d, d), "transformer_blocks.0.attn.add_k_proj": module(d, d),
               "transformer_blocks.0.ff.net.2": module(d, 4 * d), "single_transformer_blocks.0.proj_out": module(d, 5 * d),
               **{f"single_transformer_blocks.0.{p}": module(4 * d if p == "proj_mlp" else d, d) for p in LINEAR1}}
    scalings = {name: 0.3 + 0.2 * i for i, name in enumerate(modules)}
    tensors, header = kohya.to_kohya(modules, scalings, {"stage": "2"})
    assert header["ss_network_module"] == "networks.lora_flux" and header["difflora.stage"] == "2"
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if k.endswith(".lora_up.weight")}
    assert shapes == {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (3 * d, 6),
                      "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": (3 * d, 6),  # add_v_proj: a zero block
                      "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight": (d, 2),
                      "lora_unet_single_blocks_0_linear1.lora_up.weight": (7 * d, 8),
                      "lora_unet_single_blocks_0_linear2.lora_up.weight": (d, 2)}
    for key in shapes:  # alpha = rank everywhere: scale 1, each module's scale folded into lora_up
        assert float(tensors[key.replace(".lora_up.weight", ".alpha")]) == tensors[key].shape[1]

    from diffusers import FluxPipeline

    theirs = FluxPipeline.lora_state_dict(dict(tensors))  # diffusers' kohya -> diffusers conversion
    back = lora.LoraFile(*kohya.from_kohya(tensors, modules))  # names resolved against the LoRA's own
    assert set(back.modules()) == set(modules)  # the left-out add_v_proj comes back as no module
    x = torch.randn(5 * d, 3)
    for name, (A, B) in modules.items():
        want = _delta_on(A, B, scalings[name], x[: A.shape[1]])
        diffusers_delta = _delta_on(theirs[f"transformer.{name}.lora_A.weight"], theirs[f"transformer.{name}.lora_B.weight"],
                                    1.0, x[: A.shape[1]])
        torch.testing.assert_close(diffusers_delta, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(_delta_on(*back.modules()[name], back.scaling(name), x[: A.shape[1]]), want,
                                   rtol=0, atol=1e-6)
    assert not theirs["transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight"].any()


def test_a_lora_trained_in_kohya_on_the_fused_linear_imports_exactly():
    """lora_up not block-diagonal: each part gets the whole lora_down and its rows of lora_up (rank 4, alpha 2)."""
    torch.manual_seed(0)
    d, rank = 8, 4
    down, up = torch.randn(rank, d), torch.randn(7 * d, rank)  # q, k, v: d rows each; proj_mlp: 4 d
    names = [f"single_transformer_blocks.0.{p}" for p in (*LINEAR1, "proj_out")]
    key = "lora_unet_single_blocks_0_linear1"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    back = lora.LoraFile(*kohya.from_kohya(tensors, names))
    assert sorted(back.modules()) == sorted(names[:4]) and back.rank == rank and back.alpha == 2.0
    parts = [lora.module_deltas(back)[f"single_transformer_blocks.0.{p}"] for p in LINEAR1]
    torch.testing.assert_close(torch.cat(parts), 2.0 / rank * up @ down, rtol=0, atol=1e-6)  # BFL's rows: q, k, v, mlp

    tensors[f"{key}.lora_up.weight"] = up[: 6 * d]  # a 6 d-wide linear1 is not a d-wide FLUX's
    with pytest.raises(ValueError, match=f"{key}: lora_up has 48 rows"):
        kohya.from_kohya(tensors, names)


def test_modules_kohyas_flux_keys_do_not_name_are_a_clear_error():
    A, B = torch.zeros(2, 8), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="no kohya name, e.g. x_embedder"):
        kohya.to_kohya({"transformer_blocks.0.attn.to_q": (A, B), "x_embedder": (A, B)}, {}, {})
    with pytest.raises(ValueError, match="lora_unet_img_in"):
        kohya.from_kohya({"lora_unet_img_in.lora_down.weight": A, "lora_unet_img_in.lora_up.weight": B},
                         ["x_embedder", "transformer_blocks.0.attn.to_q"])


# ---- the tiny FLUX pipeline ---------------------------------------------------------------------
def test_kohya_export_loads_in_diffusers_and_gives_the_same_output(tiny_flux, random_lora, tmp_path):
    from diffusers import FluxPipeline

    path = tmp_path / "kohya.safetensors"
    lora.save_kohya(path, random_lora)
    with safe_open(str(path), "pt") as f:
        ranks = {k[: -len(".lora_down.weight")]: f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("down.weight")}
    blocks = [f"double_blocks_0_{s}" for s in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_qkv",
                                               "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")]
    assert ranks == {**{f"lora_unet_{b}": 12 if b.endswith("qkv") else 4 for b in blocks},
                     "lora_unet_single_blocks_0_linear1": 16, "lora_unet_single_blocks_0_linear2": 4}

    # diffusers reads linear1 only at FLUX.1's widths (the first test): here the LoRA without it
    kept = {k: v for k, v in random_lora.tensors.items() if not any(f"single_transformer_blocks.0.{p}." in k for p in LINEAR1)}
    partial = lora.LoraFile(kept, {**random_lora.config, "target_modules": sorted(lora.LoraFile(kept, {}, {}).modules())},
                            random_lora.meta)
    lora.save_kohya(path, partial)
    pipe = FluxPipeline.from_pretrained(tiny_flux, use_safetensors=True)
    pipe.load_lora_weights(str(path))  # diffusers' own kohya FLUX conversion
    theirs = backends.load_backend(tiny_flux, "cpu", denoiser=pipe.transformer)
    kit = prepare_base(tiny_flux, TrainConfig(eight_bit=False))
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 700])
    states = kit.encode_prompts(["a red circle", "a cat"])
    with torch.no_grad(), sample.lora_loaded(kit.unet, partial):
        want = kit.denoiser(x, t, states)
    with torch.no_grad():
        got, plain = theirs.denoiser(x, t, states), kit.denoiser(x, t, states)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3  # the LoRA changes the output


def test_kohya_import_round_trips_and_converts_through_the_cli(tiny_flux, random_lora, tmp_path):
    path = tmp_path / "kohya.safetensors"
    lora.save_kohya(path, random_lora)
    names = lambda: backends.module_names(tiny_flux)  # noqa: E731
    back = lora.load(path, module_names=names)
    _assert_same_deltas(back, random_lora)
    assert back.meta["denoiser"] == "transformer" and back.meta["stage"] == "2" and back.rank == 4
    assert {back.scaling(n) for n in back.modules()} == {1.0}  # scales folded in, rank padded to 4

    # the CLI: the kit's file to kohya keys and back to FluxPipeline's "transformer." keys
    kit_file, kohya_file, again = tmp_path / "kit.safetensors", tmp_path / "k2.safetensors", tmp_path / "again.safetensors"
    lora.save(kit_file, random_lora)
    assert cli.main(["convert", str(kit_file), "--to", "kohya", "--out", str(kohya_file), "--base", str(tiny_flux)]) == 0
    assert cli.main(["convert", str(kohya_file), "--to", "diffusers", "--out", str(again), "--base", str(tiny_flux)]) == 0
    with safe_open(str(again), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    _assert_same_deltas(lora.load(again), random_lora)


def test_a_flux_kohya_lora_for_another_model_is_a_clear_error(tiny_flux, random_lora, tmp_path, capsys):
    path = tmp_path / "kohya.safetensors"
    lora.save_kohya(path, random_lora)
    with safe_open(str(path), "pt") as f:  # the same LoRA one block further down: a FLUX with more blocks
        tensors = {k.replace("double_blocks_0_", "double_blocks_1_"): f.get_tensor(k) for k in f.keys()}
    other = tmp_path / "deeper.safetensors"
    save_file(tensors, str(other))
    with pytest.raises(lora.LoraMismatchError, match="not in this base's denoiser, e.g. lora_unet_double_blocks_1_"):
        lora.load(other, module_names=lambda: backends.module_names(tiny_flux))
    with pytest.raises(lora.LoraMismatchError, match="another model"):  # a FLUX LoRA on a UNet
        lora.load(path, module_names=lambda: backends.module_names("toy"))
    out = tmp_path / "out.safetensors"
    assert cli.main(["convert", str(other), "--to", "diffusers", "--out", str(out), "--base", str(tiny_flux)]) == 2
    assert "lora_unet_double_blocks_1_" in capsys.readouterr().err
