"""`difflora plan`: the predicted memory of a training step, checked against the real thing.

Weights and LoRA are counted exactly (compared with the loaded, quantized model). Activations are
predicted on the meta device; here they are checked against the memory a real training step of the
kit takes on this CPU (bench/plan_check.py: peak RSS of a fresh process, glibc returning every large block at
free: MALLOC_MMAP_THRESHOLD_), for a mid-size SD-1.5-like denoiser, with and without gradient
checkpointing. A GPU check of the same (torch.cuda.max_memory_allocated) is bench/gpu_memory.py.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflora_kit import cli, lora, pair, plan, quant
from difflora_kit.config import TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.tiny_models import make_tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import plan_check  # noqa: E402  (the benchmark's pipeline and measurement)

@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {family: make_tiny_pipeline(family, root / family) for family in ("sd15", "sdxl", "flux")}


@pytest.fixture(scope="module")
def flux_plan():
    """FLUX.1-dev from its public configs, as README.md quotes it (1024 px, batch 1, checkpointing)."""
    return plan.plan_memory("flux", 1024, TrainConfig(batch=1, gradient_checkpointing=True))


@pytest.fixture(scope="module")
def mid_folder(tmp_path_factory):
    return plan_check.make_mid_pipeline(tmp_path_factory.mktemp("plan_mid") / "mid_sd15")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
@pytest.mark.parametrize("eight_bit", [True, False])
def test_weights_and_lora_are_counted_exactly(tiny_folders, family, eight_bit):
    from difflora_kit.config import lora_targets

    cfg = TrainConfig(eight_bit=eight_bit)
    predicted = plan.plan_memory(tiny_folders[family], None, cfg, "fp32").step1.components
    backend = pair.prepare_base(tiny_folders[family], cfg)  # what training loads: 8-bit linears, the rest fp32
    real = quant.weight_bytes(backend.unet)["total"] + sum(b.numel() * b.element_size() for b in backend.unet.buffers())
    weights = [v for k, v in predicted.items() if k.startswith("denoiser weights")]
    assert weights == [real]
    targets = lora_targets(cfg.targets, backend.default_targets)
    n = sum(p.numel() for p in lora.attach(backend.unet, cfg.rank, cfg.alpha, targets))
    assert predicted["LoRA parameters (fp32)"] == 4 * n and predicted["AdamW moments (fp32)"] == 8 * n


def test_flux_is_planned_from_its_public_configs(flux_plan):
    """FLUX.1-dev's transformer (11.90 B parameters) and T5-XXL encoder (4.76 B), built from the public
    configs on the meta device; 8-bit linears ~ 1 byte a parameter; T5 in bf16 its 8.9 GiB."""
    shapes = plan.describe("flux")
    transformer = sum(p.numel() for p in plan._meta_denoiser(shapes, torch.bfloat16).parameters())
    assert abs(transformer / 11.9e9 - 1) < 0.02, transformer
    t5 = [config for name, config in shapes.text_encoders if name == "T5EncoderModel"]
    assert len(t5) == 1 and shapes.tokens == 512
    assert abs(sum(p.numel() for p in plan._meta_text_encoder("T5EncoderModel", t5[0]).parameters()) / 4.76e9 - 1) < 0.02
    assert 10.5 < flux_plan.step2.components["denoiser weights (8-bit linears)"] / plan.GiB < 11.5
    assert flux_plan.encoding.components["text encoder T5EncoderModel (bf16)"] == pytest.approx(4.76e9 * 2, rel=0.02)
    assert flux_plan.step2.components["activations kept for backward"] > 0 and flux_plan.sampling.peak > 0


def test_every_phase_is_planned_and_the_peak_is_the_largest(flux_plan, tiny_folders):
    """Encode first: the encoding phase holds no denoiser, loading and training no encoders (on the CPU
    by then), sampling the 8-bit denoiser, LoRA 2 and the VAE back for decoding; the peak is the
    largest phase and the printed plan names its largest component."""
    for p in (flux_plan, plan.plan_memory(tiny_folders["sdxl"], None, TrainConfig(), "fp32")):
        assert list(p.phases) == ["encoding", "loading", "step 1", "step 2", "sampling"]
        assert not [k for k in p.encoding.components if "denoiser" in k]
        assert [k for k in p.encoding.components if k.startswith("text encoder")]
        assert "VAE encoding the image (activations)" in p.encoding.components
        encoders = [k for k in p.encoding.components if k.startswith(("text encoder", "VAE ("))]
        for name in ("loading", "step 1", "step 2"):
            assert not set(encoders) & set(p.phases[name].components)
            assert p.phases[name].components.get("text encoders + VAE", 0) == 0
        assert [k for k in p.loading.components if k.startswith("the largest layer in flight")]
        sampling = p.sampling.components
        assert sampling["denoiser weights (8-bit linears)"] == p.step1.components["denoiser weights (8-bit linears)"]
        assert "VAE decoding one image (activations)" in sampling and [k for k in sampling if k.startswith("VAE (")]
        assert not [k for k in sampling if k.startswith("text encoder")]
        assert p.peak == max(phase.peak for phase in p.phases.values()) == p.phases[p.peak_phase].peak
        # one-at-a-time components: the phase holds the largest of them
        enc = p.encoding
        apart = [enc.components[k] for k in enc.one_at_a_time]
        assert enc.peak == sum(enc.components.values()) - sum(apart) + max(apart)
        phase, part, size = p.in_the_way
        assert size == max(p.phases[phase].components.values())
        text = plan.format_plan(p)
        assert f"what stands in the way: {part}" in text and f"predicted peak: {p.peak / plan.GiB:.2f} GiB, in {phase}" in text


def test_kept_encoders_are_in_every_phase(tiny_folders):
    kept = plan.plan_memory(tiny_folders["sdxl"], None, TrainConfig(), "fp32", offload_encoders=False)
    off = plan.plan_memory(tiny_folders["sdxl"], None, TrainConfig(), "fp32")
    encoders = sum(v for k, v in off.encoding.components.items() if k.startswith(("text encoder", "VAE (")))
    assert encoders > 0 and kept.encoding.peak == off.encoding.peak
    for name in ("loading", "step 1", "step 2"):
        assert kept.phases[name].peak == off.phases[name].peak + encoders
    vae = next(v for k, v in off.sampling.components.items() if k.startswith("VAE ("))
    assert kept.sampling.peak == off.sampling.peak + encoders - vae  # offloaded, only the VAE came back


def test_the_no_grad_count_follows_each_tensor_until_its_last_reference():
    x = torch.empty(1000, device="meta")  # 4000 bytes, alive throughout
    model = torch.nn.Identity()

    def run():
        a = x * 2  # + 4000
        b = a * 2  # + 4000: 12000, the peak
        del a
        view = b[:10]  # a view of b: nothing new
        c = b + 1  # + 4000: 12000 again
        del b, c
        return view  # b's storage lives on in its view

    assert plan.no_grad_peak(model, run, (x,)) == 12000
    linear = torch.nn.Linear(64, 32)
    y = torch.empty(5, 64, device="meta", dtype=torch.bfloat16)
    plain = plan.no_grad_peak(linear.to("meta", torch.bfloat16), lambda: linear(y), (y,))
    assert plain == (5 * 64 + 5 * 32) * 2  # input + output; the weight is not counted
    eight = plan.no_grad_peak(linear, lambda: linear(y), (y,), eight_bit=True)
    assert eight == plain + plan.int8_matmul_temporaries(5, 64, 32, torch.bfloat16)


def test_adapter_mode_counts_the_frozen_preset(tiny_folders):
    p = plan.plan_memory(tiny_folders["sd15"], None, TrainConfig(preset_mode="adapter"), "fp32")
    assert "preset LoRA, frozen adapter (fp32)" not in p.step1.components
    assert p.step2.components["preset LoRA, frozen adapter (fp32)"] == p.step1.components["LoRA parameters (fp32)"]
    assert p.step2.peak > p.step1.peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_step_memory_matches_a_real_training_run(mid_folder, checkpointing):
    """bench/plan_check.py's measurement: the last training step's peak RSS above the step before."""
    predicted = plan_check.predicted_step_peak(mid_folder, 8, checkpointing)
    measured = plan_check.measured_step_peak(mid_folder, 2, 8, checkpointing)
    print(f"checkpointing={checkpointing}: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert predicted > 50 * 2**20  # big enough to measure
    assert 0.85 * measured <= predicted <= 1.35 * measured  # measured here: +8% without, +13% with checkpointing


def test_checkpointing_trains_the_same_lora(monkeypatch):
    import torch.utils.checkpoint

    from difflora_kit.images import load_image
    from difflora_kit.toy import pairs

    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    row = pairs.read_pairs(DEFAULT_PAIRS)[0]
    image = load_image(row["image2"], 32)
    runs = []
    for gc in (False, True):
        calls.clear()
        runs.append(pair.train_stage(image, row["prompt"], TrainConfig(steps=3, gradient_checkpointing=gc), progress=False))
        assert bool(calls) == gc  # the blocks really were checkpointed (and only when asked)
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, rtol=1e-5)
    for k, v in runs[0].lora.tensors.items():
        torch.testing.assert_close(runs[1].lora.tensors[k], v, rtol=1e-5, atol=1e-7)


def test_plan_command_says_what_to_lower(capsys):
    assert cli.main(["plan", "--base", "sd15", "--resolution", "512", "--batch", "2", "--gpu-memory", "2"]) == 0
    out = capsys.readouterr().out
    assert "| activations kept for backward |" in out and "does NOT fit" in out
    assert "--gradient-checkpointing:" in out and "--batch 1 (now 2):" in out


def test_plan_refuses_a_resolution_the_unet_cannot_take(capsys):
    assert cli.main(["plan", "--base", "sd15", "--resolution", "500"]) == 2
    err = capsys.readouterr().err
    assert "multiple of 64" in err and "512" in err


def test_out_of_memory_is_answered_with_what_to_lower(tmp_path, monkeypatch, capsys):
    from difflora_kit.toy import pairs
    from difflora_kit.backends.toy import ToyBackend

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ToyBackend, "denoiser", out_of_memory)
    row = pairs.read_pairs(DEFAULT_PAIRS)[0]
    out = tmp_path / "lora.safetensors"
    code = cli.main(["train", str(row["image1"]), "--prompt", row["prompt"], "--out", str(out), "--steps", "3",
                     "--checkpoint-every", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "ran out of memory" in err and "Tried to allocate 2.00 GiB" in err and "Predicted peak" in err
    assert "--gradient-checkpointing:" in err and "--batch 1 (now 8):" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no checkpoint


def test_a_hub_model_is_planned_from_its_configs_alone(tiny_folders, monkeypatch):
    """`difflora plan --base owner/name` fetches JSON and text files only, and only the pipeline's
    own components (no safety checker); loading fetches their weights, still no safety checker."""
    import huggingface_hub

    from difflora_kit import backends

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append(list(allow_patterns or []))
        return str(tiny_folders["sd15"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    index = json.loads((tiny_folders["sd15"] / "model_index.json").read_text())
    assert "safety_checker" in index  # the pipeline names one (None here); it must not be fetched
    p = plan.plan_memory("someone/tiny-sd15", None, TrainConfig(), "fp32")
    assert p.step1.peak > 0
    fetched = [pattern for call in calls[1:] for pattern in call]
    assert "unet/*.json" in fetched and "text_encoder/*.json" in fetched
    assert not [f for f in fetched if f.endswith((".safetensors", ".bin")) or f.startswith("safety_checker")]
    calls.clear()
    backends.resolve("someone/tiny-sd15")
    assert "unet/*.safetensors" in calls[-1] and not [f for f in calls[-1] if f.startswith("safety_checker")]


def test_a_run_resumes_with_checkpointing_turned_on(tmp_path):
    """What the out-of-memory advice says: the same command with --resume --gradient-checkpointing
    continues the run from its checkpoint (checkpointing changes memory, not the run)."""
    from difflora_kit.images import load_image
    from difflora_kit.toy import pairs

    row = pairs.read_pairs(DEFAULT_PAIRS)[0]
    image, ckpt = load_image(row["image2"], 32), tmp_path / "lora.checkpoint.safetensors"
    first = pair.train_stage(image, row["prompt"], TrainConfig(steps=4, checkpoint_every=2), progress=False,
                             checkpoint=ckpt)  # leaves the checkpoint of step 2
    assert ckpt.is_file()
    resumed = pair.train_stage(image, row["prompt"], TrainConfig(steps=4, checkpoint_every=2, gradient_checkpointing=True),
                               progress=False, checkpoint=ckpt, resume=True)
    assert resumed.losses[:2] == first.losses[:2] and len(resumed.step_seconds) == 2  # steps 3 and 4 only
    for k, v in first.lora.tensors.items():
        torch.testing.assert_close(resumed.lora.tensors[k], v, rtol=1e-5, atol=1e-7)


def test_advice_halves_the_resolution_to_one_the_denoiser_takes():
    lines = plan.advice(plan.plan_memory("sd15", 576, TrainConfig(batch=1)))
    assert any(line.startswith("--resolution 256 (now 576)") for line in lines), lines
