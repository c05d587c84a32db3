"""Block swap (difflora_kit.block_swap): the bookkeeping on a CPU, where "device" and "host" are both the CPU.

The same LoRA, bit for bit, with and without it; each offloaded block brought in as often as the schedule
says; an offloaded block holds nothing between its uses; the plan sizes the blocks as they move; a block's
host copy is one buffer of its tensors' bytes (plus alignment); an error in a step stays the error raised
even when the blocks cannot come back afterwards. Its GPU speed and peak are predicted
(plan.MemoryPlan.block_swap), not measured here."""

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


# ----------------------------------------------------------------------------- one host buffer a block
def test_pack_puts_each_tensor_at_an_aligned_offset():
    assert block_swap.pack([1, 64, 0, 65, 3], align=64) == ([0, 64, 128, 128, 256], 320)
    assert block_swap.pack([]) == ([], 0)
    offsets, size = block_swap.pack([10, 7, 129])
    assert all(o % block_swap.ALIGN == 0 for o in offsets) and size - (10 + 7 + 129) < 3 * block_swap.ALIGN


def _frozen_toy(row):
    backend = prepare_base("toy", TrainConfig(), device="cpu")
    backend.unet.requires_grad_(False)  # frozen, as under a LoRA: every tensor of a block moves
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return backend, (x, torch.tensor([10, 500]), backend.encode_prompts([row["prompt"]]).expand(2, -1, -1))


def test_a_block_lives_in_one_host_buffer_of_its_tensors_bytes(row):
    """The host holds what the plan counts (frozen_bytes) plus alignment padding: one buffer a block, every
    tensor a view into it at a multiple of ALIGN, no two overlapping; afterwards the tensors own their memory."""
    backend, inputs = _frozen_toy(row)
    unet = backend.unet
    planned = {name: block_swap.frozen_bytes(m) for name, m in block_swap.swappable_blocks(unet)}
    with torch.no_grad():
        ref = backend.denoiser(*inputs)
        with block_swap.offloaded(unet, 7) as swap:
            for b in swap.blocks:
                base, spans = b.buffer.data_ptr(), []
                for g in b.groups:
                    assert g.host.untyped_storage().data_ptr() == base  # one storage: the block's buffer
                    start = g.host.data_ptr() - base
                    spans.append((start, start + g.host.numel() * g.host.element_size()))
                spans.sort()
                assert all(s % block_swap.ALIGN == 0 for s, _ in spans)
                assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])) and spans[-1][1] <= b.host_bytes
                assert b.nbytes == planned[b.name]  # the plan's figure
                assert b.host_bytes == b.buffer.numel() == block_swap.pack([e - s for s, e in spans])[1]
                assert b.nbytes <= b.host_bytes < b.nbytes + block_swap.ALIGN * len(b.groups)
            assert swap.host_bytes == sum(b.host_bytes for b in swap.blocks)
            assert torch.equal(backend.denoiser(*inputs), ref)
    for _, m in block_swap.swappable_blocks(unet):  # back in memory of their own, not views of a buffer
        for *_, t in block_swap._slots(m):
            assert t.device.type == "cpu" and t.untyped_storage().nbytes() == t.numel() * t.element_size()


class Boom(RuntimeError):
    pass


def _boom_in(module):
    def hook(*args):
        raise Boom("the original error (an out-of-memory error in the step, say)")

    return module.register_forward_hook(hook)


def test_an_error_in_a_forward_is_raised_and_the_blocks_come_back(row):
    backend, inputs = _frozen_toy(row)
    unet = backend.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    handle = _boom_in(unet.up_blocks[1])  # with every block offloaded, mid-forward
    with torch.no_grad(), pytest.raises(Boom), block_swap.offloaded(unet, 7):
        backend.denoiser(*inputs)
    handle.remove()
    after = unet.state_dict()
    assert all(v.device.type == "cpu" and torch.equal(before[k], v) for k, v in after.items())
    assert not any(m._forward_pre_hooks for m in unet.modules())


