"""Streaming the base (difflora_kit.streaming): the same model as a full load, bit for bit, and the
memory the plan predicts for it.

The reference is the full load (`full_load`: what pair.prepare_base did before streaming: the backend's
from_pretrained in the compute dtype, then preset.apply_preset, or quant.quantize_linears without a preset). A random preset LoRA touches linears and convolutions alike, strong enough
that every weight it touches changes.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflora_kit import backends, lora, plan, preset as presets_, quant, streaming
from difflora_kit.backends.toy import DEFAULT_FOLDER as TOY_FOLDER
from difflora_kit.config import TrainConfig
from difflora_kit.tiny_models import make_tiny_pipeline
from difflora_kit.train import train_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import stream_memory  # noqa: E402  (the benchmark's model, preset and measurement)
from memory import random_lora  # noqa: E402

CASES = [  # (with a preset, mode, eight_bit)
    (False, "fuse", True), (True, "fuse", True), (True, "requant", True), (True, "adapter", True),
    (True, "fuse", False), (True, "adapter", False), (False, "fuse", False)]
PROMPT = "a red circle on a blue background"


def full_load(base, cfg: TrainConfig, preset=None):
    """The backend loaded whole (full precision), then the preset and the 8-bit linears put in."""
    backend = backends.load_backend(base, "cpu")
    if preset is not None:
        presets_.apply_preset(backend.unet, preset, cfg.preset_scale, cfg.preset_mode, cfg.eight_bit)
    elif cfg.eight_bit:
        quant.quantize_linears(backend.unet)
    return backend


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    return backends.resolve_base(make_tiny_pipeline("sd15", tmp_path_factory.mktemp("stream") / "sd15"))


@pytest.fixture(scope="module")
def presets(sd_base):
    """A random rank-8 LoRA 1 on the default targets of each base (bench/memory.py's random_lora)."""
    out = {}
    for name, base in (("toy", backends.resolve_base("toy")), ("sd15", sd_base)):
        out[name] = random_lora(streaming.empty_denoiser(_denoiser_class(base), base.folder / "unet", torch.float32),
                                8, TrainConfig().targets, seed=1)
    return out


def _denoiser_class(base):
    import diffusers

    return getattr(diffusers, base.family.denoiser_class)


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, same_folder: bool = True) -> int:
    """Same modules, same types; int8 codes and scales, every parameter and buffer bit-equal (dtype,
    device and requires_grad too); the same 8-bit flag, mode and config (the folder it names too, if
    `same_folder`). Returns the int8 layers compared."""
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    assert list(ma) == list(mb)
    int8 = 0
    for name in ma:
        assert type(ma[name]) is type(mb[name]), name
        if isinstance(ma[name], quant.int8_linear_class()):
            for x, y in zip(quant.int8_state(ma[name]), quant.int8_state(mb[name])):
                assert x.dtype == y.dtype and torch.equal(x, y), name
            int8 += 1
    for get in ("named_parameters", "named_buffers"):
        ta, tb = dict(getattr(a, get)()), dict(getattr(b, get)())
        assert list(ta) == list(tb)
        for name in ta:
            x, y = ta[name], tb[name]
            assert (x.dtype, x.device, x.requires_grad) == (y.dtype, y.device, y.requires_grad), name
            assert torch.equal(x, y), name
    assert getattr(a, "is_loaded_in_8bit", False) == getattr(b, "is_loaded_in_8bit", False)
    config = lambda m: {k: v for k, v in m.config.items() if same_folder or k != "_name_or_path"}  # noqa: E731
    assert a.training == b.training and config(a) == config(b)
    return int8


@pytest.mark.parametrize("family", ["toy", "sd15"])
@pytest.mark.parametrize("with_preset,mode,eight_bit", CASES)
def test_streaming_gives_the_full_load_bit_for_bit(family, with_preset, mode, eight_bit, sd_base, presets):
    base = backends.resolve_base("toy") if family == "toy" else sd_base
    preset = presets[family] if with_preset else None
    cfg = TrainConfig(preset_mode=mode, eight_bit=eight_bit)
    full = full_load(base, cfg, preset).unet
    streamed = streaming.load_denoiser(base, "cpu", None, preset, cfg.preset_scale, mode, eight_bit)
    meta = streaming.empty_denoiser(_denoiser_class(base), base.folder / "unet", torch.float32)
    linears = sum(type(m) is torch.nn.Linear for m in meta.modules())
    assert assert_same_model(full, streamed) == (linears if eight_bit else 0) and linears > 10
    if with_preset and mode != "adapter":  # the preset went into linears and convolutions alike
        kinds = {s.kind for s in streaming.load_steps(meta, streaming.preset_ranks(preset), mode, eight_bit)}
        assert kinds >= ({f"int8+{mode}", "fp+fuse"} if eight_bit else {"fp+fuse"})


