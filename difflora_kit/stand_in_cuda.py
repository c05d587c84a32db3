"""A stand-in CUDA device on a CPU-only PyTorch: the kit's CUDA code paths run for real, on the CPU,
and a tensor left on the CPU fails as it would on a GPU.

    DIFFLORA_STAND_IN_CUDA=7.5 python -m difflora_kit.stand_in_cuda script.py ...   # a T4 (fp16 path)
    DIFFLORA_STAND_IN_CUDA=8.6 python -m difflora_kit.stand_in_cuda -c "..."        # an RTX 30xx (bf16 path)
    env = stand_in_cuda.environment((8, 6))   # a child process (a notebook kernel: nbclient) under it

It must start before `import torch` (see "Why so early"), so it is switched on for a whole process:
by `python -m difflora_kit.stand_in_cuda` or, for a process started by someone else (a Jupyter kernel),
by the environment of `environment()`: DIFFLORA_STAND_IN_CUDA names the card and PYTHONPATH puts a
generated `sitecustomize.py` first, which calls `activate()` before anything imports torch.

How it works
    tensor     `StandIn`: a torch.Tensor subclass whose memory is ordinary CPU memory (its storage,
               data_ptr and untyped_storage are the real ones) but whose device is "cuda:0"
               (torch's python-custom-device mechanism, the one FakeTensor uses).
    every op   a TorchDispatchMode sees every op of the process. An op on stand-in tensors runs on
               plain CPU aliases of their memory (real values: .item(), training, sampling, the
               judge, bitsandbytes' CPU kernels, Triton's interpreter) and its results become
               stand-ins again. Factory ops and copies with device="cuda" make stand-ins; .cpu(),
               .to("cpu") and .numpy() behave as on CUDA (.numpy() of a cuda tensor raises).
    devices    an op that mixes a stand-in with a CPU tensor that is not a 0-dim scalar raises
               `StandInDeviceError` ("Expected all tensors to be on the same device", as CUDA does);
               the exceptions are CUDA's: copies, factory ops given a device, and CPU indices into a
               cuda tensor (the reverse, cuda indices into a CPU tensor, raises).
    torch.cuda is_available() True, one device of the chosen capability and name, mem_get_info from
               the card's size, streams and events (torch.Stream / torch.Event through a no-op
               device guard; block swap's side stream, record_stream, wait_event), the RNG state
               functions (gradient checkpointing saves them), `torch.cuda.device(i)`, synchronize,
               empty_cache; pinned host memory is plain CPU memory (counted in `stats.pinned`).
    Why so early  autograd asks the device's guard for streams, and torch's CUDA "hooks" for the
               accelerator; a CPU build has neither. A 90-line C++ library (compiled here once, with
               the system's g++, cached under DIFFLORA_STAND_IN_CACHE or ~/.cache) registers both; the
               hooks are read once when torch is imported, so it must be loaded first.

What it covers (tests/test_cuda_rehearsal.py, tests/test_notebooks_on_cuda.py): every op the kit runs with device="cuda" in the toy
training step (8-bit base streamed in, preset fused by the merge kernels, AdamW, gradient
checkpointing, block swap with its side stream and pinned copies), a batched sweep, the health report
and notebooks run with DEVICE="cuda"; the branches taken only where torch.cuda.is_available() (the
compute dtype rule: fp16 below sm80, bf16 from sm80; the merge kernels' dispatch; fp16 loss scaling;
block swap's pinned host buffers), each with real values.

What it cannot cover, and why
    - Anything inside a CUDA library: cuBLAS(Lt), cuDNN, bitsandbytes' CUDA kernels (their CPU
      implementations run instead: same op, other arithmetic), Triton's compiled code (the kernels
      run in Triton's interpreter; compiling for each card is tests/test_kernels' compile matrix).
      `torch.cuda.is_available()` is True but `torch.version.cuda` stays None: code that loads a CUDA
      library by that version sees a CPU build.
    - Memory: torch.cuda.memory_allocated() and friends report 0 and out-of-memory never happens;
      the plan (difflora_kit.plan) predicts memory, a GPU measures it.
    - Timing, asynchrony and stream races: every op runs at once, in order; an event is always
      complete. A missing wait_event is not caught.
    - CUDA generators (torch.Generator(device="cuda")) do not exist here; a factory op given a CPU
      generator and device="cuda" raises, as on CUDA.
    - Precision: bf16/fp16 compute runs CPU kernels (no tf32, other accumulation order).
    - Optimizers take their per-tensor path (torch's foreach/fused paths check for exact tensor
      types); the arithmetic is the same.
    - One device: cuda:1 and device-index mistakes are not rehearsed.
    - An in-place op that gives a cuda tensor other memory (`t.set_(another_storage)`) raises
      NotImplementedError here; in-place shape changes (unsqueeze_, t_, resize_ of an out= result) are
      followed.
    - Speed: every op on a stand-in passes through Python (~35 us an op on a 2-core CPU, 2026-12-03, and
      the T4's fp16 runs on CPU kernels): the course notebooks take 1x (02) to 2.6x (08) their CPU time.

torch.tensor(data, device="cuda") (and as_tensor / asarray) works as on a GPU: torch builds the tensor on
the CPU and copies it to the device with Python dispatch switched off, so the copy reaches the CUDA
backend key, which a CPU build lacks; the C++ library registers a fallback there that switches Python
dispatch back on and dispatches the op again, to the stand-in (tests/test_cuda_rehearsal.py: the SDXL
denoiser's time ids, difflora_kit/backends/sd.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

VARIABLE = "DIFFLORA_STAND_IN_CUDA"
"""The environment variable naming the card: "7.5", "8.6" (a capability) or "sm86"."""
CACHE_VARIABLE = "DIFFLORA_STAND_IN_CACHE"

CARDS = {  # capability -> (name, total memory in bytes): what torch.cuda reports
    (7, 5): ("Tesla T4 (stand-in)", 15 * 2**30),
    (8, 0): ("NVIDIA A100-SXM4-40GB (stand-in)", 40 * 2**30),
    (8, 6): ("NVIDIA GeForce RTX 3060 (stand-in)", 12 * 2**30),
    (8, 9): ("NVIDIA GeForce RTX 4090 (stand-in)", 24 * 2**30),
    (9, 0): ("NVIDIA H100 80GB HBM3 (stand-in)", 80 * 2**30),
}

GUARD_SOURCE = r"""
// The stand-in CUDA device (difflora_kit/stand_in_cuda.py): a device guard and CUDA hooks for a CPU-only
// build of PyTorch. One device, one stream at a time, events always complete. Nothing touches a GPU.
#include <atomic>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace {
using namespace c10;
thread_local DeviceIndex current_device = 0;
thread_local StreamId current_stream = 0;
DeviceIndex index_of(Device d) { return d.index() < 0 ? current_device : d.index(); }

