"""Strength sweeps: the start-noise gate (LoRA off for the first, noisiest sampling steps), the base's
images shared by sweeps (sample.BaseImages), the sampling defaults."""

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from difflora_kit import cli, sample
from difflora_kit.config import SampleConfig, TrainConfig
from difflora_kit.pair import prepare_base

PROMPTS = ["a blue cross on a white background", "a green square on a black background"]


@pytest.fixture(scope="module")
def plain():
    return prepare_base("toy", TrainConfig())


def test_gated_sweep_in_one_batch_equals_separate_runs_per_strength(plain, tiny_pair_loras):
    lora2 = tiny_pair_loras[0].lora2
    cfg = SampleConfig(steps=6, lora_off_first=0.5)
    assert sample.gated_steps(cfg) == 3
    batched = sample.sweep(plain, lora2, PROMPTS, [0, 1], [0.0, 1.0, 3.0], cfg)  # (P, S, K, H, W, 3)
    for k, s in enumerate([0.0, 1.0, 3.0]):
        alone = sample.sweep(plain, lora2, PROMPTS, [0, 1], [s], cfg)[:, :, 0]
        np.testing.assert_allclose(batched[:, :, k], alone, atol=2e-5)


def test_the_gate_turns_the_lora_off_for_the_first_steps_only(plain, tiny_pair_loras):
    lora2 = tiny_pair_loras[0].lora2
    base = sample.sweep(plain, None, PROMPTS[:1], [0], [1.0], SampleConfig(steps=6))
    always_off = sample.sweep(plain, lora2, PROMPTS[:1], [0], [3.0], SampleConfig(steps=6, lora_off_first=1.0))
    np.testing.assert_allclose(always_off, base, atol=1e-6)
    on = sample.sweep(plain, lora2, PROMPTS[:1], [0], [3.0], SampleConfig(steps=6))
    half = sample.sweep(plain, lora2, PROMPTS[:1], [0], [3.0], SampleConfig(steps=6, lora_off_first=0.5))
    assert np.abs(on - base).mean() > 1e-3  # the LoRA does something at s = 3
    assert 1e-5 < np.abs(half - base).mean() and 1e-5 < np.abs(half - on).mean()  # in between: neither


def test_shared_base_images_are_the_strength_0_images_sampled_once_for_every_lora(plain, tiny_pair_loras):
    cfg = SampleConfig(steps=6)
    first, second = tiny_pair_loras[0].lora2, tiny_pair_loras[0].lora1  # two LoRAs swept on one base
    alone = sample.sweep(plain, first, PROMPTS, [0, 1], [0.0, 2.0], cfg)  # (P, S, K, H, W, 3): no sharing
    shared = sample.BaseImages(plain)
    with_first = sample.sweep(plain, first, PROMPTS, [0, 1], [0.0, 2.0], cfg, base_images=shared)
    with_second = sample.sweep(plain, second, PROMPTS, [0, 1], [0.0, 2.0], cfg, base_images=shared)
    assert shared.sampled == len(PROMPTS) * 2  # each (prompt, seed) once, for both LoRAs
    np.testing.assert_allclose(with_first, alone, atol=2e-5)  # s = 0 from the cache, s = 2 as before
    np.testing.assert_array_equal(with_first[:, :, 0], with_second[:, :, 0])  # one base image, whatever the LoRA
    assert np.abs(with_first[:, :, 1] - with_second[:, :, 1]).mean() > 1e-4  # the s = 2 images do differ
    base = sample.sweep(plain, None, PROMPTS, [0, 1], [1.0], cfg, base_images=shared)  # no LoRA: all reused
    assert shared.sampled == len(PROMPTS) * 2
    np.testing.assert_array_equal(base[:, :, 0], with_first[:, :, 0])
    sample.sweep(plain, first, PROMPTS, [0, 1], [0.0], SampleConfig(steps=5), base_images=shared)  # other settings
    assert shared.sampled == len(PROMPTS) * 4
    with pytest.raises(ValueError, match="another backend"):
        sample.sweep(prepare_base("toy", TrainConfig()), first, PROMPTS, [0], [0.0], cfg, base_images=shared)


def test_a_gate_outside_0_1_is_refused(capsys, tmp_path):
    with pytest.raises(ValueError, match="lora_off_first"):
        SampleConfig(lora_off_first=1.5)
    code = cli.main(["sample", "--prompt", "a red circle on a blue background", "--out", str(tmp_path / "g.png"),
                     "--lora-off-first", "-0.1"])
    assert code == 2 and "lora_off_first" in capsys.readouterr().err and not (tmp_path / "g.png").exists()


