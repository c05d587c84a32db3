"""FLUX backend on a tiny random-weight FluxPipeline (the real diffusers/transformers classes), saved with
save_pretrained and loaded back offline through the same `--base PATH` code path as a real model.
Oracles are diffusers' own: FluxPipeline's encode_prompt / _pack_latents / transformer call / sampling
loop, and FlowMatchEulerDiscreteScheduler's sigmas and time shift."""

import json

import numpy as np
import pytest
import torch

from difflora_kit import backends, cli, diffusion, lora, sample
from difflora_kit.config import TrainConfig
from difflora_kit.backends.flux import image_ids, pack, unpack
from difflora_kit.pair import prepare_base
from difflora_kit.tiny_models import IMAGE_SIZE, make_tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "base"
    make_tiny_pipeline("flux", folder)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux, use_safetensors=True)


@pytest.fixture(scope="module")
def pair_loras(tiny_flux, tmp_path_factory):
    """Step 1 and step 2 through the CLI, like a real base."""
    from test_real_backends import _pair_images  # the same random image pair as the SD backends' tests

    tmp = tmp_path_factory.mktemp("flux_pair")
    images = _pair_images(tmp)
    out = tmp / "pair"
    assert cli.main(["pair", *images, "--prompt", PROMPTS[0], "--out", str(out), "--base", str(tiny_flux),
                     "--steps", "3", "--batch", "2", "--lr", "0.05"]) == 0
    return out / "lora1.safetensors", out / "lora2.safetensors"


# ---- flow-matching math (no model) ------------------------------------------------------------
def test_noisy_and_target_is_the_flow_interpolation_and_velocity():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x0, noise = torch.full((1, 16, 4, 4), 2.0), torch.full((1, 16, 4, 4), -1.0)
    # t = 499: u = 500/1000 = 0.5; sigma = 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    x_t, target = diffusion.noisy_and_target(scheduler, x0, noise, torch.tensor([499]))
    torch.testing.assert_close(x_t, torch.full_like(x0, 0.25 * 2.0 + 0.75 * -1.0))
    torch.testing.assert_close(target, torch.full_like(x0, -1.0 - 2.0))
    # t = T - 1 is pure noise
    x_t, _ = diffusion.noisy_and_target(scheduler, x0, noise, torch.tensor([999]))
    torch.testing.assert_close(x_t, noise)


def test_static_shift_gives_the_schedulers_training_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigmas = diffusion.flow_sigma(scheduler.config, torch.arange(1000), 1000, image_seq_len=16)
    # diffusers' grid: sigmas[i] for timesteps 1000 .. 1; t = 0 .. 999 here, i.e. the same grid reversed
    torch.testing.assert_close(sigmas, scheduler.sigmas.flip(0).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_dynamic_shift_equals_diffusers_time_shift_and_calculate_shift(seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    c = scheduler.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert diffusion.flow_mu(c, seq_len) == pytest.approx(mu)
    u = torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(diffusion.shift_sigma(c, u, seq_len), scheduler.time_shift(mu, 1.0, u).float())
    t = torch.tensor([0, 99, 499, 899, 999])  # u = (t + 1) / 1000
    torch.testing.assert_close(diffusion.flow_sigma(c, t, 1000, seq_len), scheduler.time_shift(mu, 1.0, (t + 1) / 1000).float())


def test_packing_round_trips_and_equals_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (3, 12, 64)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 3, 16, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack(tokens, 6, 8), x, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(3, 3, 4, "cpu", torch.float32))


# ---- the backend on the tiny pipeline ---------------------------------------------------------
def test_family_size_latents_and_prompt_states_are_the_pipelines(tiny_flux, pipe):
    assert backends.family(tiny_flux) == "flux" and backends.sample_size(tiny_flux) == IMAGE_SIZE
    assert "single_transformer_blocks.0.proj_mlp" in backends.module_names(tiny_flux)
    backend = backends.load_backend(tiny_flux, "cpu")
    assert backend.latent_shape == (16, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    states = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=pipe.tokenizer_2.model_max_length)
    torch.testing.assert_close(states[..., : -backend.pooled_dim], embeds)
    torch.testing.assert_close(states[:, 0, -backend.pooled_dim:], pooled)
    image = np.random.default_rng(0).random((1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        mean = pipe.vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    want = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(backend.encode_images(image), want)
    assert backend.decode(want).shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_denoiser_and_sampler_equal_fluxpipelines_own_calls(tiny_flux, pipe):
    backend = backends.load_backend(tiny_flux, "cpu")
    states = backend.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        embeds, pooled, txt_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=pipe.tokenizer_2.model_max_length)
        sigma = diffusion.flow_sigma(pipe.scheduler.config, t, 1000, image_seq_len=16)
        out = pipe.transformer(hidden_states=pipe._pack_latents(x, 2, 16, 8, 8), timestep=sigma,
                               guidance=torch.full((2,), backend.train_guidance), pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=txt_ids,
                               img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), return_dict=False)[0]
        want = pipe._unpack_latents(out, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)
        got = backend.denoiser(x, t, states)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # sampling: FluxPipeline's loop (dynamic shift, its sigma grid, Euler) from the same start noise
    seeds, calls = [3, 4], []
    with torch.no_grad():
        got = backend.sample_latents(PROMPTS, seeds, steps=4, guidance=2.5, on_step=calls.append)
        noise = diffusion.start_noise(seeds, backend.latent_shape)
        want = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=pipe._pack_latents(noise, 2, 16, 8, 8),
                    height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=4, guidance_scale=2.5,
                    output_type="latent").images
    torch.testing.assert_close(got, pipe._unpack_latents(want, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor),
                               rtol=1e-4, atol=1e-5)
    assert calls == [0, 1, 2, 3]  # on_step before each model call, as diffusion.denoise: the start-noise gate works