struct StandInGuard final : public impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device d) const override {
    Device old(DeviceType::CUDA, current_device);
    current_device = index_of(d);
    return old;
  }
  Device getDevice() const override { return Device(DeviceType::CUDA, current_device); }
  void setDevice(Device d) const override { current_device = index_of(d); }
  void uncheckedSetDevice(Device d) const noexcept override { current_device = index_of(d); }
  Stream getStream(Device d) const override {
    return Stream(Stream::UNSAFE, Device(DeviceType::CUDA, index_of(d)), current_stream);
  }
  Stream getDefaultStream(Device d) const override { return Stream(Stream::DEFAULT, Device(DeviceType::CUDA, index_of(d))); }
  Stream getStreamFromGlobalPool(Device d, bool) const override { return getNewStream(d, 0); }
  Stream getNewStream(Device d, int) const override {
    static std::atomic<StreamId> next{1};
    return Stream(Stream::UNSAFE, Device(DeviceType::CUDA, index_of(d)), next++);
  }
  Stream exchangeStream(Stream s) const override {
    Stream old(Stream::UNSAFE, s.device(), current_stream);
    current_stream = s.id();
    return old;
  }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void record(void** event, const Stream&, const DeviceIndex, const EventFlag) const override {
    static int recorded;
    *event = &recorded;
  }
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const DeviceIndex) const override {}
  double elapsedTime(void*, void*, const DeviceIndex) const override { return 0.0; }
};
}  // namespace

