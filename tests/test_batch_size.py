"""How many rows a batch without gradients takes (a health report's denoiser calls, a sweep's images): the
plan's bytes per row against the free memory on a GPU (plan.rows_that_fit), a fixed 96 on the CPU, and the
figures and images the same whatever the batching."""

import numpy as np
import pytest
import torch

from difflora_kit import health, plan, sample
from difflora_kit.config import SampleConfig, TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.images import load_image
from difflora_kit.pair import prepare_base
from difflora_kit.toy.pairs import read_pairs

GiB = 2**30


def test_rows_that_fit_is_the_smaller_of_denoising_and_decoding_within_bounds():
    cost = plan.RowBytes(denoiser_row=100, decode_image=1000, vae_weights=500)
    assert plan.rows_that_fit(cost, 10_000, headroom=1.0) == 96  # 100 rows fit: the cap
    assert plan.rows_that_fit(cost, 10_000, headroom=0.5) == 50
    assert plan.rows_that_fit(cost, 10_000, rows_per_item=2, decode=True, headroom=1.0) == 10  # decoding 10 images
    assert plan.rows_that_fit(cost, 10_000, 2, True, vae_on_device=False, headroom=1.0) == 9  # the VAE comes in first
    assert plan.rows_that_fit(cost, 10, least=2) == 2 and plan.rows_that_fit(cost, 10**9, cap=7) == 7


def test_a_real_family_at_full_size_gets_the_rows_its_free_memory_takes():
    """SDXL at 1024 (bf16, 8-bit linears), its public configs: the report's old fixed call of 72 rows does not fit
    12 GiB of free memory (the issue's "~20 GB" counted a second base too); sized batches stay within it."""
    cost = plan.row_bytes("sdxl", 1024, "bf16")
    print(f"SDXL 1024: {cost.denoiser_row / GiB:.3f} GiB a denoiser row, {cost.decode_image / GiB:.2f} GiB decoding "
          f"an image; 72 rows: {72 * cost.denoiser_row / GiB:.1f} GiB")
    assert plan.batch_rows("sdxl", 1024, "bf16", 12 * GiB) < 72  # the old fixed batch cannot fit a 12 GB card
    for free in (4, 8, 12, 16):  # (from about 20 GiB free the cap of 96 rows is reached)
        rows = plan.batch_rows("sdxl", 1024, "bf16", free * GiB)
        images = plan.batch_rows("sdxl", 1024, "bf16", free * GiB, rows_per_item=2, decode=True)
        assert 1 <= images < rows < 96
        assert rows * cost.denoiser_row <= plan.BATCH_HEADROOM * free * GiB < (rows + 1) * cost.denoiser_row
        assert images * cost.decode_image <= plan.BATCH_HEADROOM * free * GiB
    assert plan.batch_rows("sdxl", 512, "bf16", 8 * GiB) > plan.batch_rows("sdxl", 1024, "bf16", 8 * GiB)
    assert plan.batch_rows("sd15", 512, "bf16", 8 * GiB) > plan.batch_rows("sdxl", 1024, "bf16", 8 * GiB)


def test_activations_of_a_call_without_gradients_grow_in_proportion_to_its_rows():
    """row_bytes divides the plan's 2-row peak by 2: check it against the same count at 6 rows (SD 1.5, 512)."""
    shapes = plan.describe("sd15")
    unet = plan._meta_denoiser(shapes, torch.bfloat16).eval()
    args, kwargs = plan.training_inputs(shapes, 512, 6, torch.bfloat16)
    six = plan.no_grad_peak(unet, lambda: unet(*args, **kwargs), [*args, *kwargs.values()], True)
    assert 6 * plan.row_bytes("sd15", 512, "bf16").denoiser_row == pytest.approx(six, rel=0.02)


@pytest.fixture(scope="module")
def toy(tiny_pair_loras):
    result, row, _ = tiny_pair_loras
    return prepare_base("toy", TrainConfig()), result.lora2, row


def test_off_cuda_the_batch_is_the_fixed_one(toy):
    backend, _, _ = toy
    assert sample.free_device_bytes(backend.device) is None
    assert sample.batch_size(backend) == sample.MAX_BATCH == 96
    assert health.report_rows(backend) == 96 and health.report_rows(backend, health.HealthConfig(max_batch=8)) == 8


def test_sized_to_free_memory_the_figures_and_images_are_the_same(toy, monkeypatch):
    """The GPU branch on the CPU: free memory made to hold 5 of the toy's rows (the plan's figure); the report
    and a sweep then run in batches of 5 rows and of 2 images, and give what the CPU's batches of 96 give
    (float rounding of batched kernels apart)."""
    backend, lora2, row = toy
    image2 = load_image(row["image2"])
    cfg = health.HealthConfig(prompts=2, seeds=2)
    whole = health.measure(backend, lora2, row["prompt"], image2, cfg)
    per_row = plan.row_bytes(plan.backend_shapes(backend), None, "fp32", True).denoiser_row
    monkeypatch.setattr(sample, "free_device_bytes", lambda device: int(5.5 * per_row / plan.BATCH_HEADROOM))
    assert health.report_rows(backend) == 5 and sample.batch_size(backend) == 2
    sized = health.measure(backend, lora2, row["prompt"], image2, cfg)
    assert (whole["rows_per_call"], sized["rows_per_call"]) == (96, 5) and whole["probes"] == sized["probes"] == 12
    for key in ("own_change", "other_change", "transfer", "drag", "own_drag"):
        assert sized[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    calls = []
    real = backend.generate
    monkeypatch.setattr(backend, "generate", lambda prompts, *a: calls.append(len(prompts)) or real(prompts, *a))
    prompts, cfg_s = [row["prompt"], "a green square on a black background"], SampleConfig(steps=3)
    small = sample.sweep(backend, lora2, prompts, [0], [0.0, 2.0], cfg_s)  # 4 images, 2 a call
    assert calls == [2, 2]
    monkeypatch.setattr(sample, "free_device_bytes", lambda device: None)
    np.testing.assert_allclose(small, sample.sweep(backend, lora2, prompts, [0], [0.0, 2.0], cfg_s), atol=2e-5)
    assert calls == [2, 2, 4]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "zimage"])
def test_a_loaded_backend_is_sized_as_its_folder(family, tmp_path):
    """On a GPU the batch is sized from the loaded backend's own configs (plan.backend_shapes): the same
    bytes per row as the plan reads from the model folder, for every family."""
    from difflora_kit.tiny_models import make_tiny_pipeline

    folder = make_tiny_pipeline(family, tmp_path / family)
    backend = prepare_base(folder, TrainConfig())
    assert plan.row_bytes(plan.backend_shapes(backend), None, "fp32") == plan.row_bytes(folder, None, "fp32")
