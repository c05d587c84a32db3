"""Averaging LoRAs exactly, in weight-delta space.

    mean_i  w_i * (alpha_i / r_i) * B_i @ A_i  =  [w_1 c_1 B_1 | ... | w_N c_N B_N] @ [A_1; ...; A_N]
                                                     (out, sum r_i)                    (sum r_i, in)

so the exact average is itself a LoRA of rank sum(r_i) (concatenate along the rank, fold each
member's weight and scale into its B, alpha = rank so the file's own scale is 1). Averaging A
and B separately is NOT this: the product of averages is not the average of products.
"""

from __future__ import annotations

import torch

from .lora import LoraFile, LoraMismatchError


def exact_average(loras: list[LoraFile], weights: list[float] | None = None) -> LoraFile:
    """One LoRA whose delta-W is the weighted mean (default 1/N each) of the members' delta-W."""
    if not loras:
        raise ValueError("nothing to average: give at least one LoRA")
    weights = weights or [1.0 / len(loras)] * len(loras)
    if len(weights) != len(loras):
        raise ValueError(f"{len(weights)} weights for {len(loras)} LoRAs")
    names = list(loras[0].modules())
    for i, l in enumerate(loras[1:], 2):
        if set(l.modules()) != set(names):
            diff = sorted(set(l.modules()) ^ set(names))
            raise LoraMismatchError(f"LoRA {i} adapts other modules than LoRA 1 (e.g. {diff[:3]}); average LoRAs of one base and targets")
    tensors = {}
    for name in names:
        As, Bs = [], []
        for w, l in zip(weights, loras):
            A, B = l.modules()[name]
            As.append(A.float())  # (r_i, in[, kh, kw])
            Bs.append(B.float() * (w * l.scaling(name)))  # (out, r_i[, 1, 1])
        tensors[f"unet.{name}.lora_A.weight"] = torch.cat(As, 0)  # (sum r, in[, kh, kw])
        tensors[f"unet.{name}.lora_B.weight"] = torch.cat(Bs, 1)  # (out, sum r[, 1, 1])
    rank = sum(l.rank for l in loras)
    config = {**loras[0].config, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}
    meta = {"stage": "average", "members": ",".join(l.digest() for l in loras),
            "weights": ",".join(f"{w:g}" for w in weights), "base": loras[0].meta.get("base", "")}
    return LoraFile(tensors, config, meta)