C10_REGISTER_GUARD_IMPL(CUDA, StandInGuard);

namespace at {
struct StandInHooks final : public CUDAHooksInterface {
  StandInHooks(CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex deviceCount() const override { return 1; }
  int getNumGPUs() const override { return 1; }
  DeviceIndex current_device() const override { return 0; }
  DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(DeviceIndex) const override {}
  DeviceIndex exchangeDevice(DeviceIndex) const override { return 0; }
  DeviceIndex maybeExchangeDevice(DeviceIndex) const override { return 0; }
  bool isPinnedPtr(const void*) const override { return false; }
  Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  void init() const override {}
  void deviceSynchronize(DeviceIndex) const override {}
};
// under the name torch looks up ("CUDAHooks"): the real CUDA build registers its own there
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, StandInHooks);
}  // namespace at

// An op that reaches the CUDA backend key found no stand-in on its way: torch had switched Python dispatch
// off (torch.tensor(data, device="cuda") copies its CPU tensor to the device so). Switch it back on and
// dispatch the op again, so that the stand-in's dispatch mode serves it; once only (no mode: an error).
namespace {
thread_local bool redispatching = false;
void python_again(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  using c10::DispatchKey;
  if (redispatching || !c10::impl::tls_is_dispatch_key_excluded(DispatchKey::Python)) {
    TORCH_CHECK(false, "stand-in CUDA: ", op.schema().name(), " reached the CUDA backend, which this CPU build ",
                "of PyTorch lacks (is the stand-in active? see difflora_kit/stand_in_cuda.py)");
  }
  redispatching = true;
  c10::impl::tls_set_dispatch_key_excluded(DispatchKey::Python, false);
  try {
    op.callBoxed(stack);
  } catch (...) {
    c10::impl::tls_set_dispatch_key_excluded(DispatchKey::Python, true);
    redispatching = false;
    throw;
  }
  c10::impl::tls_set_dispatch_key_excluded(DispatchKey::Python, true);
  redispatching = false;
}
}  // namespace

