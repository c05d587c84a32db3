"""Z-Image backend on a tiny random-weight ZImagePipeline (the real diffusers/transformers classes:
ZImageTransformer2DModel, Qwen3Model, FLUX's 16-channel VAE), saved with save_pretrained and loaded
back offline through `--base PATH`, as the other families. Oracles are diffusers' own: the pipeline's
encode_prompt, its transformer call and sampling loop, and load_lora_weights."""

import numpy as np
import pytest
import torch

from difflora_kit import backends, cli, diffusion, lora, plan, sample
from difflora_kit.backends.zimage import captions, model_time
from difflora_kit.config import TrainConfig
from difflora_kit.pair import prepare_base
from difflora_kit.tiny_models import IMAGE_SIZE, make_tiny_pipeline

PROMPTS = ("a red circle", "a small blue square on a green background")  # captions of different lengths
LATENT = IMAGE_SIZE // 8


@pytest.fixture(scope="module")
def tiny_zimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage") / "base"
    make_tiny_pipeline("zimage", folder)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_zimage):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(tiny_zimage, use_safetensors=True)


@pytest.fixture(scope="module")
def pair_loras(tiny_zimage, tmp_path_factory):
    """Step 1 and step 2 through the CLI, like a real base."""
    from test_real_backends import _pair_images

    tmp = tmp_path_factory.mktemp("zimage_pair")
    out = tmp / "pair"
    assert cli.main(["pair", *_pair_images(tmp), "--prompt", PROMPTS[0], "--out", str(out), "--base", str(tiny_zimage),
                     "--steps", "3", "--batch", "2", "--lr", "0.05"]) == 0
    return out / "lora1.safetensors", out / "lora2.safetensors"


def pipeline_velocity(pipe, x, sigma, caps):
    """noise - x0 as ZImagePipeline's loop computes it: the transformer on a list of (16, 1, h, w)
    latents at time (1000 - 1000 sigma) / 1000, its output negated."""
    out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - sigma * 1000) / 1000, caps, return_dict=False)[0]
    return -torch.stack(out).squeeze(2).float()


