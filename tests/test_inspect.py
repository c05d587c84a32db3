"""`difflora inspect LORA [--base BASE]` on files of every format it knows, for the right base, for another
base and half matching: what it says, and its exit code (0 applies whole, 1 nothing or part)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from difflora_kit import backends, cli, lora
from difflora_kit.config import DEFAULT_TARGETS, lora_targets
from difflora_kit.tiny_models import make_tiny_pipeline


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {family: make_tiny_pipeline(family, root / family) for family in ("sd15", "sdxl", "flux", "zimage")}


def _random_lora(base, family: str, rank=4, alpha=8.0) -> lora.LoraFile:
    backend = backends.load_backend(base, "cpu")
    torch.manual_seed(0)
    lora.attach(backend.unet, rank, alpha, lora_targets(DEFAULT_TARGETS, backend.default_targets), "t")
    for p in backend.unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    meta = {"stage": "2", "base": str(base), "family": family,
            **({"denoiser": "transformer"} if family in ("flux", "zimage") else {})}
    return lora.LoraFile(*lora.adapter_state(backend.unet, "t"), meta=meta)


@pytest.fixture(scope="module")
def loras(bases):
    return {family: _random_lora(base, family) for family, base in bases.items()}


def _inspect(capsys, path, base=None) -> tuple[int, str]:
    code = cli.main(["inspect", str(path), *(["--base", str(base)] if base is not None else [])])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_kits_own_file_alone_and_on_its_base(bases, loras, tmp_path, capsys):
    path = tmp_path / "lora2.safetensors"
    lora.save(path, loras["sd15"])
    code, out = _inspect(capsys, path)
    assert code == 0 and "difflora-kit" in out and "the kit recorded sd15" in out and "stage=2" in out
    assert "scale alpha/r 1 (all" in out and "all finite" in out and "Give --base" in out
    code, out = _inspect(capsys, path, bases["sd15"])
    assert code == 0 and "verdict: OK: all" in out and "ComfyUI" in out and "load_lora_adapter(path)" in out


def test_a_kohya_file_applies_on_its_base_and_not_on_another(bases, loras, tmp_path, capsys):
    path = tmp_path / "lora2.kohya.safetensors"
    lora.save_kohya(path, loras["sdxl"])
    code, out = _inspect(capsys, path, bases["sdxl"])
    assert code == 0 and "kohya (sd-scripts' keys" in out and "sdxl_base_v1-0" in out and "verdict: OK" in out
    code, out = _inspect(capsys, path, bases["flux"])
    assert code == 1 and "verdict: NOTHING WOULD APPLY" in out, out


def test_a_diffsynth_file_for_flux_on_flux_and_on_z_image(bases, loras, tmp_path, capsys):
    path = tmp_path / "diffsynth.safetensors"
    lora.save_diffsynth(path, loras["flux"])
    code, out = _inspect(capsys, path)
    assert code == 0 and "DiffSynth-Studio native" in out and "FLUX" in out
    code, out = _inspect(capsys, path, bases["flux"])
    assert code == 0 and "verdict: OK" in out and "DiffSynth-Studio" in out
    code, out = _inspect(capsys, path, bases["zimage"])
    assert code == 1 and "NOTHING WOULD APPLY" in out


def test_comfyui_and_peft_prefixes_are_read(bases, loras, tmp_path, capsys):
    the_lora = loras["zimage"]
    for prefix, label in (("diffusion_model.", "ComfyUI's own keys"), ("base_model.model.", "peft's own keys")):
        path = tmp_path / f"{label[:4]}.safetensors"
        save_file({prefix + k[len("unet."):]: v for k, v in the_lora.tensors.items()}, str(path))
        code, out = _inspect(capsys, path, bases["zimage"])
        assert code == 0 and label in out and "Z-Image" in out and "verdict: OK" in out, out
        back = lora.load(path)
        assert back.meta["imported_from"] in ("comfyui", "peft") and sorted(back.modules()) == sorted(the_lora.modules())


def test_a_lora_for_another_family_says_which(bases, loras, tmp_path, capsys):
    path = tmp_path / "flux.safetensors"
    lora.save(path, loras["flux"])
    code, out = _inspect(capsys, path, bases["sd15"])
    assert code == 1 and "made for a FLUX transformer, the base is a UNet" in out


def test_half_matching_says_how_many_are_left_out(bases, loras, tmp_path, capsys):
    the_lora = loras["sd15"]
    names = sorted(the_lora.modules())
    moved = set(names[: len(names) // 2])
    tensors = {(k.replace("unet.", "unet.elsewhere.", 1) if k[len("unet."):].rsplit(".lora_", 1)[0] in moved else k): v
               for k, v in the_lora.tensors.items()}
    path = tmp_path / "half.safetensors"
    lora.save(path, lora.LoraFile(tensors, the_lora.config, the_lora.meta))
    code, out = _inspect(capsys, path, bases["sd15"])
    n = len(names)
    assert code == 1 and f"ONLY PART WOULD APPLY: {n - n // 2} of its {n} modules fit ({n // 2} left out)" in out


def test_an_old_file_shows_which_loaders_miss_its_scale(bases, loras, tmp_path, capsys):
    """alpha 8 at rank 4 in the header only (as the kit wrote before folding): the kit applies it right,
    load_lora_adapter with a plain path and ComfyUI read scale 1."""
    the_lora = loras["sd15"]
    modules = the_lora.modules()
    tensors = {**the_lora.tensors, **{f"unet.{n}.lora_B.weight": B / 2 for n, (_, B) in modules.items()}}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0})}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata=header)
    code, out = _inspect(capsys, path, bases["sd15"])
    assert code == 0 and "scale alpha/r 2 (all" in out and "loaders that ignore it read 1" in out
    adapter = next(line for line in out.splitlines() if "load_lora_adapter(path)" in line)
    assert "wrong" in adapter


def test_a_file_with_nan_is_broken(loras, tmp_path, capsys):
    the_lora = loras["sd15"]
    key = next(k for k in the_lora.tensors if ".lora_B." in k)
    path = tmp_path / "nan.safetensors"
    save_file({**the_lora.tensors, key: torch.full_like(the_lora.tensors[key], float("nan"))}, str(path))
    code, out = _inspect(capsys, path)
    assert code == 1 and "verdict: BROKEN" in out and "NaN or infinite in 1 tensors" in out


def test_average_takes_diffsynth_files_with_base_and_writes_the_kohya_copy_on_sd(bases, loras, tmp_path, capsys):
    """`difflora average` on a DiffSynth-Studio user's LoRA 2s (names resolved through --base), and on
    SD 1.5 the kohya copy beside the average; a member that does not fit the base is refused."""
    flux = loras["flux"]
    doubled = lora.LoraFile({k: v * 2 if ".lora_B." in k else v for k, v in flux.tensors.items()}, flux.config, flux.meta)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora.save_diffsynth(a, flux)
    lora.save_diffsynth(b, doubled)
    out = tmp_path / "avg.safetensors"
    assert cli.main(["average", str(a), str(b), "--out", str(out), "--base", str(bases["flux"])]) == 0, capsys.readouterr().err
    got, want = lora.module_deltas(lora.load(out)), lora.module_deltas(flux, 1.5)  # (1 + 2) / 2
    assert sorted(got) == sorted(want) and not lora.kohya_path(out).exists()  # FLUX: one file
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    code = cli.main(["average", str(a), str(b), "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "resolved against the base" in capsys.readouterr().err
    code = cli.main(["average", str(a), "--out", str(tmp_path / "y.safetensors"), "--base", str(bases["zimage"])])
    assert code == 2 and "made for" in capsys.readouterr().err and not (tmp_path / "y.safetensors").exists()

    c, d = tmp_path / "c.safetensors", tmp_path / "d.safetensors"
    lora.save(c, loras["sd15"])
    lora.save(d, loras["sd15"])
    assert cli.main(["average", str(c), str(d), "--out", str(tmp_path / "sd.safetensors")]) == 0
    assert "sd.kohya.safetensors" in capsys.readouterr().out and (tmp_path / "sd.kohya.safetensors").is_file()
