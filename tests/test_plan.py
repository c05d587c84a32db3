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
    return {family: make_tiny_pipeline(family, root / family) for family in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def mid_folder(tmp_path_factory):
    return plan_check.make_mid_pipeline(tmp_path_factory.mktemp("plan_mid") / "mid_sd15")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("eight_bit", [True, False])
def test_weights_and_lora_are_counted_exactly(tiny_folders, family, eight_bit):
    cfg = TrainConfig(eight_bit=eight_bit)
    predicted = plan.plan_memory(tiny_folders[family], None, cfg, "fp32").step1.components
    backend = pair.prepare_base(tiny_folders[family], cfg)  # what training loads: 8-bit linears, the rest fp32
    real = quant.weight_bytes(backend.unet)["total"] + sum(b.numel() * b.element_size() for b in backend.unet.buffers())
    weights = [v for k, v in predicted.items() if k.startswith("denoiser weights")]
    assert weights == [real]
    n = sum(p.numel() for p in lora.attach(backend.unet, cfg.rank, cfg.alpha, cfg.targets))
    assert predicted["LoRA parameters (fp32)"] == 4 * n and predicted["AdamW moments (fp32)"] == 8 * n


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