def test_sampling_defaults_follow_the_base_family(tmp_path):
    """The toy keeps its tuned settings; SD 1.x and SDXL get diffusers' guidance (7.5, 5.0), no
    rescale; the CLI's flags go on top."""
    import argparse

    from difflora_kit import cli
    from difflora_kit.backends.registry import sample_defaults
    from difflora_kit.config import SampleConfig
    from difflora_kit.tiny_models import make_tiny_pipeline

    assert sample_defaults("difflora-toy") == SampleConfig(steps=10, solver="unipc")  # bench/results/solver_eval.md
    assert (sample_defaults("sd15").guidance, sample_defaults("sdxl").guidance) == (7.5, 5.0)
    folder = make_tiny_pipeline("sdxl", tmp_path / "sdxl")
    flags = dict(sample_steps=None, guidance=None, rescale=None, lora_off_first=0.25, solver=None)
    cfg = cli._sample_cfg(argparse.Namespace(base=str(folder), **flags))
    assert (cfg.guidance, cfg.rescale, cfg.lora_off_first) == (5.0, 0.0, 0.25)
    assert cli._sample_cfg(argparse.Namespace(base="toy", **{**flags, "guidance": 3.0})).guidance == 3.0


def _copies(run) -> int:
    """How many tensor copies across devices or dtypes (aten._to_copy) `run()` makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.n


def test_per_sample_strengths_reach_the_device_once_per_batch_not_once_per_layer(tiny_pair_loras):
    """The hooks scale every LoRA layer's output; the (n,) strengths are cast (and on a GPU copied) once for
    the batch and reused by every layer and every later call, until the gate changes them. A bf16 toy
    denoiser on the CPU makes the cast visible: aten._to_copy counted with and without the hooks."""
    backend = prepare_base("toy", TrainConfig(eight_bit=False))
    backend.unet.to(torch.bfloat16)
    x, t = torch.randn(4, *backend.latent_shape).bfloat16(), torch.full((4,), 500)  # (4, C, H, W)
    states = backend.encode_prompts(PROMPTS * 2).bfloat16()  # (4, T, D)
    hooked = []
    with sample.lora_loaded(backend.unet, tiny_pair_loras[0].lora2) as adapter, torch.no_grad():
        plain = _copies(lambda: backend.unet(x, t, states))
        with sample.per_sample_strength(backend.unet, adapter, torch.tensor([0.0, 1.0])) as strengths:
            layers = sum(1 for m in backend.unet.modules() if isinstance(m, LoraLayer))
            for _ in range(2):
                hooked.append(_copies(lambda: backend.unet(x, t, states)) - plain)
            strengths.set(torch.tensor([2.0, 1.0]))  # new values (the gate opening): one new cast, at the next call
            hooked.append(_copies(lambda: backend.unet(x, t, states)) - plain)
            out = backend.unet(x, t, states).sample
    assert layers > 10 and hooked == [1, 0, 1] and strengths.made == 2
    with torch.no_grad():  # and it still scales row b by strengths[b % 2]: rows 0, 2 at 2.0, rows 1, 3 at 1.0
        with sample.lora_loaded(backend.unet, tiny_pair_loras[0].lora2) as adapter, \
                sample.per_sample_strength(backend.unet, adapter, torch.tensor([2.0, 1.0, 2.0, 1.0])):
            alone = backend.unet(x, t, states).sample
    torch.testing.assert_close(out, alone)


def test_a_sample_out_of_gpu_memory_says_what_to_lower(tmp_path, capsys, monkeypatch):
    from difflora_kit.backends.toy import ToyBackend

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(ToyBackend, "generate", out_of_memory)
    with pytest.raises(sample.SampleOutOfMemory, match=r"a batch of 4 images \(as given\).*max_batch=2"):
        sample.sweep(prepare_base("toy", TrainConfig()), None, PROMPTS, [0, 1], [0.0], SampleConfig(steps=2), max_batch=4)
    code = cli.main(["sample", "--prompt", PROMPTS[0], "--seeds", "0,1,2", "--scales", "0,1", "--max-batch", "6",
                     "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2 and "the GPU ran out of memory sampling a batch of 6 images" in err
    assert "--max-batch 3" in err and "no LoRA file was changed" in err and not (tmp_path / "g.png").exists()


def test_the_gate_sets_the_strengths_only_when_it_turns():
    wanted = torch.tensor([1.0, 3.0])
    live = sample.Strengths(wanted)
    on_step, seen, sets = sample.start_noise_gate(wanted, live, SampleConfig(steps=6, lora_off_first=0.5)), [], []
    real_set = live.set
    live.set = lambda values: sets.append(1) or real_set(values)
    for i in range(6):
        on_step(i)
        seen.append(live.values.tolist())
    assert seen == [[0.0, 0.0]] * 3 + [[1.0, 3.0]] * 3 and len(sets) == 2  # off at step 0, on at step 3
    ungated = sample.Strengths(wanted)
    always = sample.start_noise_gate(wanted, ungated, SampleConfig(steps=6))
    for i in range(6):
        always(i)
    assert ungated.values.tolist() == [1.0, 3.0] and ungated.made == 0
