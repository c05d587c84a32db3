"""kohya keys: export a kit LoRA for ComfyUI/A1111, load it with diffusers' kohya loader, import it back."""

import pytest
import torch
from safetensors import safe_open

from difflora_kit import backends, cli, kohya, lora, sample
from difflora_kit.config import TrainConfig
from difflora_kit.pair import prepare_base
from difflora_kit.tiny_models import make_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return make_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "base")


@pytest.fixture(scope="module")
def random_lora(tiny_sd15):
    """A LoRA on the tiny SD 1.5 denoiser with random A and B, and a different rank on one module."""
    unet = backends.load_backend(tiny_sd15, "cpu").unet
    torch.manual_seed(0)
    lora.attach(unet, 4, 2, TrainConfig().targets, "difflora")
    tensors, config = lora.adapter_state(unet, "difflora")
    tensors = {k: torch.randn_like(v) * 0.1 for k, v in tensors.items()}
    odd = sorted(lora.LoraFile(tensors, config, {}).modules())[0]  # rank 2 and its own alpha there
    tensors[f"unet.{odd}.lora_A.weight"] = tensors[f"unet.{odd}.lora_A.weight"][:2]
    tensors[f"unet.{odd}.lora_B.weight"] = tensors[f"unet.{odd}.lora_B.weight"][:, :2]
    config = {**config, "rank_pattern": {odd: 2}, "alpha_pattern": {odd: 3.0}}
    return lora.LoraFile(tensors, config, {"stage": "2", "base": str(tiny_sd15)})


def test_kohya_keys_are_a_conversion_of_plain_dicts():
    """No model, no file: {module: (A, B)} -> kohya tensors -> diffusers-keyed tensors, the same weight changes."""
    torch.manual_seed(0)
    modules = {"mid_block.attentions.0.proj_in": (torch.randn(4, 6), torch.randn(5, 4)),  # linear, rank 4
               "down_blocks.0.resnets.0.conv1": (torch.randn(2, 3, 3, 3), torch.randn(7, 2, 1, 1))}  # conv, rank 2
    scalings = {"mid_block.attentions.0.proj_in": 0.5, "down_blocks.0.resnets.0.conv1": 1.5}
    tensors, header = kohya.to_kohya(modules, scalings, {"stage": "2"})
    assert header["ss_network_dim"] == "4" and header["difflora.stage"] == "2"
    back, config, meta = kohya.from_kohya(tensors, [*modules, "conv_in"], header)
    assert (config["r"], config["lora_alpha"], meta["stage"]) == (4, 4.0, "2")  # rank padded to 4, alpha / r = 1
    for name, (A, B) in modules.items():
        got = lora.delta_weight(back[f"unet.{name}.lora_A.weight"], back[f"unet.{name}.lora_B.weight"], 1.0)
        torch.testing.assert_close(got, lora.delta_weight(A, B, scalings[name]))
    with pytest.raises(ValueError, match="another model") as e:
        kohya.from_kohya(tensors, ["conv_in"])
    assert not isinstance(e.value, lora.LoraMismatchError)  # the kit's error is lora.load's


def test_kohya_export_loads_in_diffusers_and_gives_the_same_output(tiny_sd15, random_lora, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "kohya.safetensors"
    lora.save_kohya(path, random_lora)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, use_safetensors=True)
    pipe.load_lora_weights(str(path))  # diffusers' own kohya conversion
    kit = prepare_base(tiny_sd15, TrainConfig(eight_bit=False))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    states = kit.encode_prompts(["a red circle", "a cat"])
    with torch.no_grad(), sample.lora_loaded(kit.unet, random_lora):
        want = kit.denoiser(x, t, states)
    with torch.no_grad():
        got = pipe.unet(x, t, states).sample
        plain = kit.denoiser(x, t, states)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3


def test_kohya_import_round_trips_and_serves_as_a_preset(tiny_sd15, random_lora, tmp_path, capsys):
    path = tmp_path / "kohya.safetensors"
    lora.save_kohya(path, random_lora)
    back = lora.load(path, module_names=lambda: backends.module_names(tiny_sd15))
    want, got = lora.module_deltas(random_lora), lora.module_deltas(back)
    assert set(want) == set(got)
    assert random_lora.scaling(next(iter(random_lora.config["rank_pattern"]))) == 1.5  # the odd module
    assert {back.scaling(n) for n in got} == {1.0} and back.rank == 4  # scales folded in, rank padded to 4
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    with pytest.raises(lora.LoraMismatchError, match="kohya"):
        lora.load(path)  # no base to resolve the names against
    with pytest.raises(lora.LoraMismatchError, match="another model"):
        lora.load(path, module_names=lambda: backends.module_names("toy"))
    # the CLI: convert back to the kit's keys, and use the kohya file directly as step 2's preset
    out = tmp_path / "diffusers.safetensors"
    assert cli.main(["convert", str(path), "--to", "diffusers", "--out", str(out), "--base", str(tiny_sd15)]) == 0
    assert set(lora.load(out).modules()) == set(want)
    assert cli.main(["convert", str(path), "--to", "kohya", "--out", str(out), "--base", str(tiny_sd15)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("family, width, version", [("sd15", 32, "sd_v1"), ("sdxl", 32, "sdxl_base_v1-0"),
                                                    (None, 768, "sd_v1"), (None, 2048, "sdxl_base_v1-0"), (None, 32, "")])
def test_the_header_carries_kohyas_own_base_model_version(family, width, version, tmp_path):
    """AUTOMATIC1111 lists a LoRA whose ss_base_model_version does not start with "sdxl_" as SD 1: the
    kit writes sd-scripts' values, its family's (registry row) when recorded, else from the cross-attention width."""
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"unet.{name}.lora_A.weight": torch.randn(4, width), f"unet.{name}.lora_B.weight": torch.randn(16, 4)}
    meta = {"base": "stabilityai/some-hub-id", **({"family": family} if family else {})}
    lora.save_kohya(tmp_path / "k.safetensors", lora.LoraFile(tensors, {"r": 4, "lora_alpha": 4}, meta))
    assert lora.read_file(tmp_path / "k.safetensors")[1]["ss_base_model_version"] == version
