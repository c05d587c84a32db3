"""A LoraFile is a file's content: fp32 tensors on the CPU, wherever the model that trained it is.

`lora.adapter_state` (what training returns) copies the adapter to the CPU, so a trained LoRA and the
same LoRA loaded from disk compare and combine without moving anything (notebook 08 compares them;
many_pairs averages trained and loaded LoRAs together). Whoever applies a LoraFile to a model moves
A and B to the weight's device. A CPU-only machine has no CUDA device, so the model's adapter (and
the weights it is fused into) are put on a *fake* CUDA device here: torch's FakeTensorMode makes
tensors whose device is "cuda:0" on a CPU build, and raises FakeTensorDeviceMismatchError when an op
mixes them with CPU tensors, as a GPU would.
"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from difflora_kit import backends, lora, preset
from difflora_kit.config import DEFAULT_TARGETS


def fake_cuda(shape, dtype=torch.float32, requires_grad=False) -> nn.Parameter:
    """A parameter on the fake "cuda:0" (call inside FakeTensorMode)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="cuda"), requires_grad=requires_grad)


def move_to_fake_cuda(model: nn.Module, keep=lambda name: True, dtype=None) -> None:
    """Replace the parameters of `model` that `keep` names by fake CUDA ones of their shape (and `dtype`)."""
    for name, p in list(model.named_parameters()):
        if keep(name):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr,
                    fake_cuda(p.shape, dtype or p.dtype, p.requires_grad))


@pytest.fixture(scope="module")
def toy_with_adapter():
    """The toy denoiser (CPU, full precision) with a rank-4 LoRA whose B is random (as if trained)."""
    unet = backends.load_backend("toy", "cpu").unet
    torch.manual_seed(0)
    lora.attach(unet, 4, 4.0, DEFAULT_TARGETS)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".difflora." in name and "lora_B" in name:
                p.normal_(0, 0.05)
    return unet


def test_adapter_state_gives_fp32_cpu_copies(toy_with_adapter):
    unet = toy_with_adapter
    tensors, config = lora.adapter_state(unet)
    assert tensors and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors.values())
    assert config["r"] == 4
    name, (A, _) = next(iter(lora.LoraFile(tensors, config, {}).modules().items()))
    live = unet.get_submodule(name).lora_A["difflora"].weight
    assert torch.equal(A, live) and A.data_ptr() != live.data_ptr(), "a copy, not the live parameter"


def test_adapter_state_of_a_model_on_cuda_is_on_the_cpu(toy_with_adapter):
    """The adapter on the (fake) GPU, in bf16: the file's tensors are still fp32 on the CPU."""
    unet = toy_with_adapter
    saved = {n: p for n, p in unet.named_parameters() if ".difflora." in n}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            move_to_fake_cuda(unet, lambda n: ".difflora." in n, torch.bfloat16)
            assert next(p for n, p in unet.named_parameters() if ".difflora." in n).device.type == "cuda"
            tensors, _ = lora.adapter_state(unet)
            devices = {str(t.device) for t in tensors.values()}
            dtypes = {t.dtype for t in tensors.values()}
    finally:
        for name, p in saved.items():  # the module's real parameters back, for the other tests
            owner, _, attr = name.rpartition(".")
            setattr(unet.get_submodule(owner), attr, p)
    assert devices == {"cpu"} and dtypes == {torch.float32}, (devices, dtypes)


def test_a_trained_lora_combines_with_a_loaded_one_while_the_model_is_on_cuda(toy_with_adapter, tmp_path):
    """Notebook 08 compares a trained LoRA with its file; many_pairs averages trained and loaded LoRAs:
    their weight changes meet in one op, which raises on a cuda/cpu mix. (Fake tensors hold no values:
    the ops run, nothing is read.)"""
    unet = toy_with_adapter
    lora.save(tmp_path / "a.safetensors", lora.LoraFile(*lora.adapter_state(unet), meta={}))
    loaded = lora.load(tmp_path / "a.safetensors")
    saved = {n: p for n, p in unet.named_parameters() if ".difflora." in n}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            move_to_fake_cuda(unet, lambda n: ".difflora." in n)
            trained = lora.LoraFile(*lora.adapter_state(unet), meta={})
            mine, theirs = lora.module_deltas(trained), lora.module_deltas(loaded)
            mean = {n: (mine[n] + theirs[n]) / 2 for n in theirs}  # exact_average's ΔW, per layer
            devices = {str(d.device) for d in mean.values()}
    finally:
        for name, p in saved.items():
            owner, _, attr = name.rpartition(".")
            setattr(unet.get_submodule(owner), attr, p)
    assert devices == {"cpu"}


class TwoLayers(nn.Module):
    """A linear and a conv, the two kinds of module a LoRA adapts."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6, device="meta")  # (out 6, in 8)
        self.conv = nn.Conv2d(3, 5, 3, device="meta")  # (out 5, in 3, 3, 3)


def cpu_lora(rank=2) -> lora.LoraFile:
    """A LoRA as read from a file: CPU tensors, diffusers' keys."""
    g = torch.Generator().manual_seed(0)
    tensors = {"unet.proj.lora_A.weight": torch.randn(rank, 8, generator=g),
               "unet.proj.lora_B.weight": torch.randn(6, rank, generator=g),
               "unet.conv.lora_A.weight": torch.randn(rank, 3, 3, 3, generator=g),
               "unet.conv.lora_B.weight": torch.randn(5, rank, 1, 1, generator=g)}
    return lora.LoraFile(tensors, {"r": rank, "lora_alpha": float(rank)}, {})


def test_fusing_a_cpu_lora_into_a_model_on_cuda_moves_a_and_b():
    """lora.fuse_into / add_delta_ and preset.apply_preset (full precision) on a model on the (fake) GPU."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = TwoLayers()
        move_to_fake_cuda(model)
        lora.fuse_into(model, cpu_lora())  # raises FakeTensorDeviceMismatchError if A, B stayed on the CPU
        preset.apply_preset(model, cpu_lora(), 0.5, "fuse", eight_bit=False)
        assert model.proj.weight.device.type == "cuda" and model.conv.weight.device.type == "cuda"


def test_the_fake_device_catches_a_mix():
    """The stand-in is strict: a CPU tensor added to a fake CUDA one raises (else the tests above prove nothing)."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.empty(6, 8, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            w + lora.delta_weight(torch.ones(2, 8), torch.ones(6, 2), 1.0)


def test_a_model_on_the_meta_device_gives_shapes_only(toy_with_adapter):
    """bench/memory.py and bench/gpu_memory.py draw a random LoRA 1 from the shapes of a meta-built denoiser."""
    with torch.device("meta"):
        meta = type(toy_with_adapter).from_config(toy_with_adapter.config)
    lora.attach(meta, 4, 4.0, DEFAULT_TARGETS, "random")
    tensors, _ = lora.adapter_state(meta, "random")
    real, _ = lora.adapter_state(toy_with_adapter)
    assert all(t.is_meta for t in tensors.values())
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {k: tuple(t.shape) for k, t in real.items()}
