"""SD 1.x and SDXL backends on tiny random-weight pipelines of the real diffusers classes, saved with
save_pretrained and loaded back offline through the same `--base PATH` code path as a real model."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflora_kit import backends, cli, lora, sample
from difflora_kit.config import TrainConfig
from difflora_kit.pair import prepare_base
from difflora_kit.tiny_models import IMAGE_SIZE, make_tiny_pipeline

FAMILIES = ("sd15", "sdxl")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "base"
    make_tiny_pipeline(request.param, folder)
    return request.param, folder


def _pair_images(folder):
    rng = np.random.default_rng(0)
    paths = []
    for i in (1, 2):
        path = folder / f"image{i}.png"
        Image.fromarray((rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_family_size_and_sdxl_conditioning_are_read_from_the_folder(tiny_base):
    family, folder = tiny_base
    assert backends.family(folder) == family and backends.sample_size(folder) == IMAGE_SIZE
    backend = backends.load_backend(folder, "cpu")
    states = backend.encode_prompts(["a red circle", ""])  # (2, T, D)
    if family == "sdxl":
        assert backend.unet.config.addition_embed_type == "text_time"
        assert states.shape[-1] == backend.unet.config.cross_attention_dim + backend.pooled_dim
        assert torch.count_nonzero(states[1]) == 0  # force_zeros_for_empty_prompt
    else:
        assert states.shape[-1] == backend.unet.config.cross_attention_dim
    latents = backend.encode_images(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
    assert latents.shape == (1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)


def test_step1_step2_sample_through_the_cli_and_diffusers_loads_the_lora(tiny_base, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    family, folder = tiny_base
    image1, image2 = _pair_images(tmp_path)
    out = tmp_path / "pair"
    assert cli.main(["pair", image1, image2, "--prompt", "a red circle", "--out", str(out), "--base", str(folder),
                     "--steps", "2", "--batch", "2", "--lr", "0.05"]) == 0, capsys.readouterr().err
    lora2 = lora.load(out / "lora2.safetensors")
    assert lora2.meta["stage"] == "2" and lora2.meta["base_digest"] == backends.base_digest(folder)
    # beside each LoRA its kohya copy (ComfyUI / AUTOMATIC1111): the same weight changes, kohya's own version
    copy = lora.load(out / "lora2.kohya.safetensors", module_names=lambda: backends.module_names(folder))
    want = lora.module_deltas(lora2)
    assert sorted(lora.module_deltas(copy)) == sorted(want) and (out / "lora1.kohya.safetensors").is_file()
    for name, delta in lora.module_deltas(copy).items():
        torch.testing.assert_close(delta, want[name], atol=1e-6, rtol=1e-5)
    version = lora.read_file(out / "lora2.kohya.safetensors")[1]["ss_base_model_version"]
    assert version == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--lora", str(out / "lora2.safetensors"), "--prompt", "a red circle", "--base",
                     str(folder), "--scales", "0,1", "--out", str(grid), "--sample-steps", "2"]) == 0
    assert grid.is_file()

    # the LoRA in the real pipeline (diffusers' own loader) = the kit's full-precision base + LoRA
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.load_lora_weights(str(out / "lora2.safetensors"))
    kit = prepare_base(folder, TrainConfig(eight_bit=False))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    states = kit.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad(), sample.lora_loaded(kit.unet, lora2):
        want = kit.denoiser(x, t, states)
        hidden = states[..., : kit.unet.config.cross_attention_dim]
        extra = {}
        if family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": states[:, 0, -kit.pooled_dim:],
                                          "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(2, -1)}
        got = pipe.unet(x, t, hidden, **extra).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - kit.denoiser(x, t, states)).abs().max() > 1e-6  # the LoRA changes the output


def test_an_unknown_pipeline_gets_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(NotImplementedError, match="no backend"):
        backends.load_backend(tmp_path)
