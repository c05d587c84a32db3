"""The CUDA code paths, rehearsed on the CPU under the stand-in CUDA device (difflora_kit.stand_in_cuda).

The stand-in must start before torch is imported, so each rehearsal runs in a child process: this file
run as a script under `python -m difflora_kit.stand_in_cuda --capability X`, one process per card,
every scenario in it (imports cost ~12 s a process). Each scenario records what it saw (or its
traceback) into a JSON file; each test below checks one scenario. Notebooks run in Jupyter kernels
started with stand_in_cuda.environment() (a generated sitecustomize switches the stand-in on first).

    T4 (sm75, fp16 rule)     the bite, the 8-bit toy steps 1 and 2 with a fused preset (merge kernels in
                             Triton's interpreter), a batched sweep, the health report
    RTX 30xx (sm86, bf16)    block swap with gradient checkpointing, a streamed 8-bit denoiser
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(steps=2, batch=2)


# ----------------------------------------------------------------------------- the scenarios (child process)
def scenario_bite():
    """A tensor left on the CPU fails against the toy denoiser on "cuda"; the CUDA branches are taken."""
    import torch

    from difflora_kit import backends, stand_in_cuda
    from difflora_kit.devices import compute_dtype

    backend = backends.load_backend("toy")  # default device: CUDA "is available"
    x_cpu = torch.randn(2, *backend.latent_shape)  # (B, C, H, W) on the CPU: notebook 02's old bug
    t = torch.tensor([10, 500]).to(backend.device)  # torch.tensor(device="cuda"): see stand_in_cuda
    states = backend.encode_prompts(["a red circle", "a red circle"])
    raised = ""
    try:
        backend.denoiser(x_cpu, t, states)
    except stand_in_cuda.StandInDeviceError as e:
        raised = str(e)
    out = backend.denoiser(x_cpu.to(backend.device), t, states)  # the same call with x on the device
    return {"device": str(backend.device), "default_device": backends.default_device(),
            "unet_device": str(next(backend.unet.parameters()).device), "raised": raised,
            "out_device": str(out.device), "out_finite": bool(torch.isfinite(out).all().item()),
            "compute_dtype": str(compute_dtype("cuda")), "capability": list(torch.cuda.get_device_capability())}


def _pair_row():
    from difflora_kit.demo import DEFAULT_PAIRS
    from difflora_kit.images import load_image
    from difflora_kit.toy.pairs import read_pairs

    row = read_pairs(DEFAULT_PAIRS)[0]
    return load_image(row["image1"]), load_image(row["image2"]), row["prompt"]


_STATE: dict = {}


def scenario_train_pair():
    """Step 1 and step 2 (8-bit base streamed in, LoRA 1 fused by the merge kernels) on "cuda"."""
    import torch

    from difflora_kit import kernels, stand_in_cuda
    from difflora_kit.config import TrainConfig
    from difflora_kit.pair import train_stage

    image1, image2, prompt = _pair_row()
    cfg = TrainConfig(**TINY)
    probe = torch.zeros(8, 8, device="cuda")
    step1 = train_stage(image1, prompt, cfg, progress=False)
    before = stand_in_cuda.stats.ops
    step2 = train_stage(image2, prompt, cfg, preset=step1.lora, progress=False)
    _STATE.update(lora2=step2.lora, image2=image2, prompt=prompt)
    devices = sorted({str(t.device) for t in step2.lora.tensors.values()})
    return {"losses1": step1.losses, "losses2": step2.losses, "lora_devices": devices,
            "triton_for_fp32": kernels.use_triton(probe), "step2_ops": stand_in_cuda.stats.ops - before}


def scenario_sweep():
    """sample.sweep of LoRA 2 on the plain base on "cuda": two strengths in one batch."""
    import numpy as np

    from difflora_kit import sample
    from difflora_kit.config import SampleConfig, TrainConfig
    from difflora_kit.pair import prepare_base

    backend = prepare_base("toy", TrainConfig(**TINY))
    images = sample.sweep(backend, _STATE["lora2"], [_STATE["prompt"]], [0], [0.0, 1.0], SampleConfig(steps=2),
                          max_batch=4)
    return {"device": str(backend.device), "shape": list(images.shape), "finite": bool(np.isfinite(images).all()),
            "differs": float(np.abs(images[0, 0, 1] - images[0, 0, 0]).mean())}


def scenario_health():
    """The health report of LoRA 2 on the plain base on "cuda" (a small one: 2 prompts, 1 seed)."""
    import math

    from difflora_kit import health
    from difflora_kit.config import TrainConfig
    from difflora_kit.pair import prepare_base

    backend = prepare_base("toy", TrainConfig(**TINY))
    cfg = health.HealthConfig(prompts=2, seeds=1, max_batch=8)
    report = health.report(backend, _STATE["lora2"], _STATE["prompt"], _STATE["image2"], cfg)
    return {"verdict": report["verdict"], "finite": all(math.isfinite(report[k]) for k in ("own_change", "other_change", "drag")),
            "probes": report["probes"]}


def scenario_block_swap():
    """Step 1 with 3 of the toy's blocks swapped (side stream, pinned host copies, events) and gradient
    checkpointing, on "cuda"."""
    from difflora_kit import stand_in_cuda
    from difflora_kit.config import TrainConfig
    from difflora_kit.pair import train_stage

    image1, _, prompt = _pair_row()
    s = stand_in_cuda.stats
    seen = (s.streams, s.events, s.pinned, s.rng_state_reads)
    result = train_stage(image1, prompt, TrainConfig(**TINY, gradient_checkpointing=True, offload_blocks=3),
                         progress=False)
    streams, events, pinned, rng = (a - b for a, b in zip((s.streams, s.events, s.pinned, s.rng_state_reads), seen))
    return {"losses": result.losses, "counts": result.block_swap.counts, "streams": streams, "events": events,
            "pinned": pinned, "rng_state_reads": rng}


def scenario_streaming():
    """streaming.load_denoiser onto "cuda" with a preset re-merged into the int8 weights (mode fuse is
    streamed by every train_pair step 2; adapter adds no kernel): every int8 code and scale there."""
    import bitsandbytes as bnb

    from difflora_kit import quant, streaming

    if "lora2" not in _STATE:
        scenario_train_pair()
    found = {}
    for mode in ("requant",):
        model = streaming.load_denoiser("toy", "cuda", preset=_STATE["lora2"], mode=mode)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        found[mode] = sorted({str(t.device) for m in layers for t in quant.int8_state(m)} |
                             {str(p.device) for p in model.parameters()})
    return found


def scenario_sdxl_denoiser():
    """A tiny SDXL denoiser on "cuda": its added time ids are made by torch.tensor(..., device=x.device)
    (difflora_kit/backends/sd.py), which the stand-in serves through its CUDA-key fallback."""
    import tempfile

    import torch

    from difflora_kit import backends, stand_in_cuda
    from difflora_kit.tiny_models import make_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        backend = backends.load_backend(str(make_tiny_pipeline("sdxl", Path(tmp) / "sdxl")))  # default device: cuda
        x = torch.randn(2, *backend.latent_shape).to(backend.device)  # (B, 4, h, w)
        t = torch.tensor([10, 500]).to(backend.device)  # (B,)
        states = backend.encode_prompts(["a red circle", "a blue square"])  # (B, 77, D + pooled)
        made = stand_in_cuda.stats.made
        out = backend.denoiser(x, t, states)
    return {"pooled": bool(backend.pooled), "unet_device": str(next(backend.unet.parameters()).device),
            "out_device": str(out.device), "out_shape": list(out.shape), "finite": bool(torch.isfinite(out).all().item()),
            "made_in_call": stand_in_cuda.stats.made - made}


SCENARIOS = {"bite": scenario_bite, "train_pair": scenario_train_pair, "sweep": scenario_sweep,
             "health": scenario_health, "block_swap": scenario_block_swap, "streaming": scenario_streaming,
             "sdxl_denoiser": scenario_sdxl_denoiser}
CARDS = {"7.5": ["bite", "train_pair", "sweep", "health"], "8.6": ["block_swap", "streaming", "sdxl_denoiser"]}


def rehearse(names: list[str], out: Path) -> None:
    """Run the scenarios in order (under the stand-in: see the module docstring), each result into `out`."""
    import time

    results = {}
    for name in names:
        started = time.time()
        try:
            results[name] = {"ok": True, "facts": SCENARIOS[name]()}
        except BaseException as e:  # noqa: BLE001  (recorded, reported by the test of this scenario)
            where = "".join(traceback.format_tb(e.__traceback__))[-5000:]
            results[name] = {"ok": False, "error": f"{where}{type(e).__name__}: {str(e)[:1500]}"}
        results[name]["seconds"] = round(time.time() - started, 1)
        Path(out).write_text(json.dumps(results, indent=1, default=str))


# ----------------------------------------------------------------------------- the tests (pytest process)
def _child_env(tmp: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "MPLCONFIGDIR": str(tmp / "mpl"), "TRITON_CACHE_DIR": str(tmp / "triton"),
           "DIFFLORA_STAND_IN_CACHE": os.environ.get("DIFFLORA_STAND_IN_CACHE", str(ROOT / ".cache" / "stand_in_cuda"))}
    env.pop("DIFFLORA_DEVICE", None)
    env.pop("DIFFLORA_MERGE_KERNELS", None)
    return env


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """{card: {scenario: result}}: one child process per card."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the stand-in is for CPU-only machines (bench/gpu_check.sh runs the GPU)")
    tmp = tmp_path_factory.mktemp("rehearsal")
    results = {}
    for card, names in CARDS.items():
        out = tmp / f"sm{card.replace('.', '')}.json"
        cmd = [sys.executable, "-m", "difflora_kit.stand_in_cuda", "--capability", card, __file__, str(out), *names]
        done = subprocess.run(cmd, cwd=ROOT, env=_child_env(tmp), capture_output=True, text=True, timeout=600)
        if not out.is_file():
            pytest.fail(f"the sm{card} rehearsal died (exit {done.returncode}):\n{done.stderr[-4000:]}")
        results[card] = json.loads(out.read_text())
        print(f"sm{card.replace('.', '')} rehearsal:", {k: v["seconds"] for k, v in results[card].items()}, "seconds")
    return results


