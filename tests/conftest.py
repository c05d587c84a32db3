import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in its interpreter on CPU; it must be set before anything imports triton
# (bitsandbytes may). On a CUDA machine the kernels compile for real (tests/test_kernels_gpu.py).
import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


@pytest.fixture(scope="session")
def tiny_pair_loras():
    """LoRA 1 and LoRA 2 of one shipped pair on a very short schedule (plumbing, not quality)."""
    from difflora_kit.config import TrainConfig
    from difflora_kit.demo import DEFAULT_PAIRS
    from difflora_kit.images import load_image
    from difflora_kit.pair import train_pair
    from difflora_kit.toy.pairs import read_pairs

    row = read_pairs(DEFAULT_PAIRS)[0]
    cfg = TrainConfig(steps=8, lr=1e-2)
    result = train_pair(load_image(row["image1"]), load_image(row["image2"]), row["prompt"], cfg, progress=False)
    return result, row, cfg