TORCH_LIBRARY_IMPL(_, CUDA, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&python_again>()); }
// copy_ has a composite kernel that would serve the CUDA key too (and then find no CUDA copy routine)
TORCH_LIBRARY_IMPL(aten, CUDA, m) { m.impl("copy_", torch::CppFunction::makeFromBoxedFunction<&python_again>()); }
"""


class StandInDeviceError(RuntimeError):
    """An op mixed a (stand-in) CUDA tensor with a CPU tensor: the error a GPU would raise."""


@dataclasses.dataclass
class Stats:
    """What the stand-in saw (the tests read it to show that a CUDA path was taken)."""

    capability: tuple[int, int] = (8, 6)
    made: int = 0
    """Stand-in tensors created by factory ops and host-to-device copies."""
    to_host: int = 0
    """Device-to-host copies (.cpu(), .to("cpu"))."""
    ops: int = 0
    """Ops run on stand-in tensors."""
    pinned: int = 0
    """Host tensors asked for in pinned memory."""
    streams: int = 0
    """Side streams created (torch.cuda.Stream)."""
    events: int = 0
    """Events recorded."""
    rng_state_reads: int = 0
    """torch.cuda.get_rng_state calls (gradient checkpointing saves it)."""


stats = Stats()
_ACTIVE = False


# ----------------------------------------------------------------------------- the C++ part
def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the stand-in CUDA device needs PyTorch installed")
    return Path(list(spec.submodule_search_locations)[0])


def _torch_version(torch_dir: Path) -> str:
    text = (torch_dir / "version.py").read_text()
    return next((line.split("=", 1)[1].strip().strip("'\"") for line in text.splitlines()
                 if line.startswith("__version__")), "unknown")


def guard_library() -> Path:
    """The compiled guard + hooks library for this torch (built on first use: ~5 s with g++)."""
    torch_dir = _torch_dir()
    key = hashlib.sha256((GUARD_SOURCE + str(torch_dir) + _torch_version(torch_dir)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "difflora" / "stand_in_cuda")
    lib = cache / f"stand_in_cuda_{key}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"stand_in_cuda_{key}.cpp"
    src.write_text(GUARD_SOURCE)
    compiler = os.environ.get("CXX", "g++")
    # the C++ ABI flag torch was built with: asked of torch in a child process (this one must not import it yet)
    abi = subprocess.run([sys.executable, "-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"],
                         capture_output=True, text=True, env={**os.environ, VARIABLE: ""}).stdout.strip() or "1"
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-O1", "-std=c++17", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{torch_dir / 'include'}", str(src), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
           f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"the stand-in CUDA device compiles a small C++ library and needs a C++ compiler: "
                           f"{compiler!r} was not found (apt-get install g++, or set CXX)") from None
    if done.returncode != 0:
        raise RuntimeError(f"compiling the stand-in CUDA device failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    tmp.replace(lib)
    return lib


def _load_guard() -> None:
    import ctypes

    if "torch" in sys.modules:
        import torch

        if torch.accelerator.current_accelerator() is not None:
            return  # loaded already (or a real accelerator: activate refuses that)
        raise RuntimeError(
            "the stand-in CUDA device must start before torch is imported (torch reads its CUDA hooks once, "
            f"at import). Run `{VARIABLE}=8.6 python -m difflora_kit.stand_in_cuda ...`, start the process "
            "with stand_in_cuda.environment(...), or call stand_in_cuda.activate() first thing")
    ctypes.CDLL(str(guard_library()), mode=os.RTLD_GLOBAL)


# ----------------------------------------------------------------------------- the tensor
def parse_capability(text: str) -> tuple[int, int]:
    """"7.5", "75", "sm75", "sm_75" or "(7, 5)" -> (7, 5)."""
    digits = "".join(ch for ch in str(text) if ch.isdigit())
    if len(digits) != 2:
        raise ValueError(f"{VARIABLE}={text!r}: name a card's compute capability, e.g. 7.5 (T4) or 8.6 (RTX 30xx)")
    return int(digits[0]), int(digits[1])


def _tensors(obj, tensor_type, out: list) -> list:
    """The tensors in an op's arguments (nested tuples, lists, dicts), appended to `out`: what torch's
    pytree.tree_flatten finds, at a fraction of its cost (the stand-in walks every op's arguments)."""
    if isinstance(obj, tensor_type):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors(o, tensor_type, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, tensor_type, out)
    return out


def _map_tensors(fn, obj, tensor_type):
    """`obj` with fn applied to each tensor in it (pytree.tree_map over tensors, for an op's arguments
    and results: tuples, namedtuples, lists, dicts); containers without tensors come back as they are."""
    if isinstance(obj, tensor_type):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        items = [_map_tensors(fn, o, tensor_type) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v, tensor_type) for k, v in obj.items()}
    return obj