def _facts(rehearsal, card: str, name: str) -> dict:
    result = rehearsal[card][name]
    assert result["ok"], f"sm{card} {name} failed under the stand-in CUDA device:\n{result['error']}"
    return result["facts"]


def test_a_tensor_left_on_the_cpu_fails(rehearsal):
    facts = _facts(rehearsal, "7.5", "bite")
    assert facts["device"] == "cuda" and facts["default_device"] == "cuda" and facts["unet_device"] == "cuda:0"
    assert "Expected all tensors to be on the same device" in facts["raised"]
    assert facts["out_device"] == "cuda:0" and facts["out_finite"]
    assert facts["compute_dtype"] == "torch.float16" and facts["capability"] == [7, 5]  # the T4 rule


def test_train_pair_8bit_fused_preset(rehearsal):
    facts = _facts(rehearsal, "7.5", "train_pair")
    assert len(facts["losses2"]) == TINY["steps"] and all(0 < x < 10 for x in facts["losses1"] + facts["losses2"])
    assert facts["lora_devices"] == ["cpu"]  # a LoraFile holds the file's content (finding 3)
    assert facts["triton_for_fp32"]  # sm75 fp32: the merge kernels went through Triton (its interpreter here)


def test_sweep(rehearsal):
    facts = _facts(rehearsal, "7.5", "sweep")
    assert facts["device"] == "cuda" and facts["shape"][:3] == [1, 1, 2] and facts["finite"]
    assert facts["differs"] > 0  # strength 1 is not strength 0