def test_family_size_latents_and_prompt_states_are_the_pipelines(tiny_zimage, pipe):
    assert backends.family(tiny_zimage) == "zimage" and backends.sample_size(tiny_zimage) == IMAGE_SIZE
    assert "layers.0.attention.to_q" in backends.module_names(tiny_zimage)
    backend = backends.load_backend(tiny_zimage, "cpu")
    assert backend.latent_shape == (16, LATENT, LATENT)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)  # (it rewrites the list)
    got = captions(backend.encode_prompts(list(PROMPTS)))
    assert [c.shape[0] for c in got] == [w.shape[0] for w in want] and got[0].shape[0] < got[1].shape[0]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    image = np.random.default_rng(0).random((1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        mean = pipe.vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    want = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(backend.encode_images(image), want)


def test_denoiser_and_sampler_equal_zimagepipelines_own_calls(tiny_zimage, pipe):
    backend = backends.load_backend(tiny_zimage, "cpu")
    states = backend.encode_prompts(list(PROMPTS))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, LATENT, LATENT, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        caps, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
        sigma = diffusion.flow_sigma(pipe.scheduler.config, t, 1000, image_seq_len=(LATENT // 2) ** 2)
        want = pipeline_velocity(pipe, x, sigma, caps)
        got = backend.denoiser(x, t, states)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model_time(torch.tensor([0.25, 1.0])), torch.tensor([0.75, 0.0]))

    # the training target is the velocity the sampler integrates: x0 = x_t - sigma v (diffusion.predicted_x0)
    x0, noise = torch.randn(2, 16, LATENT, LATENT, generator=g), torch.randn(2, 16, LATENT, LATENT, generator=g)
    x_t, target = diffusion.noisy_and_target(backend.scheduler, x0, noise, t)
    torch.testing.assert_close(diffusion.predicted_x0(backend.scheduler, x_t, target, t), x0, rtol=1e-5, atol=1e-5)

    # sampling: the pipeline's loop (its sigma grid, static shift, Euler; CFG pos + g (pos - neg)) from
    # the same start noise, without and with guidance; then the decoded images
    seeds = [3, 4]
    noise = diffusion.start_noise(seeds, backend.latent_shape)
    for guidance in (0.0, 2.0):
        calls = []
        with torch.no_grad():
            got = backend.sample_latents(list(PROMPTS), seeds, steps=3, guidance=guidance, on_step=calls.append)
            want = pipe(prompt=list(PROMPTS), latents=noise.clone(), height=IMAGE_SIZE, width=IMAGE_SIZE,
                        num_inference_steps=3, guidance_scale=guidance, output_type="latent").images
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert calls == [0, 1, 2]  # on_step before each model call: the start-noise gate works
    images = backend.generate(list(PROMPTS), seeds, steps=2, guidance=0.0)
    with torch.no_grad():
        want = pipe(prompt=list(PROMPTS), latents=noise.clone(), height=IMAGE_SIZE, width=IMAGE_SIZE,
                    num_inference_steps=2, guidance_scale=0.0, output_type="np").images
    np.testing.assert_allclose(images, want, atol=1e-4)


def test_step1_step2_sample_through_the_cli_and_the_lora_in_diffusers(tiny_zimage, pipe, pair_loras, tmp_path):
    lora1_path, lora2_path = pair_loras
    lora2 = lora.load(lora2_path)
    assert lora2.meta["stage"] == "2" and lora2.meta["base_digest"] == backends.base_digest(tiny_zimage)
    assert lora2.meta["denoiser"] == "transformer"
    names = set(lora2.modules())
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
        for part in ("attention.to_q", "attention.to_out.0", "feed_forward.w1", "feed_forward.w3"):
            assert f"{block}.{part}" in names
    assert not any("adaLN" in n or "embedder" in n for n in names)
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--lora", str(lora2_path), "--prompt", PROMPTS[0], "--base", str(tiny_zimage),
                     "--scales", "0,1", "--seeds", "0,1", "--out", str(grid), "--sample-steps", "2",
                     "--guidance", "1.5", "--lora-off-first", "0.5"]) == 0
    assert grid.is_file()

    # diffusers' own loader reads the kit's file ("transformer." keys) = the kit's full-precision base + LoRA
    pipe.load_lora_weights(str(lora2_path), adapter_name="kit")
    kit = prepare_base(tiny_zimage, TrainConfig(eight_bit=False))
    states = kit.encode_prompts(list(PROMPTS))
    x, t = torch.randn(2, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 700])
    try:
        with torch.no_grad(), sample.lora_loaded(kit.unet, lora2):
            want = kit.denoiser(x, t, states)
        with torch.no_grad():
            sigma = diffusion.flow_sigma(pipe.scheduler.config, t, 1000, image_seq_len=(LATENT // 2) ** 2)
            got = pipeline_velocity(pipe, x, sigma, captions(states))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (want - kit.denoiser(x, t, states)).abs().max() > 1e-6  # the LoRA changes the output
    finally:
        pipe.transformer.delete_adapters("kit")


def test_the_plan_covers_zimage_and_kohya_is_a_clear_error(tiny_zimage, pair_loras, tmp_path, capsys):
    result = plan.plan_memory(tiny_zimage)
    assert result.resolution == IMAGE_SIZE and result.step1.peak > 0
    checkpointed = plan.plan_memory(tiny_zimage, cfg=TrainConfig(gradient_checkpointing=True))
    assert checkpointed.step1.components["activations kept for backward"] < result.step1.components["activations kept for backward"]
    # the public Z-Image-Turbo configs: 6.15 B transformer parameters, 8-bit linears ~ 1 byte each
    real = plan.plan_memory("zimage", 1024, TrainConfig(batch=1, gradient_checkpointing=True))
    weights = real.step1.components["denoiser weights (8-bit linears)"] / 2**30
    assert 5.0 < weights < 6.5, weights
    assert cli.main(["plan", "--base", str(tiny_zimage)]) == 0 and "peak of a training step" in capsys.readouterr().out
    with pytest.raises(NotImplementedError, match="kohya export is not for its family yet"):
        lora.save_kohya(tmp_path / "k.safetensors", lora.load(pair_loras[1]))