def test_step1_step2_sample_through_the_cli_and_the_lora_in_diffusers(tiny_flux, pipe, pair_loras, tmp_path):
    _, lora2_path = pair_loras
    lora2 = lora.load(lora2_path)
    assert lora2.meta["stage"] == "2" and lora2.meta["base_digest"] == backends.base_digest(tiny_flux)
    names = set(lora2.modules())
    for want in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2",
                 "transformer_blocks.0.ff_context.net.0.proj", "single_transformer_blocks.0.attn.to_v",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"):
        assert want in names
    assert "proj_out" not in names  # the transformer's final projection stays as it is
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--lora", str(lora2_path), "--prompt", PROMPTS[0], "--base", str(tiny_flux),
                     "--scales", "0,1", "--out", str(grid), "--sample-steps", "2", "--lora-off-first", "0.5"]) == 0
    assert grid.is_file()

    # diffusers' own FLUX loader reads the kit's file ("transformer." keys) = the kit's full-precision base + LoRA
    pipe.load_lora_weights(str(lora2_path), adapter_name="kit")
    transformer = pipe.transformer
    kit = prepare_base(tiny_flux, TrainConfig(eight_bit=False))
    states = kit.encode_prompts(PROMPTS)
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 700])
    try:
        with torch.no_grad(), sample.lora_loaded(kit.unet, lora2):
            want = kit.denoiser(x, t, states)
        with torch.no_grad():
            sigma = diffusion.flow_sigma(pipe.scheduler.config, t, 1000, image_seq_len=16)
            embeds, pooled = states[..., :-kit.pooled_dim], states[:, 0, -kit.pooled_dim:]
            out = transformer(hidden_states=pipe._pack_latents(x, 2, 16, 8, 8), timestep=sigma, guidance=torch.full((2,), 3.5),
                              pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3),
                              img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), return_dict=False)[0]
        torch.testing.assert_close(pipe._unpack_latents(out, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor), want,
                                   rtol=1e-4, atol=1e-5)
        assert (want - kit.denoiser(x, t, states)).abs().max() > 1e-6  # the LoRA changes the output
    finally:
        transformer.delete_adapters("kit")


def test_flux_lora_files_have_the_pipelines_transformer_keys_and_load_back(pair_loras, tmp_path):
    """FLUX LoRAs are written with diffusers' "transformer." prefix (what FluxPipeline.load_lora_weights
    reads); the kit reads them back as the same LoRA, and so does an average of them."""
    from safetensors import safe_open

    from difflora_kit import average

    with safe_open(str(pair_loras[1]), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert all(k.startswith("transformer.") for k in json.loads(header["lora_adapter_metadata"]))
    lora2 = lora.load(pair_loras[1])
    assert all(k.startswith("unet.") for k in lora2.tensors) and lora2.meta["denoiser"] == "transformer"
    lora.save(tmp_path / "again.safetensors", lora2)
    again = lora.load(tmp_path / "again.safetensors")
    assert again.digest() == lora2.digest() and again.config == lora2.config
    avg = average.exact_average([lora2, lora.load(pair_loras[0])])
    lora.save(tmp_path / "avg.safetensors", avg)
    with safe_open(str(tmp_path / "avg.safetensors"), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())


def test_targets_set_by_the_user_are_kept_on_flux(tiny_flux):
    from difflora_kit.train import train_lora

    backend = backends.load_backend(tiny_flux, "cpu")
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    result = train_lora(backend, image, PROMPTS[0], TrainConfig(targets=("attn.to_q",), steps=1, batch=2, eight_bit=False),
                        progress=False)
    assert sorted(result.lora.modules()) == ["single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q"]
