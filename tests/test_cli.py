"""The CLI end to end on the toy model: train step 1 and 2, sample a sweep with single images."""

import json

from PIL import Image

from difflora_kit import cli, lora
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.toy.pairs import read_pairs


def test_train_step1_step2_then_sample_a_sweep(capsys, tmp_path):
    row = read_pairs(DEFAULT_PAIRS)[1]
    l1, l2 = tmp_path / "l1.safetensors", tmp_path / "l2.safetensors"
    assert cli.main(["train", row["image1"], "--prompt", row["prompt"], "--out", str(l1), "--steps", "3"]) == 0
    assert cli.main(["train", row["image2"], "--prompt", row["prompt"], "--out", str(l2), "--steps", "3",
                     "--preset_lora_path", str(l1), "--rank", "4", "--alpha", "2"]) == 0
    meta = lora.load(l2)
    assert meta.meta["stage"] == "2" and meta.meta["preset_digest"] == lora.load(l1).digest() and meta.rank == 4
    grid, images = tmp_path / "grid.png", tmp_path / "imgs"
    code = cli.main(["sample", "--lora", str(l2), "--prompt", row["prompt"], "--prompt", "a blue cross on a white background",
                     "--scales", "-1,0,1", "--seeds", "0,1", "--out", str(grid), "--images", str(images), "--sample-steps", "4"])
    assert code == 0, capsys.readouterr().err
    index = json.loads((images / "index.json").read_text())
    assert len(index) == 2 * 2 * 3 and {e["scale"] for e in index} == {-1.0, 0.0, 1.0}
    assert all(Image.open(images / e["file"]).size == (32, 32) for e in index)
    assert Image.open(grid).size[0] > 100
    assert cli.main(["sample", "--lora", str(l2), "--prompt", "x", "--out", str(grid)]) == 2  # exists, no --force


def test_demo_and_evaluate_refuse_an_existing_output_and_bad_settings(capsys, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "claims.md").write_text("earlier results")
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "claims.md").read_text() == "earlier results"
    assert cli.main(["evaluate", "--out", str(tmp_path / "e"), "--rank", "0"]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert cli.main(["evaluate", "--out", str(tmp_path / "e"), "--axis", "shiny", "--steps", "1"]) == 2
    assert "axis" in capsys.readouterr().err


def test_unknown_base_family_is_a_clear_error(capsys, tmp_path):
    folder = tmp_path / "sd"
    folder.mkdir()
    row = read_pairs(DEFAULT_PAIRS)[0]
    train = ["train", row["image1"], "--prompt", row["prompt"], "--out", str(tmp_path / "l.safetensors"), "--base", str(folder)]
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert cli.main(train) == 2
    err = capsys.readouterr().err
    assert "StableDiffusion3Pipeline" in err and "no backend" in err
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')  # but no unet/ folder
    assert cli.main(train) == 2
    assert "unet" in capsys.readouterr().err and not (tmp_path / "l.safetensors").exists()
