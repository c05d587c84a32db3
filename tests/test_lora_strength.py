"""The strength is in the weights: a LoRA with rank != alpha, written by the kit, gets the same weight
change in every loader the kit documents, including the ones that never read the header's alpha.

diffusers 0.42.1's `unet.load_lora_adapter(path, prefix="unet")` with a plain path ignores the header
(alpha = r, scale 1); `pipe.load_lora_weights(path)` reads it. Files written with alpha / r folded into B
and alpha = r (lora.fold_scale) read the same in both. An old file (alpha != r in the header) is read by
the kit as before, and the plain-path loader gets it wrong: that is what the folding is for."""

import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from difflora_kit import lora
from difflora_kit.config import DEFAULT_TARGETS
from difflora_kit.tiny_models import make_tiny_pipeline

RANK, ALPHA = 4, 8.0  # scale 2
ODD, ODD_RANK, ODD_ALPHA = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2, 3.0  # scale 1.5


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return make_tiny_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "base")


@pytest.fixture(scope="module")
def lora_with_alpha(sd15):
    """A random rank-4, alpha-8 LoRA on the tiny SD 1.5 UNet, one module rank 2 alpha 3 (peft patterns),
    as it was before folding: scales 2 and 1.5 in the header only."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15 / "unet")
    torch.manual_seed(0)
    unet.add_adapter(lora.peft_config(RANK, ALPHA, DEFAULT_TARGETS), adapter_name="t")
    sd = {k: torch.randn_like(v) * 0.1 for k, v in get_peft_model_state_dict(unet, adapter_name="t").items()}
    tensors = {f"unet.{k}": v for k, v in sd.items()}
    tensors[f"unet.{ODD}.lora_A.weight"] = tensors[f"unet.{ODD}.lora_A.weight"][:ODD_RANK].clone()
    tensors[f"unet.{ODD}.lora_B.weight"] = tensors[f"unet.{ODD}.lora_B.weight"][:, :ODD_RANK].clone()
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(DEFAULT_TARGETS),
              "rank_pattern": {ODD: ODD_RANK}, "alpha_pattern": {ODD: ODD_ALPHA}}
    the_lora = lora.LoraFile(tensors, config, {"stage": "2"})
    assert the_lora.scaling(ODD) == 1.5 and {the_lora.scaling(n) for n in the_lora.modules()} == {1.5, 2.0}
    return the_lora


def _write_old_file(path, the_lora: lora.LoraFile) -> None:
    """The file as the kit wrote it before folding: B as trained, alpha != r in the header only."""
    header = {"format": "pt", lora.DIFFUSERS_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in the_lora.config.items()})}
    save_file({k: v.contiguous() for k, v in the_lora.tensors.items()}, str(path), metadata=header)


def _deltas(unet, adapter: str) -> dict[str, torch.Tensor]:
    """{module: the weight change peft applies} for every module that carries `adapter`."""
    return {n: m.get_delta_weight(adapter).detach().float() for n, m in unet.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _by_load_lora_adapter(folder, path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="x")  # a plain path: the documented call
    return _deltas(unet, "x")


def _by_load_lora_weights(folder, path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.load_lora_weights(str(path), adapter_name="x")
    return _deltas(pipe.unet, "x")


def _by_peft(folder, path):
    """peft alone: the config from the file's header, the tensors with the "unet." prefix taken off."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[lora.DIFFUSERS_METADATA_KEY])
        sd = {k[len("unet."):]: f.get_tensor(k) for k in f.keys()}
    fields = LoraConfig.__dataclass_fields__
    config = LoraConfig(**{k[len("unet."):]: v for k, v in header.items() if k[len("unet."):] in fields})
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    inject_adapter_in_model(config, unet, adapter_name="x")
    set_peft_model_state_dict(unet, sd, adapter_name="x")
    return _deltas(unet, "x")


def _by_the_kit(folder, path):
    return lora.module_deltas(lora.load(path))


LOADERS = {"load_lora_adapter(path)": _by_load_lora_adapter, "load_lora_weights": _by_load_lora_weights,
           "peft": _by_peft, "the kit": _by_the_kit}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_the_kit_writes_has_its_strength_in_every_loader(sd15, lora_with_alpha, loader, tmp_path):
    path = tmp_path / "lora2.safetensors"
    lora.save(path, lora_with_alpha)
    back = lora.load(path)
    assert back.alpha == back.rank == RANK and {back.scaling(n) for n in back.modules()} == {1.0}  # alpha = r
    assert back.config["alpha_pattern"] == back.config["rank_pattern"] == {ODD: ODD_RANK}
    _assert_same(LOADERS[loader](sd15, path), lora.module_deltas(lora_with_alpha))


def test_a_trained_lora_is_folded_before_it_is_written(sd15):
    """What training returns (lora.adapter_state) is already at scale 1: the LoRA in memory and its file
    are the same tensors (digests compare), with the trained alpha kept in the kit's metadata only."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd15 / "unet")
    lora.attach(unet, RANK, ALPHA, ("to_q",), name="t")
    torch.manual_seed(1)
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    tensors, config = lora.adapter_state(unet, "t")
    assert config["r"] == config["lora_alpha"] == RANK
    _assert_same(lora.module_deltas(lora.LoraFile(tensors, config, {})), _deltas(unet, "t"))


def test_an_old_file_with_alpha_in_the_header_reads_as_before(sd15, lora_with_alpha, tmp_path):
    """The kit and load_lora_weights read its scale from the header; the plain-path loader does not (why
    files are folded now): every module gets scale 1 there, half (or 2/3) of what the file means."""
    path = tmp_path / "old.safetensors"
    _write_old_file(path, lora_with_alpha)
    want = lora.module_deltas(lora_with_alpha)
    _assert_same(_by_the_kit(sd15, path), want)
    _assert_same(_by_load_lora_weights(sd15, path), want)
    plain = _by_load_lora_adapter(sd15, path)
    for name in want:  # scale 1 where the file means alpha / r
        torch.testing.assert_close(plain[name] * lora_with_alpha.scaling(name), want[name], atol=1e-6, rtol=1e-5)
