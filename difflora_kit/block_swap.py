"""Block swap: N of the denoiser's blocks live in pinned CPU memory, each brought in for its forward.

kohya's trainers fit FLUX LoRAs on small cards by keeping some transformer blocks off the GPU; here the
blocks are the 8-bit base's, so a block is a quarter of its fp32 size on the wire.

    block:      0     1     2     3    ...   N-1          (the offloaded blocks, in the order they run)
    forward:    run0  run1  run2  ...              pre-hook of block i: block i resident (wait for its copy),
    copies:          ->2   ->3   ->4  ...               block i+1 copied on a side stream (one ahead),
                                                        every other offloaded block released
    backward:   ...   run2  run1  run0                  gradient checkpointing reruns each block's forward,
    copies:     ...  ->1   ->0                          so the same pre-hooks fire in reverse: one behind

    resident at any moment: the block that runs and the one fetched ahead (two at most); at the turns
    (the last block of the forward, the first of the backward) the neighbour is still there, so a step in
    steady state copies every offloaded block twice except the first two (forward) and the last two
    (backward): bytes_per_step. The first step also brings in blocks 0 and 1.

Only frozen tensors move (the int8 codes and row scales of the 8-bit linears, frozen biases, norms and
convolutions, a frozen preset adapter); the LoRA's A and B train where they are (the optimizer holds
them). A released block keeps no tensors at all: its slots point at meta placeholders of the same
shape, so a block used before it is brought in fails loudly instead of reading stale memory.

On a GPU the copies run on a side stream (pinned host memory, non_blocking), the compute stream waits
for a block's copy event before its first kernel, and before each new copy the host waits for the
kernels of the block it just released: otherwise the host, queueing kernels far ahead of the GPU (until
loss.item()), would allocate every block before the GPU had freed any, and "two in flight" would not hold.
The price: a short GPU bubble per block while the host issues the next copy and the block's first kernels.

Block swap needs gradient checkpointing (TrainConfig refuses it without): without it autograd keeps every
block's 8-bit weights referenced until the backward pass (quant.FrozenInt8Matmul saves CB and SCB, a
norm its weight), so releasing a block frees nothing. With it the saved tensors go, and the rerun inside
backward passes through the block's pre-hooks again. Releasing happens in the next block's pre-hook,
not in a forward hook: a checkpoint's rerun stops early once it has what backward needs
(torch.utils.checkpoint's early stop), so a block's forward hook does not always fire. Every module of
a block gets the pre-hook, so a rerun of any part of it (a UNet checkpoints each resnet and transformer
block inside its down and up blocks) brings the whole block in. What a block runs outside a checkpoint
(a UNet's down/up samplers, its attention's norm and projections) keeps its device copy alive in autograd
until the backward has used it: still correct, only not freed; FLUX and Z-Image checkpoint whole blocks.

    with block_swap.offloaded(denoiser, 20) as swap:   # train as usual (gradient checkpointing on)
        ...
    swap.counts, swap.moved_bytes                      # how often each block came in, bytes copied

On a CPU the "device" and the "host" are both the CPU: every bring-in is still a copy and is counted,
so the bookkeeping runs (tests/test_block_swap.py); its speed and its GPU peak are predicted
(plan.MemoryPlan.block_swap), not measured here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

# the denoiser's repeated blocks, by family (attribute names of the diffusers classes), in the order they run
BLOCK_LISTS = (
    ("transformer_blocks", "single_transformer_blocks"),  # FluxTransformer2DModel
    ("layers",),  # ZImageTransformer2DModel (its two small refiners stay)
    ("down_blocks", "mid_block", "up_blocks"),  # UNet2DConditionModel (toy, SD 1.x, SDXL)
)


def swappable_blocks(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the denoiser's repeated blocks in the order its forward runs them: a FLUX
    transformer's double then single blocks, Z-Image's layers, a UNet's down, mid and up blocks."""
    for names in BLOCK_LISTS:
        if isinstance(getattr(denoiser, names[0], None), nn.Module):
            out = []
            for n in names:
                part = getattr(denoiser, n, None)
                if isinstance(part, nn.ModuleList):
                    out += [(f"{n}.{i}", b) for i, b in enumerate(part)]
                elif isinstance(part, nn.Module):
                    out.append((n, part))
            if out:
                return out
    raise ValueError(f"{type(denoiser).__name__}: no repeated blocks found to swap (looked for "
                     f"{', '.join(n for names in BLOCK_LISTS for n in names)})")


