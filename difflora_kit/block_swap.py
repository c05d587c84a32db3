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

A block's host copy is one flat uint8 buffer, its tensors views into it at offsets rounded up to ALIGN:

    buffer  |CB of to_q ....|pad|SCB|pad|bias|pad|CB of to_k ....| ...      host bytes = sum of the tensors'
    views    ^ (out, in) int8   ^ (out,) fp32 ...                            bytes + < ALIGN each (the plan's figure)

On a GPU the buffer is page-locked where it is (cudaHostRegister, as torch.distributed's checkpoint
stager pins), not allocated pinned: torch's caching host allocator rounds every pinned allocation up to
a power of two (1.6-2x the plan's host figure when each tensor was pinned alone, up to 2x for a block).

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

At the end every block comes back to the device (BlockSwap.close), also while an error unwinds: the
backend may be used again (a notebook cell run again, a retry after the out-of-memory advice). But then
the failed step's tensors may still be held (the error's traceback keeps its frames) and bringing the
blocks back can fail in turn (out of memory again). Then that block and those after it stay in host
memory, their slots pointing at their host copies (nothing is lost: `denoiser.to(device)` brings them
over once memory is free), and the error raised is the original one, with a note (a warning on
Python 3.10) saying which blocks stayed and why; never the secondary error in its place.

On a CPU the "device" and the "host" are both the CPU: every bring-in is still a copy and is counted,
so the bookkeeping runs (tests/test_block_swap.py); its speed and its GPU peak are predicted
(plan.MemoryPlan.block_swap), not measured here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
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


# ----------------------------------------------------------------------------- a block's host buffer
ALIGN = 64
"""Bytes: each tensor's view starts at a multiple of this in its block's buffer, where c10's CPU allocator
starts a tensor of its own (vectorized kernels see the same alignment; any dtype's itemsize divides it)."""


def pack(nbytes: list[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Tensors of `nbytes` bytes one after another in one buffer, each at a multiple of `align`:
    (their byte offsets, the buffer's size). The size is sum(nbytes) plus under `align` a tensor."""
    offsets, end = [], 0
    for n in nbytes:
        offsets.append(end)
        end += -(-n // align) * align
    return offsets, end


def _layout(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with the shape and strides a copy of `t` gets (empty_like's: `t`'s own when they are
    dense, else contiguous)."""
    return torch.empty_like(t, device="meta")


def _span(like: torch.Tensor) -> int:
    """Bytes a tensor of `like`'s shape and strides spans in memory (numel * itemsize when it is dense)."""
    if like.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(like.shape, like.stride()))) * like.element_size()


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The tensor of `like`'s shape, strides and dtype at `offset` bytes into a flat uint8 `buffer`."""
    flat = buffer[offset:offset + _span(like)].view(like.dtype)  # (span / itemsize,)
    return flat.as_strided(like.shape, like.stride())


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer`'s memory where it is, exactly its size (the module docstring). False, with a
    warning, when CUDA refuses: the copies are then correct but not asynchronous."""
    if buffer.numel() == 0:
        return False
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1))  # 1: portable
    if error:
        warnings.warn(f"block swap: could not page-lock {buffer.numel() / 2**20:.0f} MiB of host memory "
                      f"(cudaHostRegister error {error}); the copies of this block will not overlap the compute",
                      RuntimeWarning, stacklevel=4)
        return False
    return True


def _unpin(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


# ----------------------------------------------------------------------------- a block's frozen tensors
@dataclasses.dataclass
class _Group:
    """One distinct frozen tensor and every attribute that points at it (an 8-bit weight is both the
    parameter's data and bitsandbytes' state.CB)."""

    host: torch.Tensor  # a view into its block's host buffer
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
    """One offloaded block: its distinct frozen tensors copied into one host buffer (views at ALIGN)."""

    def __init__(self, name: str, module: nn.Module, host: torch.device, pin: bool):
        self.name, self.module = name, module
        found: dict[tuple, tuple[torch.Tensor, list]] = {}
        for kind, owner, attr, t in _slots(module):
            found.setdefault(_key(t), (t, []))[1].append((kind, owner, attr))
        likes = [_layout(t) for t, _ in found.values()]
        offsets, size = pack([_span(like) for like in likes])
        self.buffer = torch.empty(size, dtype=torch.uint8, device=host)  # (host bytes,)
        self.groups = []
        for (t, slots), like, offset in zip(found.values(), likes, offsets):
            view = _view(self.buffer, offset, like).copy_(t.detach())
            self.groups.append(_Group(view, like, slots))  # like: a meta tensor of the same shape, the placeholder
        self.pinned = pin and _pin(self.buffer)
        self.nbytes = sum(g.host.numel() * g.host.element_size() for g in self.groups)
        """Bytes of its tensors: what one bring-in copies (the plan's figure)."""
        self.host_bytes = size
        """Bytes of its host buffer: nbytes plus under ALIGN a tensor."""
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
    computes (default: where the blocks' tensors are now); `host`: where the offloaded copies live;
    `pin`: page-lock them (default: when the device is a GPU)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], device: str | torch.device | None = None,
                 host: str | torch.device = "cpu", pin: bool | None = None):
        if device is None:
            first = next((t for _, m in blocks for *_, t in _slots(m)), None)
            device = first.device if first is not None else "cpu"
        self.device, self.host = torch.device(device), torch.device(host)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks = []
        try:
            for name, m in blocks:
                self.blocks.append(_Block(name, m, self.host, pin=self.cuda if pin is None else pin))
        except BaseException:  # host memory ran out, say: nothing was released yet; unpin what was pinned
            for b in self.blocks:
                if b.pinned:
                    _unpin(b.buffer)
            raise
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

    @property
    def host_bytes(self) -> int:
        """Host memory the offloaded blocks hold (pinned on a GPU): their sizes plus alignment padding."""
        return sum(b.host_bytes for b in self.blocks)

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
    def _restore(self, b: _Block) -> None:
        """Block b back on the device for good, in memory of its own (not views of its host buffer)."""
        if b.resident and self.cuda:  # already there (its copy perhaps still on the way)
            if b.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(b.ready)
        else:
            for g in b.groups:
                g.point(g.host.to(self.device, copy=True))  # on a CPU a clone: the buffer can go
        b.resident, b.ready = True, None

    def close(self, error: BaseException | None = None) -> None:
        """Remove the hooks and put every block back on the device, as it was. `error`: the one unwinding
        (offloaded passes it). If a block cannot come back, it and those after it stay in host memory,
        pointing at their host copies, and `error` stays the error raised, with a note saying so (the
        module docstring); without an unwinding error, that failure is raised."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        failure, left = None, []
        for i, b in enumerate(self.blocks):
            try:
                self._restore(b)
            except Exception as e:  # out of memory, most likely (or a CUDA error the original left behind)
                failure, left = e, self.blocks[i:]
                break
        if self.cuda:
            try:
                torch.cuda.synchronize(self.device)  # every copy done, the side stream's too, before unpinning
            except Exception as e:
                failure = failure or e
        for b in left:
            for g in b.groups:
                g.point(g.host)  # the weights kept, in host memory: `denoiser.to(device)` brings them over
            b.resident, b.ready = False, None
        for b in self.blocks:
            if b.pinned:
                with contextlib.suppress(Exception):  # a CUDA error left by the original: nothing more to do
                    _unpin(b.buffer)  # tensors left in host memory stay valid, only no longer page-locked
                b.pinned = False
            if b not in left:
                b.buffer, b.groups = None, []  # its host copy goes
        if failure is None:
            return
        what = f"block swap: the blocks could not all come back to {self.device} " \
               f"({type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[0][:200]})"
        if left:
            what += (f"; {len(left)} of {len(self.blocks)} ({', '.join(b.name for b in left)}) stay in host memory: "
                     f"denoiser.to('{self.device}') brings them over once memory is free")
        if error is None:
            raise failure
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(what)
        else:
            warnings.warn(what, RuntimeWarning, stacklevel=3)


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
    except BaseException as error:  # the blocks come back if they can; `error` stays the one raised
        swap.close(error)
        raise
    swap.close()
