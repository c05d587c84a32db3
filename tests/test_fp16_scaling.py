"""fp16 training (a T4: devices.compute_dtype gives fp16 below sm80), run on the CPU through the kit's own loop
(train.train_lora) with a tiny SD 1.5 pipeline of the real diffusers classes loaded in fp16 as a T4 loads it
(the denoiser streamed with 8-bit linears, the VAE and text encoder in fp16):

- the LoRA's weights and AdamW's moments stay fp32, and only fp16 gets loss scaling;
- a gradient that underflows in fp16 without loss scaling survives with it (512 px: SD 1.5's 64x64 latents);
- a step whose scaled gradients overflow is skipped, not taken for a bad loss, and the scale backs off;
- a killed fp16 run resumes to the same LoRA bit for bit: the scaler's state is in the checkpoint."""

import functools
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difflora_kit import backends, streaming, train
from difflora_kit.config import TrainConfig
from difflora_kit.quiet import quiet_loading
from difflora_kit.tiny_models import IMAGE_SIZE, make_tiny_pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return make_tiny_pipeline("sd15", tmp_path_factory.mktemp("fp16") / "sd15")


def _backend(folder, dtype):
    """The base as a T4 loads it (pair.prepare_base with compute_dtype fp16), in `dtype`, on the CPU."""
    base = backends.resolve_base(str(folder))
    with quiet_loading():
        denoiser = streaming.load_denoiser(base, "cpu", dtype)  # 8-bit linears, the rest in dtype
        return base.family.backend_class().load(base.folder, "cpu", dtype=dtype, denoiser=denoiser)


def _image(side=IMAGE_SIZE):
    return np.random.default_rng(0).random((side, side, 3), dtype=np.float32)


def _lora(backend):
    return {n: p for n, p in backend.unet.named_parameters() if p.requires_grad}


def _no_scaling(denoiser, device):
    return torch.amp.GradScaler(torch.device(device).type, enabled=False)


def _scaling_from(init_scale, monkeypatch):
    """Loss scaling that starts at `init_scale` (2^16 by default): high enough, the first steps overflow."""
    monkeypatch.setattr(train, "loss_scaler", functools.partial(train.loss_scaler, init_scale=init_scale))


def test_only_fp16_gets_loss_scaling():
    frozen = {dtype: torch.nn.Linear(4, 4).to(dtype).requires_grad_(False) for dtype in
              (torch.float16, torch.bfloat16, torch.float32)}
    assert [train.loss_scaler(m, "cpu").is_enabled() for m in frozen.values()] == [True, False, False]
    lora_only = torch.nn.Linear(4, 4).half()  # fp16 but trainable: not the frozen base
    assert not train.computes_in_fp16(lora_only)


def test_an_fp16_base_trains_an_fp32_lora_with_fp32_adam_moments(sd15, tmp_path):
    import bitsandbytes as bnb

    backend = _backend(sd15, torch.float16)
    checkpoint = tmp_path / "l.checkpoint.safetensors"
    result = train.train_lora(backend, _image(), PROMPT, TrainConfig(steps=2, checkpoint_every=1), progress=False,
                              checkpoint=checkpoint)
    assert train.computes_in_fp16(backend.unet) and all(np.isfinite(result.losses))
    wrapped = [m for m in backend.unet.modules() if isinstance(getattr(m, "base_layer", None), bnb.nn.Linear8bitLt)]
    assert wrapped  # peft wrapped the 8-bit linears ...
    assert {p.dtype for p in _lora(backend).values()} == {torch.float32}  # ... and the LoRA stayed fp32
    with safe_open(str(checkpoint), "pt") as f:  # what AdamW held after step 1
        moments = [f.get_tensor(k) for k in f.keys() if k.endswith(("/exp_avg", "/exp_avg_sq"))]
        scaler = f.metadata()["loss_scaler"]
    assert moments and {m.dtype for m in moments} == {torch.float32} and any(m.abs().sum() > 0 for m in moments)
    assert '"scale": 65536.0' in scaler


def _first_gradients(folder, dtype, side):
    """The LoRA's gradients of step 1 (after the scaler's unscaling), by parameter name."""
    backend = _backend(folder, dtype)
    grads = {}
    train.train_lora(backend, _image(side), PROMPT, TrainConfig(steps=1, batch=1), progress=False,
                     on_step=lambda step, loss: grads.update({n: p.grad.clone() for n, p in _lora(backend).items()}))
    return grads