def _build():
    """The tensor class and the dispatch mode (made once torch is imported)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    cuda0 = torch.device("cuda", 0)
    copies = {aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default,
              aten._to_copy.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}
    indexing = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                aten._index_put_impl_.default, aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
    host_only = {aten.is_pinned.default, aten._pin_memory.default}
    make_subclass = torch._C.TensorBase._make_subclass
    mixed_classes: dict[type, type] = {}

    class StandIn(torch.Tensor):
        """A tensor on "cuda:0" whose memory is CPU memory (see the module docstring)."""

        __torch_function__ = torch._C._disabled_torch_function_impl

        def __format__(self, spec):  # as a plain tensor: a 0-dim one formats as its value
            return self.item().__format__(spec) if self.dim() == 0 else object.__format__(self, spec)

        def tolist(self):  # as on CUDA: through the host
            return self.cpu().tolist()

        def numpy(self, *, force: bool = False):  # as on CUDA: only with force (a copy to the host)
            if force:
                return self.detach().cpu().numpy()
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            return _dispatch(func, args, kwargs or {})

    def standin_class(cls: type) -> type:
        """StandIn itself, or a StandIn that is also a `cls` (bitsandbytes' Int8Params, ...)."""
        if issubclass(cls, StandIn):
            return cls
        if cls in (torch.Tensor, torch.nn.Parameter):
            return StandIn
        if cls not in mixed_classes:
            mixed_classes[cls] = type(f"StandIn{cls.__name__}", (StandIn, cls), {"__module__": __name__})
        return mixed_classes[cls]

    def wrap(plain: torch.Tensor, cls: type = StandIn, requires_grad: bool = False) -> torch.Tensor:
        out = make_subclass(cls, plain, requires_grad, dispatch_device=True, device_for_backend_keys=cuda0)
        return out

    def on_device(t) -> bool:
        """A stand-in, or a tensor that took a stand-in's memory and device (`param.data = stand_in`, which
        nn.Module.to("cuda") does: the Parameter keeps its class and gets the stand-in's storage)."""
        return isinstance(t, StandIn) or (isinstance(t, torch.Tensor) and t.is_cuda)

    def plain(t: torch.Tensor) -> torch.Tensor:
        """A plain CPU tensor on the stand-in's memory (same storage, sizes, strides, offset)."""
        alias = torch.empty(0, dtype=t.dtype)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())

    def patched_make_subclass(cls, data, require_grad=False, **kwargs):
        """torch.Tensor._make_subclass: a Parameter-like class made from a stand-in stays a stand-in."""
        if on_device(data):
            new = wrap(plain(data), standin_class(cls), require_grad)
            return new
        return make_subclass(cls, data, require_grad, **kwargs)

    base_data = torch._C.TensorBase.data

    def host_class(cls: type) -> type:
        """The class a stand-in class stands in for (StandInInt8Params -> Int8Params, StandIn -> Tensor)."""
        return next((c for c in cls.__mro__ if not issubclass(c, StandIn)), torch.Tensor)

    def get_data(self):
        return base_data.__get__(self)

    def set_data(self, value):
        """`t.data = value` across devices (nn.Module.to, bitsandbytes' Int8Params) as CUDA does it: `t` keeps
        its identity and attributes and takes `value`'s memory and device (swap_tensors: a shallow copy
        would keep the old device)."""
        if on_device(value) == on_device(self):
            return base_data.__set__(self, value)
        cls = standin_class(type(self)) if on_device(value) else host_class(type(self))
        new = (wrap(plain(value), cls, self.requires_grad) if on_device(value)
               else make_subclass(cls, value.detach(), self.requires_grad))
        new.__dict__.update(self.__dict__)
        if isinstance(self, torch.nn.Parameter) and on_device(value):
            new._is_param = True  # torch's mark of a Parameter that is a tensor subclass
        torch.utils.swap_tensors(self, new)

    def describe(t) -> str:
        return f"{t.device} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"

    def check(func, args, kwargs, flat) -> None:
        """CUDA's rule: every tensor of an op on one device, except CPU 0-dim scalars, copies, factory
        ops given a device, and CPU indices into a cuda tensor."""
        if func in copies or kwargs.get("device") is not None:
            return
        skip = set()
        if func in indexing and args and on_device(args[0]):
            skip = {id(i) for i in _tensors(args[1], torch.Tensor, [])}
        cuda, other = None, None
        for t in flat:
            if not isinstance(t, torch.Tensor) or id(t) in skip:
                continue
            if on_device(t):
                cuda = t if cuda is None else cuda
            elif other is None and not (t.device.type == "cpu" and t.dim() == 0):
                other = t
        if cuda is not None and other is not None:
            raise StandInDeviceError(
                f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and "
                f"{other.device}! (stand-in CUDA: {func} got a {describe(other)} tensor beside a {describe(cuda)} "
                "one; a GPU raises the same error. Move the tensor with .to(device) where it is made.)")

    prim_device = torch.ops.prim.device.default
    cpu_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

    def follow(t, p, func):
        """Stand-in `t` after an in-place op ran on its alias `p`: an op that changed the alias's shape
        (unsqueeze_, transpose_, resize_ of an out= result) changes `t`'s the same way (its memory is the
        alias's already); one that gave the alias other memory (set_ to another storage) is refused."""
        if p.shape == t.shape and p.stride() == t.stride() and p.storage_offset() == t.storage_offset():
            return t
        if p.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            raise NotImplementedError(f"stand-in CUDA: {func} gave a cuda tensor other memory in place, which the "
                                      "stand-in does not follow; use the op's out-of-place form")
        aten.as_strided_.default.redispatch(cpu_keys, t, p.shape, p.stride(), p.storage_offset())
        return t


    def _dispatch(func, args, kwargs):
        if func is prim_device:
            return cuda0
        flat = _tensors(kwargs, torch.Tensor, _tensors(args, torch.Tensor, []))
        has = any(on_device(t) for t in flat)
        device = kwargs.get("device")
        to_cuda = device is not None and torch.device(device).type == "cuda"
        if func in host_only and not has:
            if func is aten.is_pinned.default:
                return False
            stats.pinned += 1
            return args[0].clone()
        if kwargs.get("pin_memory"):
            stats.pinned += 1
            kwargs = {**kwargs, "pin_memory": False}
        if not has and not to_cuda:
            return func(*args, **kwargs)
        check(func, args, kwargs, flat)
        if func is aten.record_stream.default:  # the caching allocator's bookkeeping: nothing to keep here
            return None
        if to_cuda and isinstance(kwargs.get("generator"), torch.Generator) and kwargs["generator"].device.type != "cuda":
            raise StandInDeviceError(f"Expected a 'cuda' device type for generator but found 'cpu' ({func}; stand-in "
                                     "CUDA, as on a GPU: draw on the CPU, then .to(device))")
        aliases = {}

        def unwrap(t):
            if on_device(t):
                p = plain(t)
                aliases[id(p)] = t
                return p
            return t

        call_args, call_kwargs = _map_tensors(unwrap, args, torch.Tensor), _map_tensors(unwrap, kwargs, torch.Tensor)
        if to_cuda:
            call_kwargs["device"] = torch.device("cpu")
        out = func(*call_args, **call_kwargs)
        to_host = device is not None and not to_cuda
        stats.ops += 1
        stats.made += to_cuda and func in copies or not has
        stats.to_host += to_host

        def rewrap(o):
            if not isinstance(o, torch.Tensor):
                return o
            if id(o) in aliases:  # an in-place op or out=: the stand-in it wrote into
                return follow(aliases[id(o)], o, func)
            if to_host or on_device(o):
                return o
            return wrap(o)

        return _map_tensors(rewrap, out, torch.Tensor)

    class Mode(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:  # no torch._dynamo wrapper around every op (~10% of the stand-in's cost)
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return _dispatch(func, args, kwargs or {})

    return types.SimpleNamespace(StandIn=StandIn, Mode=Mode, make_subclass=make_subclass,
                                 patched_make_subclass=patched_make_subclass, data=property(get_data, set_data))


# ----------------------------------------------------------------------------- torch.cuda
def _renamed(fn, name: str):
    """A copy of function `fn` called torch.cuda.`name` (a distinct object)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__, new.__qualname__ = fn.__kwdefaults__, f"stand_in_cuda.{name}"
    return new


def _cuda_patches(capability: tuple[int, int]) -> dict:
    """{(module, name): replacement} for torch.cuda's functions on the stand-in card."""
    import torch

    name, total = CARDS.get(tuple(capability), (f"stand-in sm{capability[0]}{capability[1]}", 16 * 2**30))
    rng = {"state": torch.random.default_generator.get_state()}
    properties = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=total,
                                       multi_processor_count=40, is_integrated=False, is_multi_gpu_board=False,
                                       L2_cache_size=4 * 2**20, warp_size=32, uuid="stand-in",
                                       gcnArchName="", max_threads_per_multi_processor=1024)

    def index(device=None) -> int:
        if device is None:
            return 0
        if isinstance(device, int):
            i = device
        else:
            d = torch.device(device)
            if d.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {d}")
            i = d.index or 0
        if i != 0:
            raise AssertionError(f"Invalid device id {i} (the stand-in CUDA has one device)")
        return i

    class Stream(torch.Stream):
        def __new__(cls, device=None, priority=0, **kwargs):
            stats.streams += 1
            return super().__new__(cls, device=torch.device("cuda", index(device)), priority=priority)

        def __enter__(self):
            self._prev = torch.accelerator.current_stream()
            torch.accelerator.set_stream(self)
            return self

        def __exit__(self, *exc):
            torch.accelerator.set_stream(self._prev)

    class Event(torch.Event):
        def __new__(cls, enable_timing=False, blocking=False, interprocess=False):
            return super().__new__(cls, device=torch.device("cuda", 0), enable_timing=enable_timing)

        def record(self, stream=None):
            stats.events += 1
            return super().record(stream or torch.accelerator.current_stream())

    @contextlib.contextmanager
    def stream(s):
        if s is None:
            yield
            return
        prev = torch.accelerator.current_stream()
        torch.accelerator.set_stream(s)
        try:
            yield
        finally:
            torch.accelerator.set_stream(prev)

    def get_rng_state(device="cuda"):
        index(device)
        stats.rng_state_reads += 1
        return rng["state"].clone()

    def set_rng_state(new_state, device="cuda"):
        index(device)
        rng["state"] = new_state.clone().cpu()

    class Cudart:
        """torch.cuda.cudart(): the CUDA runtime calls the kit makes (page-locking host memory), answered
        with success (0); host memory stays ordinary memory."""

        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802  (CUDA's names)
            stats.pinned += 1
            return 0

        def cudaHostUnregister(self, ptr):  # noqa: N802
            return 0

    cudart = Cudart()

    def is_bf16_supported(including_emulation: bool = True):
        return tuple(capability) >= (8, 0) or including_emulation

    def zero(*a, **k):  # memory is not emulated: see the module docstring
        return 0

    def none(*a, **k):
        return None

    cuda = torch.cuda
    table = {
        "is_available": lambda: True, "device_count": lambda: 1, "is_initialized": lambda: True,
        "_lazy_init": none, "init": none,
        "current_device": lambda: 0, "set_device": lambda d: index(d) and None,
        "get_device_capability": lambda device=None: (index(device), tuple(capability))[1],
        "get_device_name": lambda device=None: (index(device), name)[1],
        "get_device_properties": lambda device=None: (index(device), properties)[1],
        "get_arch_list": lambda: [f"sm_{capability[0]}{capability[1]}"],
        "is_bf16_supported": is_bf16_supported,
        "mem_get_info": lambda device=None: (total, total),
        "memory_allocated": zero, "max_memory_allocated": zero, "memory_reserved": zero,
        "max_memory_reserved": zero, "reset_peak_memory_stats": none, "reset_max_memory_allocated": none,
        "memory_stats": lambda *a, **k: {}, "empty_cache": none, "synchronize": none, "ipc_collect": none,
        "Stream": Stream, "Event": Event, "stream": stream, "cudart": lambda: cudart,
        "current_stream": lambda device=None: torch.accelerator.current_stream(torch.device("cuda", index(device))),
        "default_stream": lambda device=None: torch.Stream(device=torch.device("cuda", index(device))),
        "set_stream": lambda s: torch.accelerator.set_stream(s),
        "_exchange_device": lambda d: 0 if d is None or d < 0 else index(d),
        "_maybe_exchange_device": lambda d: 0 if d is None or d < 0 else index(d),
        "get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
        "get_rng_state_all": lambda: [get_rng_state()], "set_rng_state_all": lambda states: set_rng_state(states[0]),
        "manual_seed": none, "manual_seed_all": none, "seed": none, "seed_all": none,
        "initial_seed": lambda: torch.initial_seed(),
    }
    # one function object per name (torch._dynamo maps torch.cuda's functions by identity)
    patches = {(cuda, k): (_renamed(v, k) if isinstance(v, types.FunctionType) else v) for k, v in table.items()}
    import torch.cuda.random as cuda_random

    for k in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        patches[(cuda_random, k)] = patches[(cuda, k)]
    return patches


# ----------------------------------------------------------------------------- switching it on
_saved: list[tuple[object, str, object]] = []
_MISSING = object()
_mode = None


def activate(capability: tuple[int, int] | str = (8, 6)) -> None:
    """Switch the stand-in on for the rest of this process: torch.cuda says `capability`'s card is here,
    device="cuda" makes stand-in tensors, mixing devices raises. Call it before torch is imported
    (an error says so otherwise). The Triton merge kernels run in Triton's interpreter
    (TRITON_INTERPRET=1 is set here unless already set)."""
    global _ACTIVE, _mode
    capability = parse_capability(capability) if isinstance(capability, str) else tuple(capability)
    if _ACTIVE:
        if tuple(stats.capability) != capability:
            raise RuntimeError(f"the stand-in CUDA device is already active as sm{stats.capability[0]}{stats.capability[1]}")
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")  # a launch on a "cuda" tensor runs in Triton's interpreter
    _load_guard()
    import torch

    if getattr(torch.version, "cuda", None):
        raise RuntimeError("this PyTorch is a CUDA build: the stand-in is for CPU-only builds (use the GPU itself)")
    import torch._dynamo  # noqa: F401  (imported before torch.cuda is patched: it records its functions)

    if importlib.util.find_spec("bitsandbytes") is not None:  # before the patches: with CUDA "available" it
        import bitsandbytes  # noqa: F401  would load its CUDA library; its CPU kernels serve the stand-in

    parts = _build()
    stats.capability = capability
    patches = _cuda_patches(capability)
    patches[(torch.Tensor, "_make_subclass")] = staticmethod(parts.patched_make_subclass)
    patches[(torch.Tensor, "data")] = parts.data
    for (owner, name), value in patches.items():
        _saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)
    _mode = parts.Mode()
    _mode.__enter__()
    _ACTIVE = True
    globals()["StandIn"] = parts.StandIn


