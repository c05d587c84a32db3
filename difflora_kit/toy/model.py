"""The toy base model: a small diffusers UNet2DConditionModel, a small CLIP text encoder and a
word-level CLIP tokenizer, all real diffusers/transformers classes, laid out like a diffusers
pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/) so that the toy model loads
through the same `--base PATH` code path a real model does.

Pixel space (no VAE): the UNet denoises 32x32 RGB directly. Attention only at 8x8 (down, mid, up)
(at 16x16 a training step costs 2.2x as much on this CPU; at 32x32 far more). The caption also enters every ResNet through diffusers'
`addition_embed_type="text"` (attention-pooled text states added to the time embedding): with
cross-attention alone at 8x8, 500 pretraining steps drew the right foreground colour in 8% of
held-out samples. v-prediction on a cosine schedule
rescaled to zero terminal SNR: an epsilon model of this size leaves a background colour cast
(../shared/toy_experiment), v + zero-SNR does not.
"""

from __future__ import annotations

import itertools

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .. import diffusion
from . import world

TEXT_DIM = 64
MAX_TOKENS = 12


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=world.RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=8,
        addition_embed_type="text",  # attention-pooled text added to the time embedding:
        addition_embed_type_num_heads=4,  # the caption reaches every ResNet, not only the 8x8 attention
    )


def vocabulary() -> list[str]:
    words = ["a", "an", "on", "background"] + list(world.SHAPES) + list(world.FOREGROUNDS) + list(world.BACKGROUNDS)
    return sorted(set(words))


def build_tokenizer() -> CLIPTokenizer:
    """A word-level CLIP BPE: every world word is one token (merges spell each word out)."""
    letters = sorted({ch for w in vocabulary() for ch in w})
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + letters + [ch + "</w>" for ch in letters]
    merges: list[tuple[str, str]] = []
    for word in vocabulary():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: ("r", "e"), ("re", "d</w>")
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        clip_sample=False,
    )


def sampling_scheduler(train: DDPMScheduler, solver: str = "ddim"):
    """The toy's sampler: diffusion.sampling_scheduler, DDIM's last step to alpha_bar of t = 0 (not 1)."""
    return diffusion.sampling_scheduler(train, solver, set_alpha_to_one=False)