def test_a_gradient_that_underflows_in_fp16_survives_loss_scaling(sd15, monkeypatch):
    """At 512 px (SD 1.5's 64x64 latents) the gradient through the self-attention softmax reaches the query and
    key LoRAs below fp16's smallest number: without scaling they get (almost) nothing; with it, fp32's."""
    ref = _first_gradients(sd15, torch.float32, 512)
    scaled = _first_gradients(sd15, torch.float16, 512)
    monkeypatch.setattr(train, "loss_scaler", _no_scaling)
    plain = _first_gradients(sd15, torch.float16, 512)

    def lost(g):  # entries fp32 has and fp16 flushed to zero
        return sum(int(((ref[k] != 0) & (g[k] == 0)).sum()) for k in ref)

    def errors(g):
        return {k: float((g[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 0}

    assert errors(ref)  # B = 0 at the start: the B's have gradients, the A's none
    worst = max(errors(plain).items(), key=lambda kv: kv[1])
    assert lost(plain) > 0 and worst[1] > 0.9, worst
    assert ".attn1.to_q." in worst[0] or ".attn1.to_k." in worst[0]
    assert lost(scaled) == 0 and max(errors(scaled).values()) < 0.02, max(errors(scaled).values())


def test_an_overflowing_step_is_skipped_not_a_bad_loss(sd15, monkeypatch):
    _scaling_from(2.0 ** 24, monkeypatch)  # the first steps' scaled gradients overflow fp16
    backend = _backend(sd15, torch.float16)
    after = []  # the LoRA after each step

    def snapshot(step, loss):
        after.append({n: p.detach().clone() for n, p in _lora(backend).items()})

    result = train.train_lora(backend, _image(), PROMPT, TrainConfig(steps=4), progress=False, on_step=snapshot)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))  # no NonFiniteLossError
    assert result.skipped_steps[:1] == [1] and len(result.skipped_steps) < 4

    def changed(step):  # did step `step` (from 1) move the LoRA?
        if step == 1:  # it starts with B = 0 (and A's gradient is 0 while B is)
            return any(bool(v.any()) for n, v in after[0].items() if "lora_B" in n)
        return any(not torch.equal(after[step - 1][n], after[step - 2][n]) for n in after[0])

    assert [changed(s) for s in range(1, 5)] == [s not in result.skipped_steps for s in range(1, 5)]


def test_a_killed_fp16_run_resumes_to_the_same_lora(sd15, tmp_path, monkeypatch):
    _scaling_from(2.0 ** 24, monkeypatch)  # the scale backs off in the first steps: its state matters
    cfg = TrainConfig(steps=4, checkpoint_every=2)
    whole = train.train_lora(_backend(sd15, torch.float16), _image(), PROMPT, cfg, progress=False)
    assert whole.skipped_steps[:1] == [1]  # so the checkpoint of step 2 holds a scale halved at least once

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 3:
            raise Killed

    checkpoint = tmp_path / "l.checkpoint.safetensors"
    with pytest.raises(Killed):
        train.train_lora(_backend(sd15, torch.float16), _image(), PROMPT, cfg, progress=False, checkpoint=checkpoint,
                         on_step=kill)
    shutil.copy(checkpoint, tmp_path / "step2.safetensors")
    with safe_open(str(checkpoint), "pt") as f:
        assert f.metadata()["step"] == "2" and json.loads(f.metadata()["loss_scaler"])["scale"] < 2.0 ** 24
    resumed = train.train_lora(_backend(sd15, torch.float16), _image(), PROMPT, cfg, progress=False,
                               checkpoint=checkpoint, resume=True)
    assert resumed.losses == whole.losses and resumed.skipped_steps == whole.skipped_steps
    assert all(torch.equal(whole.lora.tensors[k], resumed.lora.tensors[k]) for k in whole.lora.tensors)
    # the control: the same resume with the scaler's state not restored ends elsewhere
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, state: None)
    fresh = train.train_lora(_backend(sd15, torch.float16), _image(), PROMPT, cfg, progress=False,
                             checkpoint=tmp_path / "step2.safetensors", resume=True)
    assert not all(torch.equal(whole.lora.tensors[k], fresh.lora.tensors[k]) for k in whole.lora.tensors)
