"""Bad input: a clear error naming the problem and the fix, and nothing left behind."""

import numpy as np
import pytest
from PIL import Image

from difflora_kit import cli, lora
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.toy.pairs import read_pairs

ROW = read_pairs(DEFAULT_PAIRS)[0]
FAST = ["--steps", "2"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_missing_image(capsys, tmp_path):
    code, err = run(capsys, "train", tmp_path / "nope.png", "--prompt", ROW["prompt"], "--out", tmp_path / "l.safetensors")
    assert code == 2 and "does not exist" in err and leftovers(tmp_path) == []


def test_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, err = run(capsys, "train", bad, "--prompt", ROW["prompt"], "--out", tmp_path / "l.safetensors")
    assert code == 2 and "cannot read" in err and "PNG" in err
    assert leftovers(tmp_path) == ["bad.png"]


def _variants(tmp_path):
    rgb = Image.open(ROW["image1"]).convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    out = {"RGBA": (rgba, "png"), "L": (rgb.convert("L"), "png"), "I;16": (gray16, "png"), "CMYK": (rgb.convert("CMYK"), "tiff")}
    paths = {}
    for mode, (im, ext) in out.items():
        paths[mode] = tmp_path / f"{mode.replace(';', '')}.{ext}"
        im.save(paths[mode])
    return paths


def test_rgba_gray_16bit_and_cmyk_are_converted_and_said(capsys, tmp_path):
    for mode, path in _variants(tmp_path).items():
        assert Image.open(path).mode.startswith(mode[:3]), mode
        out = tmp_path / f"{path.stem}.safetensors"
        code, err = run(capsys, "train", path, "--prompt", ROW["prompt"], "--out", out, *FAST)
        assert code == 0, err
        assert "converted" in err and "RGB" in err, (mode, err)
        assert out.is_file()


def test_pair_of_different_sizes(capsys, tmp_path):
    big = tmp_path / "big.png"
    Image.open(ROW["image2"]).resize((48, 48)).save(big)
    code, err = run(capsys, "pair", ROW["image1"], big, "--prompt", ROW["prompt"], "--out", tmp_path / "p", *FAST)
    assert code == 2 and "48x48" in err and "--resize" in err
    assert not (tmp_path / "p").exists()
    code, err = run(capsys, "pair", ROW["image1"], big, "--prompt", ROW["prompt"], "--out", tmp_path / "p", "--resize", *FAST)
    assert code == 0, err
    assert leftovers(tmp_path / "p") == ["lora1.safetensors", "lora2.safetensors", "report.json"]


def test_empty_prompt(capsys, tmp_path):
    code, err = run(capsys, "train", ROW["image1"], "--prompt", "  ", "--out", tmp_path / "l.safetensors", *FAST)
    assert code == 2 and "prompt is empty" in err and leftovers(tmp_path) == []


def test_preset_for_another_base(capsys, tmp_path, tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    tensors = {k.replace("mid_block", "middle_block"): v for k, v in result.lora1.tensors.items()}
    alien = tmp_path / "alien.safetensors"
    lora.save(alien, lora.LoraFile(tensors, result.lora1.config, {"base": "sd15"}))
    code, err = run(capsys, "train", ROW["image2"], "--prompt", ROW["prompt"], "--preset-lora", alien,
                    "--out", tmp_path / "l2.safetensors", *FAST)
    assert code == 2 and "middle_block" in err and "another base" in err
    assert leftovers(tmp_path) == ["alien.safetensors"]


def test_pickled_preset_is_never_loaded(capsys, tmp_path):
    pt = tmp_path / "lora1.pt"
    pt.write_bytes(b"\x80\x04not really a pickle")
    code, err = run(capsys, "train", ROW["image2"], "--prompt", ROW["prompt"], "--preset_lora_path", pt,
                    "--out", tmp_path / "l2.safetensors", *FAST)
    assert code == 2 and "safetensors" in err and "never loaded" in err


@pytest.mark.parametrize("flag,value", [("--rank", "0"), ("--alpha", "0"), ("--alpha", "-2"), ("--rank", "-4")])
def test_rank_or_alpha_not_positive(capsys, tmp_path, flag, value):
    code, err = run(capsys, "train", ROW["image1"], "--prompt", ROW["prompt"], "--out", tmp_path / "l.safetensors", flag, value)
    assert code == 2 and flag.strip("-") in err and ("> 0" in err or "positive" in err)
    assert leftovers(tmp_path) == []


def test_existing_output_needs_force(capsys, tmp_path):
    out = tmp_path / "l.safetensors"
    out.write_bytes(b"precious")
    code, err = run(capsys, "train", ROW["image1"], "--prompt", ROW["prompt"], "--out", out, *FAST)
    assert code == 2 and "--force" in err and out.read_bytes() == b"precious"
    code, err = run(capsys, "train", ROW["image1"], "--prompt", ROW["prompt"], "--out", out, "--force", *FAST)
    assert code == 0 and lora.load(out).meta["stage"] == "1"


def test_non_finite_loss_writes_nothing(capsys, tmp_path):
    code, err = run(capsys, "pair", ROW["image1"], ROW["image2"], "--prompt", ROW["prompt"], "--out", tmp_path / "p",
                    "--lr", "1e30", "--steps", "30")
    assert code == 2 and "loss became" in err and "nothing written" in err
    assert not (tmp_path / "p").exists() or leftovers(tmp_path / "p") == []
