"""Bad input: a clear error naming the problem and the fix, and nothing left behind."""

from pathlib import Path

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


# ---- refused before the model libraries are imported (cli._check_inputs)

def _fresh_cli(tmp_path, *argv):
    """`difflora ARGV` in a fresh interpreter: (exit code, stderr, whether torch got imported)."""
    import subprocess
    import sys

    code = ("import sys; from difflora_kit import cli; rc = cli.main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=tmp_path)
    rc, torch_in, diffusers_in = run.stdout.split()
    return int(rc), run.stderr, torch_in == "True" or diffusers_in == "True"


def _early_cases(tmp_path):
    """(what is wrong, argv, a word of the message): each needs no model."""
    have = tmp_path / "have.safetensors"
    have.write_bytes(b"precious")
    pair_dir, many = tmp_path / "pair", tmp_path / "many"
    pair_dir.mkdir()
    (pair_dir / "lora2.safetensors").write_bytes(b"precious")
    many.mkdir()
    img1, img2, prompt = ROW["image1"], ROW["image2"], ROW["prompt"]
    new = tmp_path / "new.safetensors"
    return [
        ("train: output exists", ["train", img1, "--prompt", prompt, "--out", have], "--force"),
        ("train --resume: output exists", ["train", img1, "--prompt", prompt, "--out", have, "--resume"], "--force"),
        ("pair: DIR/lora2 exists", ["pair", img1, img2, "--prompt", prompt, "--out", pair_dir], "lora2.safetensors"),
        ("pairs: DIR exists", ["pairs", DEFAULT_PAIRS, "--out", many, "--axis", "detail"], "--force"),
        ("train: --rank 0", ["train", img1, "--prompt", prompt, "--out", new, "--rank", "0"], "rank"),
        ("pair: --lr 0", ["pair", img1, img2, "--prompt", prompt, "--out", tmp_path / "p2", "--lr", "0"], "lr"),
        ("pairs: --batch 0", ["pairs", DEFAULT_PAIRS, "--out", tmp_path / "m2", "--batch", "0"], "batch"),
        ("plan: --rank 0", ["plan", "--rank", "0"], "rank"),
        ("train: offload without checkpointing", ["train", img1, "--prompt", prompt, "--out", new,
                                                  "--offload-blocks", "2"], "gradient_checkpointing"),
        ("train: empty prompt", ["train", img1, "--prompt", " ", "--out", new], "prompt is empty"),
        ("pairs: --rank-out 0", ["pairs", DEFAULT_PAIRS, "--out", tmp_path / "m3", "--rank-out", "0"], "--rank-out"),
        ("pairs: --checkpoint-every (ignored there)", ["pairs", DEFAULT_PAIRS, "--out", tmp_path / "m4",
                                                       "--checkpoint-every", "5"], "no checkpoints"),
        ("sample: requant without 8-bit", ["sample", "--prompt", prompt, "--out", tmp_path / "g.png",
                                           "--preset-mode", "requant", "--no-eight-bit"], "requant"),
        ("inspect: not safetensors", ["inspect", tmp_path / "l.pt"], "safetensors"),
    ]


def test_bad_input_that_needs_no_model_is_refused_before_torch_is_imported(tmp_path):
    (tmp_path / "l.pt").write_bytes(b"\x80\x04")
    for name, argv, word in _early_cases(tmp_path):
        before = leftovers(tmp_path)
        code, err, heavy = _fresh_cli(tmp_path, *argv)
        assert code == 2 and word in err, (name, err)
        assert not heavy, f"{name}: refused only after torch/diffusers were imported"
        assert leftovers(tmp_path) == before, name  # nothing written, nothing removed
    assert (tmp_path / "have.safetensors").read_bytes() == b"precious"


def test_the_import_check_sees_torch_when_it_is_imported(tmp_path):
    """The check above can fail: a command that gets past the early checks imports torch."""
    code, err, heavy = _fresh_cli(tmp_path, "train", ROW["image1"], "--prompt", ROW["prompt"],
                                  "--out", tmp_path / "l.safetensors", "--base", tmp_path / "no-such-base")
    assert code == 2 and "no-such-base" in err and heavy


def _library_refuses(call) -> bool:
    """Does the library function refuse (OutputExistsError) before it reads the images (a missing one here:
    what it raises when it goes on)?"""
    from difflora_kit.files import OutputExistsError

    try:
        call()
    except OutputExistsError:
        return True
    except Exception as e:  # went past the outputs' check
        assert "no-such-image" in str(e) or "unet" in str(e), e  # the toy: the image; the SD folder: its weights
        return False
    raise AssertionError("the missing image was not reached")


def _cli_refuses(argv) -> bool:
    from difflora_kit.files import OutputExistsError

    try:
        cli._check_inputs(cli.build_parser().parse_args([str(a) for a in argv]))
    except OutputExistsError:
        return True
    return False


def _bases(tmp_path):
    """The toy (one file per LoRA) and a local SD 1.5 folder (its config only: a kohya copy beside each LoRA)."""
    sd = tmp_path / "sd15"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return ["toy", str(sd)]


def _subsets(names):
    import itertools

    return list(itertools.chain.from_iterable(itertools.combinations(names, n) for n in range(len(names) + 1)))


def _same_rule(base, present, cli_refuses, library_refuses) -> None:
    """The early check refuses exactly what the library refuses; on SD 1.x / SDXL the library also
    refuses an existing kohya copy, which the early check leaves to it (it needs the base's family)."""
    if base == "toy" or not any(name.endswith(".kohya.safetensors") for name in present):
        assert cli_refuses == library_refuses, (base, present)
    else:
        assert library_refuses or not cli_refuses, (base, present)  # never refused early what the library takes


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("report", [False, True])
def test_pair_early_output_rule_is_the_library_rule(tmp_path, resume, report):
    """For every set of files already in DIR: `difflora pair` refuses early exactly when
    pair_files.train_pair_to_folder would (so --resume after step 1 is never refused early)."""
    from difflora_kit import pair_files
    from difflora_kit.config import TrainConfig

    names = ("lora1.safetensors", "lora2.safetensors", "report.json", "lora1.kohya.safetensors",
             "lora2.kohya.safetensors")
    refused = set()
    for base in _bases(tmp_path):
        for k, present in enumerate(_subsets(names)):
            out = tmp_path / f"{Path(base).name}{k}"
            out.mkdir()
            for name in present:
                (out / name).write_bytes(b"x")
            argv = ["pair", ROW["image1"], ROW["image2"], "--prompt", ROW["prompt"], "--out", out, "--base", base,
                    *(["--resume"] if resume else []), *([] if report else ["--no-report"])]
            library = _library_refuses(lambda: pair_files.train_pair_to_folder(
                out, tmp_path / "no-such-image.png", ROW["image2"], ROW["prompt"], TrainConfig(), base,
                report=report, resume=resume))
            _same_rule(base, present, _cli_refuses(argv), library)
            refused.add(library)
    assert refused == {True, False}


@pytest.mark.parametrize("preset", [False, True])
@pytest.mark.parametrize("report", [False, True])
def test_train_early_output_rule_is_the_library_rule(tmp_path, preset, report, tiny_pair_loras):
    from difflora_kit import pair_files
    from difflora_kit.config import TrainConfig

    lora1 = tmp_path / "lora1.safetensors"
    lora.save(lora1, tiny_pair_loras[0].lora1)
    for base in _bases(tmp_path):
        for k, present in enumerate(_subsets(("l.safetensors", "l.report.json", "l.kohya.safetensors"))):
            out = tmp_path / f"{Path(base).name}{k}" / "l.safetensors"
            out.parent.mkdir()
            for name in present:
                (out.parent / name).write_bytes(b"x")
            argv = ["train", ROW["image2"], "--prompt", ROW["prompt"], "--out", out, "--base", base,
                    *(["--preset-lora", lora1] if preset else []), *([] if report else ["--no-report"])]
            library = _library_refuses(lambda: pair_files.train_stage_to_file(
                out, tmp_path / "no-such-image.png", ROW["prompt"], TrainConfig(), base,
                preset=lora1 if preset else None, report=report))
            _same_rule(base, present, _cli_refuses(argv), library)


def test_pairs_early_output_rule_is_the_library_rule(tmp_path):
    from difflora_kit import many_pairs

    out, rows = tmp_path / "many", tmp_path / "rows.jsonl"
    rows.write_text('{"image1": "%s", "image2": "%s", "prompt": "p"}\n' % (tmp_path / "no-such-image.png", ROW["image2"]))
    for exists in (False, True):
        if exists:
            out.mkdir()
        library = _library_refuses(lambda: many_pairs.run(out, rows))
        assert _cli_refuses(["pairs", DEFAULT_PAIRS, "--out", out, "--axis", "detail"]) == library == exists