def is_active() -> bool:
    return _ACTIVE


def deactivate() -> None:
    """Undo activate (the C++ hooks stay: torch keeps thinking an accelerator exists)."""
    global _ACTIVE, _mode
    if not _ACTIVE:
        return
    _mode.__exit__(None, None, None)
    for owner, name, value in reversed(_saved):
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _saved.clear()
    _mode, _ACTIVE = None, False


@contextlib.contextmanager
def stand_in_cuda(capability: tuple[int, int] | str = (8, 6)):
    """`with stand_in_cuda((7, 5)):` the stand-in for the block (in a process where it may start: see
    activate); yields `stats`."""
    activate(capability)
    try:
        yield stats
    finally:
        deactivate()


def activate_from_env() -> bool:
    """activate() when DIFFLORA_STAND_IN_CUDA names a card (the generated sitecustomize calls this)."""
    value = os.environ.get(VARIABLE, "").strip()
    if not value:
        return False
    activate(parse_capability(value))
    return True


SITECUSTOMIZE = '''"""Generated by difflora_kit.stand_in_cuda.environment: the stand-in CUDA device, before torch loads."""
import difflora_kit.stand_in_cuda

difflora_kit.stand_in_cuda.activate_from_env()
'''


def environment(capability: tuple[int, int] | str = (8, 6), folder: Path | None = None,
                base: dict | None = None) -> dict[str, str]:
    """The environment of a child process that starts under the stand-in (a Jupyter kernel, a script):
    `base` (default os.environ) with DIFFLORA_STAND_IN_CUDA set and a generated sitecustomize.py first
    on PYTHONPATH (written into `folder`, default the cache). The kit must be importable there."""
    capability = parse_capability(capability) if isinstance(capability, str) else tuple(capability)
    folder = Path(folder or Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "difflora" /
                                 "stand_in_cuda") / "startup")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parent.parent)  # the kit itself, for an uninstalled checkout
    env["PYTHONPATH"] = os.pathsep.join([str(folder), root] + [p for p in [env.get("PYTHONPATH", "")] if p])
    env[VARIABLE] = f"{capability[0]}.{capability[1]}"
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    """python -m difflora_kit.stand_in_cuda [--capability 7.5] (script.py args | -m module args | -c code)."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    capability = os.environ.get(VARIABLE, "8.6")
    if argv[:1] == ["--capability"]:
        capability, argv = argv[1], argv[2:]
    if not argv:
        print(main.__doc__, file=sys.stderr)
        return 2
    from difflora_kit import stand_in_cuda  # the module the kit imports (this file also runs as __main__)

    stand_in_cuda.activate(parse_capability(capability))
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<stand-in -c>", "exec"), {"__name__": "__main__"})
    elif argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
