"""Which dtype a denoiser computes in on a device.

    CPU             fp32
    CUDA sm80+      bf16 (Ampere and newer: A100, RTX 30xx/40xx, H100)
    CUDA < sm80     fp16 (a T4 is sm75)
"""

from __future__ import annotations

import torch


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU; bf16 on sm80+ (Ampere and newer); fp16 on older GPUs (T4 is sm75)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
