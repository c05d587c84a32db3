"""The CLI end to end on the toy model: train step 1 and 2, sample a sweep with single images."""

import dataclasses
import json

import pytest
from PIL import Image

from difflora_kit import backends, cli, lora
from difflora_kit.config import TrainConfig
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


def test_pair_resolves_the_base_once(monkeypatch, tmp_path, capsys):
    """`difflora pair` resolves --base once (backends.resolve_base) and passes the Base down: sizes,
    both steps, the base digest, the plain base of the health report."""
    calls = {"resolve": 0, "_family_key": 0}
    for name in calls:
        real = getattr(backends, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(backends, name, counted)
    row = read_pairs(DEFAULT_PAIRS)[0]
    out = tmp_path / "pair"
    assert cli.main(["pair", row["image1"], row["image2"], "--prompt", row["prompt"], "--steps", "2", "--batch", "2",
                     "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "lora2.safetensors").is_file() and (out / "report.json").is_file()
    assert calls == {"resolve": 1, "_family_key": 1}
    assert lora.load(out / "lora2.safetensors").meta["base"] == "toy"  # str(Base): the spec as given


def test_train_help_shows_the_config_docstrings(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps the help at the terminal's width
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    docs = cli.field_docs(TrainConfig)
    assert docs["preset_mode"].startswith("How the preset LoRA enters the base in step 2: fuse | requant | adapter")
    assert docs["gradient_checkpointing"].startswith("Recompute the denoiser's blocks in the backward pass")
    for name, default in (("preset_mode", "fuse"), ("gradient_checkpointing", False), ("rank", 8)):
        assert f"{docs[name]} (default {default})" in shown, name
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}  # every field has its docstring


def test_pair_resume_keeps_a_finished_lora1(tmp_path, capsys):
    from difflora_kit import pair_files
    from difflora_kit.images import load_image

    row = read_pairs(DEFAULT_PAIRS)[0]
    out = tmp_path / "pair"
    argv = ["pair", row["image1"], row["image2"], "--prompt", row["prompt"], "--steps", "2", "--batch", "2",
            "--no-report", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    lora1 = (out / "lora1.safetensors").read_bytes()
    (out / "lora2.safetensors").unlink()  # as if killed in step 2
    assert cli.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    assert f"resuming: {out / 'lora1.safetensors'} is finished, step 1 skipped" in capsys.readouterr().out
    assert (out / "lora1.safetensors").read_bytes() == lora1
    assert lora.load(out / "lora2.safetensors").meta["image1_digest"] == lora.load(out / "lora1.safetensors").meta["image_digest"]
    # the library function the CLI calls, on arrays: the same files, nothing else
    written = pair_files.train_pair_to_folder(tmp_path / "lib", load_image(row["image1"]), load_image(row["image2"]),
                                              row["prompt"], TrainConfig(steps=2, batch=2), "toy", report=False,
                                              progress=False)
    assert not written.resumed_after_step1 and written.report is None
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["lora1.safetensors", "lora2.safetensors"]


def test_inspect_dispatches_to_inspect_lora_with_its_exit_code(monkeypatch, tmp_path, capsys, tiny_pair_loras):
    """`difflora inspect LORA [--base BASE]` returns inspect_lora.run's exit code (as `doctor` does); a LoRA
    that is missing or not safetensors is refused before that module is even imported."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("difflora_kit.inspect_lora")
    fake.run = lambda path, base: calls.append((path, base)) or 1  # 1: nothing or only part applies
    monkeypatch.setitem(sys.modules, "difflora_kit.inspect_lora", fake)
    path = tmp_path / "l.safetensors"
    lora.save(path, tiny_pair_loras[0].lora1)
    assert cli.main(["inspect", str(path), "--base", "sd15"]) == 1 and calls == [(path, "sd15")]
    assert cli.main(["inspect", str(path)]) == 1 and calls[-1] == (path, None)
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err and len(calls) == 2


def test_convert_to_diffsynth_calls_save_diffsynth(monkeypatch, tmp_path, capsys, tiny_pair_loras):
    written = []
    monkeypatch.setattr(lora, "save_diffsynth", lambda out, the_lora: written.append((out, the_lora.digest())),
                        raising=False)  # the lead's lora.save_diffsynth: only the dispatch is tested here
    src, out = tmp_path / "l.safetensors", tmp_path / "ds.safetensors"
    lora.save(src, tiny_pair_loras[0].lora1)
    assert cli.main(["convert", str(src), "--to", "diffsynth", "--out", str(out)]) == 0, capsys.readouterr().err
    assert written == [(out, lora.load(src).digest())]
    assert "diffsynth keys" in capsys.readouterr().out