@pytest.mark.parametrize("family", ["sdxl", "flux", "zimage"])
def test_the_other_families_stream_the_same(family, tmp_path):
    """SDXL's UNet and the FLUX and Z-Image transformers (their own targets), with and without 8-bit."""
    from difflora_kit.config import lora_targets

    base = backends.resolve_base(make_tiny_pipeline(family, tmp_path / family))
    meta = streaming.empty_denoiser(_denoiser_class(base), base.folder / base.family.denoiser_folder, torch.float32)
    targets = lora_targets(TrainConfig().targets, base.family.backend_class().targets_for(dict(meta.config)))
    preset = random_lora(meta, 4, targets, seed=1)
    for with_preset, mode, eight_bit in [(False, "fuse", True), (True, "fuse", True), (True, "requant", True),
                                         (True, "fuse", False)]:
        cfg = TrainConfig(preset_mode=mode, eight_bit=eight_bit)
        p = preset if with_preset else None
        assert_same_model(full_load(base, cfg, p).unet, streaming.load_denoiser(base, "cpu", None, p, 1.0, mode, eight_bit))


def test_a_sharded_checkpoint_streams_the_same(tmp_path, presets):
    folder = tmp_path / "toy_sharded"
    shutil.copytree(TOY_FOLDER, folder, ignore=shutil.ignore_patterns("unet"))
    backends.load_backend("toy").unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="500KB")
    index = json.loads((folder / "unet" / streaming.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 5 and not (folder / "unet" / streaming.SINGLE_FILE).exists()
    base = backends.resolve_base(folder)
    full = full_load(base, TrainConfig(), presets["toy"]).unet
    streamed = streaming.load_denoiser(base, "cpu", None, presets["toy"])
    assert_same_model(full, streamed)
    assert_same_model(streamed, streaming.load_denoiser("toy", "cpu", None, presets["toy"]), same_folder=False)  # = one file


@pytest.mark.parametrize("family,mode", [("toy", "fuse"), ("toy", "requant"), ("toy", "adapter"), ("sd15", "fuse")])
def test_step2_trains_the_same_lora_on_the_streamed_base(family, mode, sd_base, presets):
    base = backends.resolve_base("toy") if family == "toy" else sd_base
    cfg = TrainConfig(steps=3, batch=2, preset_mode=mode)
    image = np.random.default_rng(0).random((backends.sample_size(base),) * 2 + (3,)).astype(np.float32)
    full = full_load(base, cfg, presets[family])
    denoiser = streaming.load_denoiser(base, "cpu", None, presets[family], cfg.preset_scale, mode)
    streamed = backends.load_backend(base, "cpu", denoiser=denoiser)
    assert streamed.unet is denoiser
    a = train_lora(full, image, PROMPT, cfg, progress=False)
    b = train_lora(streamed, image, PROMPT, cfg, progress=False)
    assert a.losses == b.losses and a.lora.tensors.keys() == b.lora.tensors.keys()
    assert all(torch.equal(a.lora.tensors[k], b.lora.tensors[k]) for k in a.lora.tensors)


def test_the_backend_leaves_a_streamed_denoiser_as_it_is(sd_base, presets):
    denoiser = streaming.load_denoiser(sd_base, "cpu", None, presets["sd15"])
    layers = [m for m in denoiser.modules() if isinstance(m, quant.int8_linear_class())]
    before = [tuple(t.data_ptr() for t in quant.int8_state(m)) for m in layers]
    backend = backends.load_backend(sd_base, "cpu", denoiser=denoiser).to("cpu")
    assert backend.unet is denoiser and not denoiser.training
    assert [tuple(t.data_ptr() for t in quant.int8_state(m)) for m in layers] == before
    assert all(m.weight.dtype == torch.int8 for m in layers)


def test_the_plan_counts_what_the_loaded_model_holds(sd_base, presets):
    """loading_peak's resident bytes are plan.weight_bytes' on the meta model and the loaded model's own."""
    for base, preset in ((backends.resolve_base("toy"), presets["toy"]), (sd_base, presets["sd15"])):
        for eight_bit in (True, False):
            meta = streaming.empty_denoiser(_denoiser_class(base), base.folder / "unet", torch.float32)
            predicted = streaming.loading_peak(meta, torch.float32, eight_bit, preset, "fuse", "cpu")
            assert predicted.resident == plan.weight_bytes(plan._on_meta(_denoiser_class(base), dict(meta.config)),
                                                           torch.float32, eight_bit)
            loaded = streaming.load_denoiser(base, "cpu", None, preset, eight_bit=eight_bit)
            assert predicted.resident == quant.weight_bytes(loaded)["total"]
            assert predicted.resident < predicted.peak < predicted.resident + 16 * max(
                p.numel() for p in meta.parameters())


def test_every_tensor_is_loaded_once(sd_base):
    meta = streaming.empty_denoiser(_denoiser_class(sd_base), sd_base.folder / "unet", torch.float32)
    keys = [s.key(a) for s in streaming.load_steps(meta) for a, _ in s.tensors()]
    assert sorted(keys) == sorted(k for k, _ in [*meta.named_parameters(), *meta.named_buffers()])


def test_the_plan_of_a_gpu_load_is_the_8bit_model_plus_a_layer():
    """SD 1.5 from its public config, bf16 on a CUDA card (the Triton merge): under the bf16 model (two
    thirds of SD 1.5's weights are convolutions: they stay bf16)."""
    from diffusers import UNet2DConditionModel

    from difflora_kit.backends import registry

    meta = plan._on_meta(UNet2DConditionModel, registry.public_config("sd15").unet, torch.bfloat16)
    full, weights = sum(p.numel() for p in meta.parameters()) * 2, plan.weight_bytes(meta, torch.bfloat16, True)
    ranks = streaming.target_ranks(meta, TrainConfig().targets, 8)
    assert len(ranks) > 100
    for mode in ("fuse", "requant", "adapter"):
        p = streaming.loading_peak(meta, torch.bfloat16, True, ranks, mode, "cuda")
        assert p.resident == weights if mode != "adapter" else p.resident > weights  # + the frozen adapter
        assert p.peak < full and p.peak - p.resident < p.in_flight < 160 * 2**20  # the worst: a conv's fp32 delta


def test_clear_errors(tmp_path, presets):
    folder = tmp_path / "toy_broken"
    shutil.copytree(TOY_FOLDER, folder)
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / streaming.SINGLE_FILE
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "conv_in.weight"}, path)
    with pytest.raises(ValueError, match="lacks 1 of the denoiser's tensors, e.g. conv_in.weight"):
        streaming.load_denoiser(folder, "cpu")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        streaming.load_denoiser(folder, "cpu")
    with pytest.raises(lora.LoraMismatchError):  # a LoRA of another base, refused before anything is read
        wrong = lora.LoraFile({"unet.nowhere.lora_A.weight": torch.zeros(8, 4),
                               "unet.nowhere.lora_B.weight": torch.zeros(4, 8)}, {"r": 8, "lora_alpha": 8}, {})
        streaming.load_denoiser("toy", "cpu", preset=wrong)
    with pytest.raises(ValueError, match="needs the 8-bit base"):
        streaming.load_denoiser("toy", "cpu", preset=presets["toy"], mode="requant", eight_bit=False)


MARGIN = 0.10, 4 * 2**20  # |measured - predicted| <= 10% of the prediction + 4 MiB


def test_the_predicted_loading_peak_is_measured(tmp_path):
    """bench/stream_memory.py's measurement on a 40 MiB (fp32) SD-1.5-like UNet in 6 shards: RssAnon's
    sampled peak while streaming it with a fuse preset, in a fresh process, against loading_peak."""
    folder = stream_memory.make_base(tmp_path / "small", stream_memory.small_unet(), "8MB")
    predicted = stream_memory.predicted(folder, "fuse")
    measured = stream_memory.run_in_subprocess(folder, "stream", "fuse")
    rise, after = measured["anon_peak"] - measured["anon_before"], measured["anon_after"] - measured["anon_before"]
    assert abs(rise - predicted["peak"]) <= MARGIN[0] * predicted["peak"] + MARGIN[1], (rise, predicted)
    assert abs(after - predicted["resident"]) <= MARGIN[0] * predicted["resident"] + MARGIN[1], (after, predicted)
    assert predicted["peak"] < 0.8 * predicted["full_fp32"]