def test_health_report(rehearsal):
    facts = _facts(rehearsal, "7.5", "health")
    assert facts["finite"] and facts["probes"] > 0


def test_block_swap_with_gradient_checkpointing(rehearsal):
    facts = _facts(rehearsal, "8.6", "block_swap")
    assert len(facts["losses"]) == TINY["steps"] and all(0 < x < 10 for x in facts["losses"])
    assert facts["streams"] == 1 and facts["events"] > 0 and facts["pinned"] > 0  # the CUDA branch of block_swap
    assert all(sum(step) > 0 for step in facts["counts"])


def test_streaming_onto_cuda(rehearsal):
    facts = _facts(rehearsal, "8.6", "streaming")
    assert facts == {"requant": ["cuda:0"]}


def test_sdxl_denoiser_makes_its_time_ids_on_cuda(rehearsal):
    """torch.tensor(data, device="cuda") works under the stand-in as on a GPU (SDXL's time ids)."""
    facts = _facts(rehearsal, "8.6", "sdxl_denoiser")
    assert facts["pooled"] and facts["unet_device"] == "cuda:0" and facts["out_device"] == "cuda:0"
    assert facts["out_shape"][0] == 2 and facts["finite"] and facts["made_in_call"] > 0


if __name__ == "__main__":  # the child process: python -m difflora_kit.stand_in_cuda --capability X this.py OUT NAMES...
    rehearse(sys.argv[2:], Path(sys.argv[1]))
