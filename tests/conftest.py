import os
import warnings


def session_environment(cuda: bool) -> dict[str, str]:
    """What the test session sets, unless the environment already has it, on a machine with or without CUDA.

    DIFFLORA_DEVICE=cpu   the "CPU" tests stay on the CPU on a GPU machine too (difflora_kit.backends'
                          default_device would take CUDA; tests/test_quant.py would hand fp32 to bitsandbytes'
                          CUDA quantizer, the claims' tolerances were measured on the CPU). A GPU test names its
                          device (tests/test_kernels_gpu.py, test_quant_gpu.py) or removes the variable
                          (tests/test_devices.py); `DIFFLORA_DEVICE=cuda pytest ...` sends every test there.
    TRITON_INTERPRET=1    without CUDA only: the Triton kernels run in its interpreter on CPU tensors
                          (tests/test_kernels.py). On a CUDA machine they compile for real
                          (tests/test_kernels_gpu.py) and the CPU kernel tests skip; the kit's "auto" merge
                          sends CPU tensors to the PyTorch reference on either machine.
    Tested in tests/test_session_device.py."""
    env = {"DIFFLORA_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not cuda:
        env["TRITON_INTERPRET"] = "1"
    return env


# Before anything imports triton (bitsandbytes may) or reads the device: importing torch imports neither.
import torch  # noqa: E402

for _name, _value in session_environment(torch.cuda.is_available()).items():
    os.environ.setdefault(_name, _value)

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


@pytest.fixture(scope="session")
def notebook_cwd(tmp_path_factory):
    """One working folder for all notebooks of the session, plain or under the stand-in CUDA device (files
    one notebook writes, the next may read: notebook 5 picks up notebook 4's LoRA 1)."""
    return tmp_path_factory.mktemp("notebooks")