def choose(sizes: list[int], n: int) -> list[int]:
    """Indices of the n largest blocks (a later block first on a tie), in the order they run."""
    if not 0 <= n <= len(sizes):
        raise ValueError(f"offload_blocks must be between 0 and the denoiser's {len(sizes)} blocks, got {n}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], -i))
    return sorted(order[:n])


def bytes_per_step(sizes: list[int]) -> int:
    """Host-to-device bytes of one training step in steady state, for the offloaded blocks' sizes in the
    order they run (the module docstring's schedule): the forward copies blocks 2.., the backward ..N-3."""
    return sum(sizes[2:]) + sum(sizes[:max(0, len(sizes) - 2)])


def in_flight_bytes(sizes: list[int]) -> int:
    """Device bytes of offloaded blocks at the worst moment: the two largest (the one running, the one ahead)."""
    return sum(sorted(sizes, reverse=True)[:2])


# ----------------------------------------------------------------------------- a block's frozen tensors
@dataclasses.dataclass
class _Group:
    """One distinct frozen tensor and every attribute that points at it (an 8-bit weight is both the
    parameter's data and bitsandbytes' state.CB)."""

    host: torch.Tensor
    placeholder: torch.Tensor  # meta, same shape and dtype
    slots: list[tuple[str, object, str]]  # ("param" | "buffer" | "attr", owner, name)

    def point(self, t: torch.Tensor) -> None:
        for kind, owner, name in self.slots:
            if kind == "param":
                old = owner._parameters[name]  # a new one of its class (bitsandbytes' Int8Params too), not
                new = torch.Tensor._make_subclass(type(old), t, False)  # old.data = t: autograd may hold the
                new.__dict__.update(old.__dict__)  # old one (a leaf it saved), and meta is not allowed there
                owner._parameters[name] = new
            elif kind == "buffer":
                owner._buffers[name] = t
            else:
                setattr(owner, name, t)


def _int8_owners(module: nn.Module) -> list[object]:
    """bitsandbytes' objects of an 8-bit linear that hold tensors outside parameters and buffers."""
    import bitsandbytes as bnb

    if not isinstance(module, bnb.nn.Linear8bitLt):
        return []
    if module.weight.CB is not None:  # move CB/SCB to module.state now, as its first forward would
        module.init_8bit_state()
    return [module.state, module.weight]


def _slots(block: nn.Module) -> Iterator[tuple[str, object, str, torch.Tensor]]:
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None and not p.requires_grad:
                yield "param", module, name, p.data
        for name, b in module._buffers.items():
            if b is not None:
                yield "buffer", module, name, b
        for owner in _int8_owners(module):
            for name, t in list(vars(owner).items()):
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                    yield "attr", owner, name, t


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


class _Block:
    def __init__(self, name: str, module: nn.Module, host: torch.device, pin: bool):
        self.name, self.module = name, module
        groups: dict[tuple, _Group] = {}
        for kind, owner, attr, t in _slots(module):
            key = _key(t)
            if key not in groups:
                h = torch.empty_like(t, device=host, pin_memory=pin).copy_(t.detach())  # its own memory, pinned for a GPU
                groups[key] = _Group(h, torch.empty_like(h, device="meta"), [])
            groups[key].slots.append((kind, owner, attr))
        self.groups = list(groups.values())
        self.nbytes = sum(g.host.numel() * g.host.element_size() for g in self.groups)
        self.resident = False
        self.ready = None  # the copy's CUDA event


def frozen_bytes(block: nn.Module) -> int:
    """Bytes of a block's frozen tensors (distinct storages counted once): what block swap moves."""
    seen, total = set(), 0
    for *_, t in _slots(block):
        if _key(t) not in seen:
            seen.add(_key(t))
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- the swap
class BlockSwap:
    """Keep `blocks` ((name, module), in the order they run) in host memory; bring each in for its
    forward (and its rerun in backward) and the next one ahead of it. `device`: where the denoiser
    computes (default: where the blocks' tensors are now); `host`: where the offloaded copies live
    (pinned when the device is a GPU)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], device: str | torch.device | None = None,
                 host: str | torch.device = "cpu"):
        if device is None:
            first = next((t for _, m in blocks for *_, t in _slots(m)), None)
            device = first.device if first is not None else "cpu"
        self.device, self.host = torch.device(device), torch.device(host)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks = [_Block(name, m, self.host, pin=self.cuda) for name, m in blocks]
        self.counts = [0] * len(self.blocks)
        """How many times each block was brought in."""
        self.moved_bytes = 0
        """Host-to-device bytes copied so far."""
        self.most_resident = 0
        """The most offloaded blocks resident at once."""
        self.misses = 0
        """Blocks not fetched ahead: brought in only when they were needed (the compute waits for the copy)."""
        self.current: int | None = None
        self._hooks, self._released = [], []
        for i, b in enumerate(self.blocks):
            for m in b.module.modules():
                self._hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: self._enter(i)))
            self._release(b)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def sizes(self) -> list[int]:
        return [b.nbytes for b in self.blocks]

    # ---- moving one block
    def _bring_in(self, i: int) -> None:
        b = self.blocks[i]
        if b.resident:
            return
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            for done in self._released:  # the host waits for the kernels of the blocks just released: their memory
                done.synchronize()  # is free for this copy, and the host never runs more than a block ahead
            self._released.clear()
            with torch.cuda.stream(self.stream):
                copies = [torch.empty_like(g.host, device=self.device).copy_(g.host, non_blocking=True)
                          for g in b.groups]
                b.ready = torch.cuda.Event()
                b.ready.record(self.stream)
            for c in copies:
                c.record_stream(compute)  # freed only once the kernels using it have run
        else:
            copies = [torch.empty_like(g.host, device=self.device).copy_(g.host) for g in b.groups]
        for g, c in zip(b.groups, copies):
            g.point(c)
        b.resident = True
        self.counts[i] += 1
        self.moved_bytes += b.nbytes
        self.most_resident = max(self.most_resident, sum(x.resident for x in self.blocks))

    def _release(self, b: _Block) -> None:
        for g in b.groups:
            g.point(g.placeholder)  # the device copies go as soon as nothing else holds them
        if self.cuda:  # ... and the kernels queued on them have run (record_stream)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._released.append(done)
        b.resident, b.ready = False, None

    def _enter(self, i: int) -> None:
        """Pre-hook of every module of block i: i resident, the next one (in the direction the passes go)
        on its way, the others released."""
        if i == self.current:
            return
        last, n = len(self.blocks) - 1, len(self.blocks)
        forward = self.current is None or i > self.current
        ahead = (i + 1 if i < last else i - 1) if forward else (i - 1 if i > 0 else i + 1)
        keep = {i, ahead} if 0 <= ahead < n else {i}
        self.current = i
        for j, b in enumerate(self.blocks):
            if b.resident and j not in keep:
                self._release(b)
        self.misses += not self.blocks[i].resident
        self._bring_in(i)
        if self.cuda and self.blocks[i].ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.blocks[i].ready)
        if ahead in keep and ahead != i:
            self._bring_in(ahead)

    # ---- the end
    def close(self) -> None:
        """Remove the hooks and put every block back on the device, as it was."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for b in self.blocks:
            if b.resident and self.cuda:  # already there (its copy perhaps still on the way)
                if b.ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(b.ready)
                continue
            for g in b.groups:
                g.point(g.host if self.host == self.device else g.host.to(self.device))
            b.resident, b.ready = True, None
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()


@contextlib.contextmanager
def offloaded(denoiser: nn.Module, n: int, device: str | torch.device | None = None,
              host: str | torch.device = "cpu") -> Iterator[BlockSwap]:
    """N of the denoiser's blocks (swappable_blocks; the largest, by frozen bytes) in host memory for
    the time of the `with`; afterwards the denoiser is whole on its device again. Attach the LoRA
    before: hooks and slots are those of the modules as they are now."""
    blocks = swappable_blocks(denoiser)
    picked = choose([frozen_bytes(m) for _, m in blocks], n)
    swap = BlockSwap([blocks[i] for i in picked], device, host)
    try:
        yield swap
    finally:
        swap.close()
