"""Encode first (pair.prepare_base, LatentBackend.encode_first): the encoders and the VAE encode a stage's
image and prompts into the backend's caches and leave the GPU before the denoiser is streamed in.

    load encoders + VAE (a shapes-only denoiser) -> encode -> offload_encoders -> load_denoiser -> attach

On the tiny random pipelines of every latent family. The reference is the old order (`old_order`: what
pair.train_stage did before: the denoiser streamed, the encoders loaded beside it, train_lora encoding
with the denoiser resident); the LoRAs must be the same, bit for bit. On a CPU offload_encoders does
nothing, so its effect is checked on a backend that says it is on a GPU (`test_offload_...`).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflora_kit import backends, health, lora, pair, streaming
from difflora_kit.backends.latent import LatentBackend, image_key
from difflora_kit.config import TrainConfig
from difflora_kit.tiny_models import make_tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from memory import random_lora  # noqa: E402  (random A, B on a denoiser's shapes)

FAMILIES = ("sd15", "sdxl", "flux", "zimage")
PROMPT = "a red circle on a blue background"
CFG = TrainConfig(steps=2, batch=2)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode_first")
    return {f: backends.resolve_base(make_tiny_pipeline(f, root / f)) for f in FAMILIES}


def _images(base, n=2, seed=0):
    side = backends.sample_size(base)
    return list(np.random.default_rng(seed).random((n, side, side, 3)).astype(np.float32))


def vae_latents(backend, images: np.ndarray) -> torch.Tensor:
    """LatentBackend.encode_images before the latent cache: the VAE itself, (posterior mean - shift) * scale."""
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2).to(backend.device, backend.dtype) * 2 - 1
    with torch.no_grad():
        latents = backend.vae.encode(x).latent_dist.mean.float()
    config = backend.vae.config
    return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor


def old_order(base, image, prompt, cfg, preset=None):
    """pair.train_stage before encode first: denoiser streamed, encoders and VAE beside it, then
    train_lora encoding with the VAE straight (no latent cache)."""
    denoiser = streaming.load_denoiser(base, "cpu", None, preset, cfg.preset_scale, cfg.preset_mode, cfg.eight_bit)
    backend = backends.load_backend(base, "cpu", denoiser=denoiser)
    backend.encode_images = lambda images: vae_latents(backend, images)
    return pair._train(backend, image, prompt, cfg, base, preset, False, None, False)


@pytest.fixture
def events(monkeypatch):
    """What the encoders, the offload, the streaming and the attach do, in order. At the stream, the
    backend's caches are read (the offloading backend is the one streamed into)."""
    log, seen = [], {}

    def spy(cls, name, record):
        real = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            record(self, *args)
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    for cls in {backends.registry.get(f).backend_class() for f in FAMILIES}:  # each family's own _encode_one
        spy(cls, "_encode_one", lambda self, p: log.append(("prompt", p)))
    spy(LatentBackend, "_vae_encode", lambda self, images: log.append(("image", len(images))))
    spy(LatentBackend, "offload_encoders", lambda self: (log.append(("offload",)), seen.update(backend=self)))
    spy(LatentBackend, "attach_denoiser", lambda self, d: log.append(("attach",)))
    real_load = streaming.load_denoiser

    def load(*args, **kwargs):
        b = seen.get("backend")  # None: no latent backend offloaded before (the toy)
        log.append(("stream", *((sorted(b._state_cache), sorted(b._latent_cache)) if b else ())))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(streaming, "load_denoiser", load)
    return log


@pytest.mark.parametrize("family", FAMILIES)
def test_the_encoders_leave_before_the_denoiser_and_the_loras_are_bit_equal_to_the_old_order(family, bases, events):
    base = bases[family]
    image1, image2 = _images(base)
    new1 = pair.train_stage(image1, PROMPT, CFG, base, progress=False)
    assert events == [("prompt", PROMPT), ("prompt", ""), ("image", 1), ("offload",),
                      ("stream", sorted([PROMPT, ""]), [image_key(image1)]), ("attach",),
                      ("offload",)]  # train_lora's: every encoding it asked for was in the caches
    events.clear()
    new2 = pair.train_stage(image2, PROMPT, CFG, base, new1.lora, progress=False)  # step 2: the same order
    assert [e[0] for e in events] == ["prompt", "prompt", "image", "offload", "stream", "attach", "offload"]
    assert events[4][2] == [image_key(image2)]

    old1 = old_order(base, image1, PROMPT, CFG)
    old2 = old_order(base, image2, PROMPT, CFG, old1.lora)
    for new, old in ((new1, old1), (new2, old2)):
        assert new.losses == old.losses and new.lora.meta == old.lora.meta
        assert new.lora.tensors.keys() == old.lora.tensors.keys() and len(new.lora.tensors) > 0
        assert all(torch.equal(new.lora.tensors[k], old.lora.tensors[k]) for k in old.lora.tensors)