def test_blocks_that_cannot_come_back_leave_the_original_error_the_one_raised(row, monkeypatch):
    """Bringing the blocks back after an error can fail in turn (out of memory again): the original error is
    raised, with a note; the blocks that could not come back point at their host copies, nothing lost."""
    backend, inputs = _frozen_toy(row)
    unet = backend.unet
    with torch.no_grad():
        ref = backend.denoiser(*inputs)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    restore, calls = block_swap.BlockSwap._restore, []

    def restore_out_of_memory(self, b):
        calls.append(b.name)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a stand-in)")
        restore(self, b)

    monkeypatch.setattr(block_swap.BlockSwap, "_restore", restore_out_of_memory)
    handle = _boom_in(unet.up_blocks[1])
    with torch.no_grad(), pytest.raises(Boom) as raised, block_swap.offloaded(unet, 7):
        backend.denoiser(*inputs)
    handle.remove()
    assert type(raised.value) is Boom  # not the OutOfMemoryError of the restore
    note = "\n".join(getattr(raised.value, "__notes__", []))
    assert "OutOfMemoryError" in note and "5 of 7 (down_blocks.2, mid_block, up_blocks.0" in note
    assert "stay in host memory" in note
    after = unet.state_dict()  # every tensor real and unchanged: the last five blocks on their host copies
    assert all(v.device.type == "cpu" and torch.equal(before[k], v) for k, v in after.items())
    assert not any(m._forward_pre_hooks for m in unet.modules())
    with torch.no_grad():
        assert torch.equal(backend.denoiser(*inputs), ref)  # on a CPU the host is the device: it still runs
    # without an error unwinding, the restore's failure is what is raised
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError), block_swap.offloaded(unet, 7):
        pass


def test_train_lora_raises_the_original_error_when_the_blocks_cannot_come_back(row, monkeypatch):
    """The training loop hands its error to block swap's exit (not a bare close), so it stays the one raised."""
    def restore_out_of_memory(self, b):
        raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(block_swap.BlockSwap, "_restore", restore_out_of_memory)
    cfg = TrainConfig(steps=2, gradient_checkpointing=True, offload_blocks=3)
    backend = prepare_base("toy", cfg, device="cpu")
    handle = _boom_in(backend.unet.up_blocks[1])
    with pytest.raises(Boom) as raised:
        train_lora(backend, load_image(row["image1"]), row["prompt"], cfg, progress=False)
    handle.remove()
    assert "could not all come back" in "\n".join(getattr(raised.value, "__notes__", []))
    assert not any(m._forward_pre_hooks for m in backend.unet.modules()) and not backend.unet.training


def test_each_block_is_pinned_once_at_its_buffers_exact_size_and_unpinned_at_the_end(row, monkeypatch):
    """Page-locking goes through cudaHostRegister on the block's buffer (exactly its bytes, not a caching
    allocator's power of two), one registration a block, each undone at the end, after an error too.
    A stand-in for the CUDA runtime records the calls (nothing is page-locked on this CPU)."""
    import types

    registered, refuse = {}, [False, True]  # the runtime refuses the second block: a warning, not pinned

    def register(ptr, size, flags):
        if refuse and refuse.pop(0):
            return 2  # cudaErrorMemoryAllocation
        assert ptr not in registered
        registered[ptr] = size
        return 0

    def unregister(ptr):
        del registered[ptr]
        return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: types.SimpleNamespace(cudaHostRegister=register,
                                                                            cudaHostUnregister=unregister))
    backend, inputs = _frozen_toy(row)
    blocks = block_swap.swappable_blocks(backend.unet)
    with torch.no_grad():
        ref = backend.denoiser(*inputs)
    with pytest.warns(RuntimeWarning, match="could not page-lock"):
        swap = block_swap.BlockSwap(blocks, "cpu", pin=True)
    assert [b.pinned for b in swap.blocks] == [True, False] + [True] * (len(blocks) - 2)
    assert registered == {b.buffer.data_ptr(): b.host_bytes for b in swap.blocks if b.pinned}
    with torch.no_grad():
        assert torch.equal(backend.denoiser(*inputs), ref)
    swap.close()
    assert registered == {}
    # after an error too
    swap = block_swap.BlockSwap(blocks, "cpu", pin=True)
    assert len(registered) == len(blocks)
    handle = _boom_in(backend.unet.up_blocks[1])
    with torch.no_grad(), pytest.raises(Boom):
        try:
            backend.denoiser(*inputs)
        except Boom as error:
            swap.close(error)
            raise
    handle.remove()
    assert registered == {} and not any(b.pinned for b in swap.blocks)
