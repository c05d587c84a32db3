"""No command goes on with a LoRA of which modules are left out: none or only some fitting the base is
refused, saying how many, which and why (difflora_kit.lora_match, lora.check_fits)."""

import pytest
import torch

from difflora_kit import cli, lora, lora_match
from difflora_kit.toy import model


def _random_lora(targets=("to_q", "to_k")) -> lora.LoraFile:
    torch.manual_seed(0)
    unet = model.build_unet()
    lora.attach(unet, rank=2, alpha=2, targets=targets, name="t")
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return lora.LoraFile(*lora.adapter_state(unet, "t"), meta={"base": "toy", "stage": "2"})


def _renamed(the_lora: lora.LoraFile, share: float) -> lora.LoraFile:
    """The LoRA with the first `share` of its modules moved to names no toy denoiser has."""
    names = sorted(the_lora.modules())
    moved = set(names[: round(share * len(names))])
    tensors = {}
    for key, value in the_lora.tensors.items():
        name = key[len("unet."):].rsplit(".lora_", 1)[0]
        tensors[key.replace("unet.", "unet.elsewhere.", 1) if name in moved else key] = value
    return lora.LoraFile(tensors, the_lora.config, the_lora.meta)


def test_match_counts_and_says_why():
    base = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768), "mid_block.resnets.0.conv1": (8, 8, 3, 3)}
    found = lora_match.match({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768)}, base)
    assert found.summary() == "all 1 modules fit" and found.why == ""
    wider = lora_match.match({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 1024)}, base)
    assert wider.summary() == "none of its 1 modules fits" and "other widths" in wider.why
    assert "LoRA 320x1024, weight 320x768" in wider.wrong_shape[0]
    flux = lora_match.match({"single_transformer_blocks.0.attn.to_q": (64, 64), "transformer_blocks.0.attn.to_q": (64, 64)}, base)
    assert flux.left_out == 2 and "made for a FLUX transformer, the base is a UNet" in flux.why
    old = lora_match.match({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora": (320, 320)}, base)
    assert "old attention names" in old.why


def test_half_a_lora_is_refused_by_check_fits_with_the_count():
    the_lora = _random_lora()
    half = _renamed(the_lora, 0.5)
    n = len(the_lora.modules())
    with pytest.raises(lora.LoraMismatchError, match=rf"{n - n // 2} of its {n} modules fit \({n // 2} left out\)"):
        lora.check_fits(model.build_unet(), half)
    with pytest.raises(lora.LoraMismatchError, match=rf"none of its {n} modules fits"):
        lora.check_fits(model.build_unet(), _renamed(the_lora, 1.0))
    assert len(lora.check_fits(model.build_unet(), the_lora)) == n


@pytest.mark.parametrize("command", ["sample", "train"])
def test_the_cli_refuses_a_half_matching_lora_and_writes_nothing(command, tmp_path, capsys):
    """Before: `sample` went on with diffusers' "unexpected keys" warning and half the LoRA."""
    half = tmp_path / "half.safetensors"
    lora.save(half, _renamed(_random_lora(), 0.5))
    out = tmp_path / ("grid.png" if command == "sample" else "l2.safetensors")
    if command == "sample":
        argv = ["sample", "--lora", str(half), "--prompt", "a red circle", "--scales", "0,1", "--sample-steps", "2"]
    else:
        from PIL import Image

        Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
        argv = ["train", str(tmp_path / "x.png"), "--prompt", "a red circle", "--preset-lora", str(half), "--steps", "1"]
    code = cli.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "modules fit" in err and "left out" in err and "difflora inspect" in err, err
    assert not out.exists()


def test_the_averager_widget_refuses_a_member_that_does_not_fit():
    from difflora_kit import backends, widgets

    backend = backends.load_backend("toy", "cpu")
    good = _random_lora()
    with pytest.raises(lora.LoraMismatchError, match="^bad: the LoRA was made for another base"):
        widgets.Averager(backend, {"good": good, "bad": _renamed(good, 0.5)})
