"""How a diffusers UNet2DConditionModel is called in training, as shapes: what the memory plan runs
on the meta device for the toy, SD 1.x and SDXL.

    x (B, C, side, side), t (B,) int64, text states (B, T, cross_attention_dim)
    SDXL (addition_embed_type "text_time"): added_cond_kwargs = pooled text_embeds (B, P) and
    time_ids (B, 6), with P = projection_class_embeddings_input_dim - 6 * addition_time_embed_dim
"""

from __future__ import annotations

import torch


def unet_plan_inputs(config: dict, batch: int, side: int, tokens: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    """(args, kwargs) of one training call of the UNet of `config`, as meta tensors."""
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(batch, config.get("in_channels", 4), side, side, **meta)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    states = torch.empty(batch, tokens, config["cross_attention_dim"], **meta)
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6
        pooled = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
        extra["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, **meta),
                                      "time_ids": torch.empty(batch, time_ids, **meta)}
    return (x, t, states), extra


def unet_latent_multiple(config: dict) -> int:
    """The latent is halved once per level of the UNet: sides are multiples of 2^(levels - 1)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


class UNetPlan:
    """The memory plan's class methods of a Backend whose denoiser is a UNet2DConditionModel (toy, SD)."""

    @classmethod
    def latent_multiple(cls, config: dict) -> int:
        return unet_latent_multiple(config)

    @classmethod
    def plan_inputs(cls, config: dict, batch: int, side: int, tokens: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        return unet_plan_inputs(config, batch, side, tokens, dtype)