@pytest.mark.parametrize("family", ["sd15", "flux"])  # flux: a VAE with a shift_factor
def test_the_latent_cache_returns_what_the_vae_gives(family, bases, monkeypatch):
    backend = backends.load_backend(bases[family], "cpu")
    a, b, c, d = _images(bases[family], 4)
    want_a, want_b, want_cd = (vae_latents(backend, np.stack(x)) for x in ([a], [b], [c, d]))  # the VAE itself
    calls = []
    real = backend.vae.encode
    monkeypatch.setattr(backend.vae, "encode", lambda x: (calls.append(x.shape[0]), real(x))[1])
    got = backend.encode_images(a[None])
    assert torch.equal(got, want_a) and calls == [1]
    got.add_(1.0)  # the caller's tensor is its own: the cache is untouched
    assert torch.equal(backend.encode_images(a[None].astype(np.float64)), want_a) and calls == [1]  # a hit
    both = backend.encode_images(np.stack([b, a, b]))  # only b is encoded, once, alone
    assert calls == [1, 1] and torch.equal(both, torch.cat([want_b, want_a, want_b]))
    pair_ = backend.encode_images(np.stack([c, d]))  # two new ones: encoded together, each row as the VAE gave it
    assert calls == [1, 1, 2] and torch.equal(pair_, want_cd)
    assert got.stride() == want_a.stride() and pair_.stride() == want_cd.stride()  # the VAE's memory layout too
    assert image_key(a) != image_key(a.transpose(1, 0, 2)) and image_key(a) != image_key(b)


def test_offload_on_a_gpu_moves_the_encoders_and_the_vae_to_the_cpu(bases, monkeypatch):
    backend = backends.load_backend(bases["sdxl"], "cpu")
    modules = {"vae": backend.vae, "text_encoder": backend.text_encoders[0], "text_encoder_2": backend.text_encoders[1]}
    moves, emptied = [], []
    for name, m in modules.items():  # recorded, not moved: this machine may have no GPU
        monkeypatch.setattr(m, "to", lambda device, name=name: moves.append((name, str(device))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    backend.offload_encoders()
    assert moves == [] and emptied == []  # a CPU backend: nothing to free
    backend.device = torch.device("cuda")  # as offload_encoders sees a GPU backend
    backend.offload_encoders()
    assert moves == [("vae", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu")] and emptied == [True]
    moves.clear()
    images = backend.decode(torch.zeros(1, *backend.latent_shape))  # decoding: the VAE comes back first
    side = backends.sample_size(bases["sdxl"])
    assert moves == [("vae", "cuda")] and images.shape == (1, side, side, 3)


def test_a_shapes_only_denoiser_stays_put_and_is_replaced_by_one_of_its_kind(bases):
    base = bases["sd15"]
    backend = backends.load_backend(base, "cpu", denoiser=streaming.meta_denoiser(base))
    assert next(backend.unet.parameters()).is_meta and backend.to("cpu").unet.device.type == "meta"
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        backend.attach_denoiser(torch.nn.Linear(2, 2))
    denoiser = streaming.load_denoiser(base, "cpu")
    backend.attach_denoiser(denoiser)
    assert backend.unet is denoiser and not denoiser.training


def test_what_was_not_encoded_first_still_encodes(bases):
    base = bases["sdxl"]
    image = _images(base, 1)[0]
    backend = pair.prepare_base(base, CFG, encode=pair.Encodes((), ("a blue square",)))
    fresh = backends.load_backend(base, "cpu")
    assert sorted(backend._state_cache) == ["", "a blue square"] and not backend._latent_cache
    prompts = ["a blue square", "a green triangle", ""]
    assert torch.equal(backend.encode_prompts(prompts), fresh.encode_prompts(prompts))
    assert torch.equal(backend.encode_images(image[None]), fresh.encode_images(image[None]))


def test_the_health_report_encodes_nothing_once_the_denoiser_is_there(bases, events):
    base = bases["sd15"]
    image2 = _images(base, 1)[0]
    lora2 = random_lora(streaming.meta_denoiser(base), 4, CFG.targets)  # any LoRA will do
    plain = pair.prepare_base(base, CFG, encode=health.report_encodes(base, PROMPT, image2))
    streamed = [e[0] for e in events].index("stream")
    events.clear()
    figures = health.measure(plain, lora2, PROMPT, image2, health.HealthConfig(prompts=8, seeds=1))
    assert events == [] and len(figures["other_prompts"]) == len(health.GENERIC_PROMPTS)  # none of GENERIC is PROMPT
    assert streamed == len(health.GENERIC_PROMPTS) + 2 + 1 + 1  # own + others + "", image 2, offload


def test_a_lora_of_another_base_fails_before_the_encoders_load(bases, monkeypatch):
    sd15, flux = bases["sd15"], bases["flux"]
    meta = streaming.meta_denoiser(flux)
    other = random_lora(meta, 4, backends.registry.FLUX.backend_class().targets_for(meta.config))
    loads = []
    monkeypatch.setattr(backends, "load_backend", lambda *a, **k: loads.append(a))
    with pytest.raises(lora.LoraMismatchError, match="another base"):
        pair.prepare_base(sd15, CFG, other)
    assert loads == []


def test_the_toy_loads_as_it_did(events):
    backend = pair.prepare_base("toy", CFG, encode=pair.Encodes(prompts=(PROMPT,)))
    assert events == [("stream",)]  # streamed and loaded as before: nothing encoded first, nothing offloaded
    assert not next(backend.unet.parameters()).is_meta and backend.family.pixel_space
