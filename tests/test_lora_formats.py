"""lora_formats.detect: every LoRA file format the kit knows, from keys and header alone; lora.load reads the
ones it can and names the ones it cannot with what to do."""

import pytest
import torch

from difflora_kit import lora, lora_formats

A, B = ".lora_A.weight", ".lora_B.weight"
CASES = [
    ("kit", {f"unet.down_blocks.0.proj_in{A}", f"unet.down_blocks.0.proj_in{B}"}, {"difflora.stage": "2"}),
    ("diffusers", {f"transformer.layers.0.attention.to_q{A}", f"transformer.layers.0.attention.to_q{B}"}, {}),
    ("diffusers", {f"layers.0.attention.to_q{A}", f"layers.0.attention.to_q{B}"}, {}),  # bare peft keys
    ("peft", {f"base_model.model.down_blocks.0.proj_in{A}", f"base_model.model.down_blocks.0.proj_in{B}"}, {}),
    ("comfyui", {f"diffusion_model.layers.0.attention.to_q{A}", f"diffusion_model.layers.0.attention.to_q{B}"}, {}),
    ("kohya", {"lora_unet_down_blocks_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_proj_in.lora_up.weight",
               "lora_unet_down_blocks_0_proj_in.alpha"}, {}),
    ("kohya", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"}, {}),
    ("kohya-ldm", {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                   "lora_unet_input_blocks_1_1_proj_in.lora_up.weight"}, {}),
    ("diffsynth", {"layers.0.attention.to_q.lora_A.default.weight", "layers.0.attention.to_q.lora_B.default.weight"}, {}),
    ("diffsynth", {f"blocks.0.attn.a_to_qkv{A}", f"blocks.0.attn.a_to_qkv{B}"}, {}),  # FLUX, DiffSynth's names
    ("diffusers-old", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight"}, {}),
    ("unknown", {"model.diffusion_model.input_blocks.0.0.weight"}, {}),
]


@pytest.mark.parametrize("want, keys, header", CASES)
def test_detect_names_the_format(want, keys, header):
    assert lora_formats.detect(keys, header).key == want


@pytest.mark.parametrize("fmt", ["kohya-ldm", "diffusers-old", "unknown"])
def test_formats_the_kit_does_not_read_are_named_with_what_to_do(fmt):
    keys = next(k for key, k, _ in CASES if key == fmt)
    tensors = {k: torch.zeros(2, 2) for k in keys}
    with pytest.raises(lora.LoraMismatchError) as e:
        lora.from_tensors(tensors, {})
    assert (lora_formats.LABELS[fmt] in str(e.value)) or "no LoRA tensors" in str(e.value)
    if fmt != "unknown":
        assert "ComfyUI" in str(e.value) and "load_lora_weights" in str(e.value)
