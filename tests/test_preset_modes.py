"""The three ways LoRA 1 enters the base in step 2 (difflora_kit.preset): fuse, requant, adapter.

A preset with a large random B (a trained LoRA 1 is that strong) so that rounding and mistakes show.
"""

import numpy as np
import pytest
import torch

from difflora_kit import backends, cli, lora, preset, quant, sample
from difflora_kit.config import SampleConfig, TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.pair import prepare_base
from difflora_kit.toy.pairs import read_pairs
from difflora_kit.train import ADAPTER, train_lora

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def strong_preset():
    unet = backends.load_backend("toy").unet
    torch.manual_seed(0)
    lora.attach(unet, 8, 8, TrainConfig().targets, ADAPTER)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tensors, config = lora.adapter_state(unet, ADAPTER)
    return lora.LoraFile(tensors, config, {"stage": "1"})


def _linear_weights(unet, names):
    return {n: unet.get_submodule(n).weight.detach().float().clone() for n in names
            if type(unet.get_submodule(n)) is torch.nn.Linear}


@pytest.fixture(scope="module")
def reference(strong_preset):
    """Full-precision W, the int8 base Q(W) dequantized, and the preset's exact update D, per linear."""
    fp = backends.load_backend("toy").unet
    W = _linear_weights(fp, strong_preset.modules())
    q = quant.quantize_linears(fp)
    QW = {n: quant.dequantized_weight(q.get_submodule(n)) for n in W}
    D = {n: d for n, d in lora.module_deltas(strong_preset, 0.7).items() if n in W}
    return W, QW, D


@pytest.mark.parametrize("mode,start", [("fuse", 0), ("requant", 1), ("adapter", 1)])
def test_each_mode_rounds_the_merged_weight_at_most_once(strong_preset, reference, mode, start):
    """fuse: Q(W + D); requant: Q(Q(W) + D); adapter: Q(W) + D exactly (what step 1 trained on)."""
    W, QW, D = reference
    unet = preset.apply_preset(backends.load_backend("toy").unet, strong_preset, 0.7, mode)
    base = (W, QW)[start]
    got = preset.effective_deltas(unet, base)  # W_eff - base
    assert set(got) == set(D) and len(D) > 5
    for name in D:
        err = (got[name] - D[name]).abs()  # |W_eff - (base + D)|
        if mode == "adapter":
            assert err.max() < 1e-5, name
        else:
            layer = unet.get_submodule(name)
            half_step = quant.int8_state(layer)[1][:, None] / 127 / 2  # half an int8 step of each row
            assert (err <= half_step * 1.001 + 1e-7).all(), name
            assert (err > 0).any()  # it did round


def test_modes_put_the_preset_into_the_denoiser(strong_preset):
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([700, 200])
    fp = backends.load_backend("toy")
    states = fp.encode_prompts([PROMPT]).expand(2, -1, -1)
    with torch.no_grad():
        plain = quant.quantize_linears(backends.load_backend("toy").unet)
        without = plain(x, t, states, return_dict=False)[0]
        exact = preset.apply_preset(fp.unet, strong_preset, 0.7, eight_bit=False)(x, t, states, return_dict=False)[0]
        for mode in preset.PRESET_MODES:
            unet = preset.apply_preset(backends.load_backend("toy").unet, strong_preset, 0.7, mode)
            out = unet(x, t, states, return_dict=False)[0]
            assert (out - exact).norm() < 0.1 * (without - exact).norm(), mode


def test_adapter_mode_trains_lora2_beside_a_frozen_preset_and_sampling_keeps_it(strong_preset):
    cfg = TrainConfig(steps=3, lr=1e-2, preset_mode="adapter", preset_scale=0.7)
    backend = prepare_base("toy", cfg, strong_preset)
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    result = train_lora(backend, image, PROMPT, cfg, progress=False)
    assert set(result.lora.tensors) == set(strong_preset.tensors)  # LoRA 2 only, same targets
    assert any(v.abs().max() > 0 for k, v in result.lora.tensors.items() if "lora_B" in k)  # it trained
    frozen, _ = lora.adapter_state(backend.unet, preset.PRESET_ADAPTER)  # the preset after training
    assert set(frozen) == set(strong_preset.tensors)
    for key, value in strong_preset.tensors.items():
        assert torch.equal(frozen[key], value * 0.7 if ".lora_B." in key else value), key
    # sampling with LoRA 2 at strength 0 is base + LoRA 1 (the preset stays on), not the bare base
    backend.unet.delete_adapters(ADAPTER)  # the trained copy; sweep loads LoRA 2 from the file
    cfg_s = SampleConfig(steps=3)
    with_l2 = sample.sweep(backend, result.lora, [PROMPT], [0], [0.0], cfg_s)
    preset_only = sample.sweep(backend, None, [PROMPT], [0], [1.0], cfg_s)
    bare = sample.sweep(prepare_base("toy", TrainConfig()), None, [PROMPT], [0], [1.0], cfg_s)
    fused = sample.sweep(prepare_base("toy", TrainConfig(preset_scale=0.7), strong_preset), None, [PROMPT], [0], [1.0], cfg_s)
    np.testing.assert_allclose(with_l2, preset_only, atol=1e-5)
    assert np.abs(preset_only - fused).max() < 0.3 * np.abs(preset_only - bare).max()


def test_int8_base_keeps_no_full_precision_copy(strong_preset):
    for mode in ("fuse", "requant"):
        backend = backends.load_backend("toy")
        unet = preset.apply_preset(backend.unet, strong_preset, 1.0, mode)
        unet(torch.randn(1, 3, 32, 32), torch.tensor([10]), backend.encode_prompts([PROMPT]))  # bnb moves CB to state
        storage = quant.int8_linear_storage(unet)
        assert storage["held"] == storage["ideal"], (mode, storage)


def test_bad_preset_mode_is_refused_clearly(tmp_path, capsys, strong_preset):
    with pytest.raises(ValueError, match="fuse, requant, adapter"):
        TrainConfig(preset_mode="merge")
    with pytest.raises(ValueError, match="needs the 8-bit base"):
        TrainConfig(preset_mode="requant", eight_bit=False)
    l1 = tmp_path / "l1.safetensors"
    lora.save(l1, strong_preset)
    out = tmp_path / "l2.safetensors"
    image2 = read_pairs(DEFAULT_PAIRS)[0]["image2"]
    code = cli.main(["train", image2, "--prompt", PROMPT, "--out", str(out),
                     "--preset-lora", str(l1), "--preset-mode", "merge"])
    assert code == 2 and "preset_mode must be one of" in capsys.readouterr().err and not out.exists()
