"""Kit LoRA files: safetensors in diffusers key names, loadable by diffusers' own loader."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from difflora_kit import backends, diffusion, lora, sample
from difflora_kit.config import SampleConfig, TrainConfig
from difflora_kit.pair import prepare_base
from difflora_kit.toy import model


def test_file_round_trip_keeps_tensors_config_and_metadata(tiny_pair_loras, tmp_path):
    result, row, cfg = tiny_pair_loras
    path = tmp_path / "lora2.safetensors"
    lora.save(path, result.lora2)
    back = lora.load(path)
    assert back.tensors.keys() == result.lora2.tensors.keys()
    assert all(torch.equal(back.tensors[k], result.lora2.tensors[k]) for k in back.tensors)
    assert back.rank == cfg.rank and back.alpha == cfg.alpha
    assert back.meta["stage"] == "2" and back.meta["preset_digest"] == result.lora1.digest()
    assert back.meta["kit_version"] and back.meta["image_digest"] and back.meta["base_digest"]
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in back.tensors)
    assert not list(tmp_path.glob("*.partial"))


def test_diffusers_loader_reproduces_the_kits_output(tiny_pair_loras, tmp_path):
    result, row, cfg = tiny_pair_loras
    path = tmp_path / "lora1.safetensors"
    lora.save(path, result.lora1)
    folder = backends.resolve("toy")

    # diffusers, on its own: the plain model + load_lora_adapter from the file
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="kit")

    # the kit: full-precision base with the LoRA fused in (W + alpha/r B A), and the kit's sweep
    fused = prepare_base("toy", TrainConfig(eight_bit=False))
    lora.fuse_into(fused.unet, result.lora1)

    states = fused.encode_prompts([row["prompt"]])
    x = diffusion.start_noise([3], fused.latent_shape)
    t = torch.tensor([500])
    with torch.no_grad():
        ours = fused.denoiser(x, t, states)
        theirs = unet(x, t, states).sample
        plain = UNet2DConditionModel.from_pretrained(folder / "unet").eval()(x, t, states).sample
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)

    full = prepare_base("toy", TrainConfig(eight_bit=False))
    kit_images = sample.sweep(full, result.lora1, [row["prompt"]], [0], [1.0], SampleConfig(steps=6))[0, 0, 0]
    fused_images = fused.generate([row["prompt"]], [0], steps=6)[0]
    np.testing.assert_allclose(kit_images, fused_images, atol=2e-4)


def test_preset_for_another_base_names_the_missing_keys(tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    tensors = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in result.lora1.tensors.items()}
    alien = lora.LoraFile(tensors, result.lora1.config, {"base": "some-other-model"})
    base = prepare_base("toy", TrainConfig(eight_bit=False))
    try:
        lora.fuse_into(base.unet, alien)
    except lora.LoraMismatchError as e:
        assert "down_blocks.7" in str(e) and "some-other-model" in str(e)
    else:
        raise AssertionError("a LoRA for another base was fused without complaint")


def test_delta_weight_matches_peft_merge_on_a_conv_and_a_linear():
    torch.manual_seed(0)
    unet = model.build_unet()
    lora.attach(unet, rank=4, alpha=8, targets=("conv1", "to_q"), name="t")
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    tensors, config = lora.adapter_state(unet, "t")
    lf = lora.LoraFile(tensors, config, {})
    expected = {n: d for n, d in lora.module_deltas(lf).items()}
    before = {n: m.base_layer.weight.detach().clone() for n, m in unet.named_modules() if n in expected}
    from peft.tuners.lora import LoraLayer

    for n, m in unet.named_modules():
        if isinstance(m, LoraLayer) and n in expected:
            m.merge(adapter_names=["t"])
            torch.testing.assert_close(m.base_layer.weight - before[n], expected[n], atol=1e-6, rtol=1e-5)


def small_lora(meta: dict) -> lora.LoraFile:
    """A random rank-2 LoRA on the toy denoiser's to_q projections (no training)."""
    torch.manual_seed(0)
    unet = model.build_unet()
    lora.attach(unet, rank=2, alpha=4, targets=("to_q",), name="t")
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    tensors, config = lora.adapter_state(unet, "t")
    return lora.LoraFile(tensors, config, meta)


def test_load_matching_loads_only_a_lora_with_the_wanted_settings(tmp_path):
    meta = {"stage": 1, "base": "toy", "rank": 2, "alpha": 4.0, "lr": 1e-4, "prompt": "a red circle"}
    path = tmp_path / "lora1.safetensors"
    lora.save(path, small_lora(meta))
    plain = lora.load(path)

    # match: the same LoRA as lora.load (values compared as the file stores them, strings, or as numbers)
    for wanted in ({}, {k: str(v) for k, v in meta.items()}, meta, {"rank": 2.0, "alpha": 4, "stage": "1"}):
        got, why = lora.load_matching(path, wanted)
        assert why == "" and got is not None, wanted
        assert got.tensors.keys() == plain.tensors.keys()
        assert all(torch.equal(got.tensors[k], plain.tensors[k]) for k in plain.tensors)
        assert got.config == plain.config and got.meta == plain.meta

    # a setting differs: None, and the reason names it with both values
    got, why = lora.load_matching(path, {**meta, "lr": 1e-3, "prompt": "a red circle"})
    assert got is None and "lr=0.0001 (wanted 0.001)" in why and "prompt" not in why
    got, why = lora.load_matching(path, {"stage": "2"})
    assert got is None and "stage=1 (wanted 2)" in why
    got, why = lora.load_matching(path, {"seed": 0})  # a setting the file does not record differs too
    assert got is None and "seed=(missing)" in why

    # no file, or not a LoRA file: None and why, no exception
    got, why = lora.load_matching(tmp_path / "nothing.safetensors", meta)
    assert got is None and "does not exist" in why
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    got, why = lora.load_matching(broken, meta)
    assert got is None and why.startswith("unreadable LoRA file") and str(broken) in why


def test_a_lora_file_with_nan_is_refused_naming_the_file(tmp_path, capsys):
    """A preset LoRA holding NaN used to surface as 'the training loss became nan ... lower the learning
    rate'; now loading it names the file and the cause, and `difflora train` stops before training."""
    from difflora_kit import cli

    good = lora.LoraFile({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.zeros(3, 2)},
                         {"r": 2, "lora_alpha": 2}, {"stage": "1"})
    bad = lora.LoraFile({**good.tensors, "unet.a.lora_B.weight": torch.tensor([[0.0, float("nan")]] * 3)}, good.config, good.meta)
    lora.save(tmp_path / "good.safetensors", good)
    lora.save(tmp_path / "bad.safetensors", bad)
    assert lora.load(tmp_path / "good.safetensors").rank == 2
    with pytest.raises(lora.NonFiniteLoraError, match=r"bad\.safetensors holds NaN or infinite values in 1 of its 2"):
        lora.load(tmp_path / "bad.safetensors")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = cli.main(["train", str(image), "--prompt", "a red circle", "--out", str(tmp_path / "l2.safetensors"),
                     "--preset-lora", str(tmp_path / "bad.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.safetensors holds NaN" in err and not (tmp_path / "l2.safetensors").exists()
