"""Block swap (difflora_kit.block_swap): the bookkeeping on a CPU, where "device" and "host" are both the CPU.

The same LoRA, bit for bit, with and without it; each offloaded block brought in as often as the schedule
says; an offloaded block holds nothing between its uses; the plan sizes the blocks as they move.
Its GPU speed and peak are predicted (plan.MemoryPlan.block_swap), not measured here."""

import pytest
import torch

from difflora_kit import block_swap, plan
from difflora_kit.config import TrainConfig
from difflora_kit.demo import DEFAULT_PAIRS
from difflora_kit.images import load_image
from difflora_kit.pair import prepare_base
from difflora_kit.toy.pairs import read_pairs
from difflora_kit.train import train_lora

TOY_BLOCKS = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]


@pytest.fixture(scope="module")
def row():
    return read_pairs(DEFAULT_PAIRS)[0]


def _train(row, offload: int, steps: int = 3):
    cfg = TrainConfig(steps=steps, gradient_checkpointing=True, offload_blocks=offload)
    backend = prepare_base("toy", cfg, device="cpu")  # the 8-bit toy, streamed as a stage loads it
    return backend, train_lora(backend, load_image(row["image1"]), row["prompt"], cfg, progress=False)


def _expected_counts(n: int, steps: int) -> list[list[int]]:
    """The schedule, written out: step 1's forward brings every block in, later forwards all but blocks 0 and 1
    (still there from the backward before); every backward all but the last two (still there from the forward)."""
    first = [1 + (k <= n - 3) for k in range(n)]
    later = [(k >= 2) + (k <= n - 3) for k in range(n)]
    return [first] + [later] * (steps - 1)


def test_swappable_blocks_are_the_repeated_blocks():
    toy = plan._meta_denoiser(plan.describe("toy"), torch.float32)
    assert [name for name, _ in block_swap.swappable_blocks(toy)] == TOY_BLOCKS
    flux = plan._meta_denoiser(plan.describe("flux"), torch.bfloat16)
    names = [name for name, _ in block_swap.swappable_blocks(flux)]
    assert names[0] == "transformer_blocks.0" and names[18] == "transformer_blocks.18"
    assert names[19] == "single_transformer_blocks.0" and len(names) == 19 + 38
    with pytest.raises(ValueError, match="no repeated blocks"):
        block_swap.swappable_blocks(torch.nn.Linear(2, 2))


def test_choose_takes_the_largest_in_run_order():
    assert block_swap.choose([5, 9, 9, 1], 2) == [1, 2]
    assert block_swap.choose([3, 3, 3, 3], 2) == [2, 3]  # a tie: the later blocks
    assert block_swap.choose([3, 1, 2], 0) == []
    with pytest.raises(ValueError, match="between 0 and the denoiser's 3 blocks"):
        block_swap.choose([3, 1, 2], 4)


def test_bytes_per_step_follows_the_schedule():
    sizes = [1, 2, 4, 8, 16]
    assert block_swap.bytes_per_step(sizes) == (4 + 8 + 16) + (1 + 2 + 4)  # forward: 2.., backward: ..N-3
    assert block_swap.bytes_per_step([7, 9]) == 0  # two blocks: both stay in
    assert block_swap.in_flight_bytes(sizes) == 16 + 8


def test_config_refuses_block_swap_without_checkpointing():
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        TrainConfig(offload_blocks=2)
    with pytest.raises(ValueError, match="offload_blocks must be >= 0"):
        TrainConfig(offload_blocks=-1, gradient_checkpointing=True)


@pytest.mark.parametrize("offload", [2, 7])
def test_same_lora_bit_for_bit_and_each_block_brought_in_as_scheduled(row, offload):
    _, whole = _train(row, 0)
    backend, swapped = _train(row, offload)
    a, b = whole.lora.tensors, swapped.lora.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses == swapped.losses
    log = swapped.block_swap
    assert whole.block_swap is None and len(log.names) == offload
    assert log.counts == _expected_counts(offload, 3)
    assert log.misses == [1, 0, 0]  # each block fetched ahead of its use, in both passes, but the very first
    assert log.bytes_per_step[1:] == [block_swap.bytes_per_step(log.sizes)] * 2  # what the plan predicts moves
    # afterwards the denoiser is whole again: no hooks left, no placeholders
    assert all(t.device.type == "cpu" for t in [*backend.unet.parameters(), *backend.unet.buffers()])
    assert not any(m._forward_pre_hooks for m in backend.unet.modules())


def test_an_offloaded_block_holds_nothing_between_uses(row, monkeypatch):
    backend = prepare_base("toy", TrainConfig(), device="cpu")
    unet = backend.unet.requires_grad_(False)  # frozen, as under a LoRA: every tensor of a block moves
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    states = backend.encode_prompts([row["prompt"]]).expand(2, -1, -1)
    with torch.no_grad():
        ref = backend.denoiser(x, t, states)
        with block_swap.offloaded(unet, 7) as swap:
            held = [v for _, m in block_swap.swappable_blocks(unet) for *_, v in block_swap._slots(m)]
            assert held and all(v.device.type == "meta" for v in held)  # nothing but placeholders
            assert torch.equal(backend.denoiser(x, t, states), ref)
            assert swap.most_resident == 2 and swap.counts == [1] * 7 and swap.misses == 1
            assert sum(b.resident for b in swap.blocks) == 2  # the last block and the one before it
        after = unet.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        # the control: a swap that forgets to bring a block in fails loudly, it does not read stale memory
        monkeypatch.setattr(block_swap.BlockSwap, "_bring_in", lambda self, i: None)
        with pytest.raises((NotImplementedError, RuntimeError)), block_swap.offloaded(unet, 1):
            backend.denoiser(x, t, states)


def test_plan_sizes_the_blocks_as_they_move():
    cfg = TrainConfig(gradient_checkpointing=True, offload_blocks=3)
    p = plan.plan_memory("toy", cfg=cfg, dtype="fp32")  # the toy trains in fp32
    backend = prepare_base("toy", TrainConfig(), device="cpu")  # 8-bit, as planned
    backend.unet.requires_grad_(False)  # frozen, as under a LoRA
    real = [(name, block_swap.frozen_bytes(m)) for name, m in block_swap.swappable_blocks(backend.unet)]
    assert p.blocks == real
    s = p.block_swap(3)
    sizes = [b for _, b in real]
    picked = block_swap.choose(sizes, 3)
    assert s.blocks == [real[i][0] for i in picked]
    whole = max(q.peak for q in p.whole_steps)
    assert s.step_peak == whole - s.offloaded + s.in_flight == max(p.step1.peak, p.step2.peak)
    assert s.moved == block_swap.bytes_per_step([sizes[i] for i in picked])
    assert p.block_swap(0).step_peak == whole and p.block_swap(0).moved == 0
    text = plan.format_plan(p)
    assert "block swap (--offload-blocks 3)" in text and "--offload-blocks 3" in p.settings()
    with pytest.raises(ValueError, match="denoiser's 7 blocks"):
        p.block_swap(8)


def test_flux_table_goes_down_with_more_blocks_off():
    rows = plan.block_swap_table("flux", (0, 20, 40), 1024)
    steps = [r.step_peak for r in rows]
    assert steps[0] > steps[1] > steps[2]
    assert rows[0].moved == 0 < rows[1].moved < rows[2].moved
    assert "| 20 |" in plan.format_block_swap_table(rows)
