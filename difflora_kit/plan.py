"""Predicted peak GPU memory of every phase of a stage, by component, before anything is loaded.

    difflora plan --base flux --resolution 1024 --batch 1 [--gradient-checkpointing]

Everything comes from the model's configs, on PyTorch's meta device (shapes only: no weights, no
compute, a few seconds even for FLUX):

    denoiser weights    8-bit linears: out*in bytes + 4 a row (the scale); the rest in the compute dtype
    encoders            each text encoder and the VAE in the compute dtype (the VAE in fp32 under fp16 when
                        its config says force_upcast); on the GPU only while they encode, unless kept there
    LoRA                fp32 parameters (4 B), their gradients (4 B), AdamW's two moments (8 B)
    activations         what the forward pass keeps for the backward pass: the real denoiser class with
                        the real peft LoRA, run on meta tensors of the training shapes; every tensor
                        autograd saves is counted once (by storage); the 8-bit linears keep nothing of
                        their input (quant.FrozenInt8Matmul: their weight is frozen); attention as
                        fused GPU kernels keep it (q, k, v, output, logsumexp; never the N x N matrix).
                        With gradient checkpointing: what is saved outside the checkpointed blocks, the
                        inputs they keep for the recompute, and the largest block's own saved tensors.
    backward workspace  twice the largest saved tensor (its gradient and one temporary): an estimate
    no-grad workspace   what a forward pass without gradients holds at once (encoding a prompt, the VAE
                        encoding or decoding one image, a sampling batch): the real class run on meta
                        tensors, every tensor counted from the op that makes it until its last reference
                        goes (_LiveBytes); on a sampling batch, each 8-bit linear's dequantized weight on top

A phase's peak is the sum of its components (of those that run one after another, the largest). The
phases of a stage, in the order they run (encode first: pair.prepare_base):

    encoding   the text encoders and the VAE encode the prompt and the image, before the denoiser
               arrives: encoders + VAE + the largest of (each prompt's encoding, the image's encoding)
    loading    the denoiser streamed in (difflora_kit.streaming: each linear merged with the preset and
               quantized as it arrives; the plan walks the same layers as the loader): the 8-bit model
               plus its largest layer in flight; the encoders are on the CPU by then
    step 1, 2  a training step: weights, LoRA, optimizer, activations, backward workspace
    sampling   the 8-bit denoiser + LoRA 2 on a batch of SAMPLE_ROWS rows without gradients, then the
               VAE (back on the GPU) decoding one image; the prompts' states are cached
With offload_encoders False (`--keep-encoders`) the encoders stay on the GPU in every phase.
With --offload-blocks N (block swap, difflora_kit.block_swap) a training step holds the denoiser less its
N largest blocks, plus the two largest of them in flight; MemoryPlan.block_swap(n) predicts that and the
host-to-device bytes of a step for any n (block_swap_table); loading and sampling do not swap.
The prediction is of torch.cuda.max_memory_allocated (the CUDA context, ~0.3-0.5 GiB more in
nvidia-smi, is not in it); bench/gpu_memory.py measures a training step on a GPU and prints both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import block_swap as swapping
from . import lora, model_configs, streaming
from .backends import registry
from .backends.registry import Family
from .config import TrainConfig, lora_targets

GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- what the model is
@dataclasses.dataclass
class ModelShapes:
    """The configs a plan needs: denoiser, text encoders, VAE, and how an image becomes a latent."""

    name: str
    family: Family
    unet: dict  # the denoiser's config (a UNet's or a transformer's)
    text_encoders: list[tuple[str, dict]]  # (transformers class name, config)
    vae: dict | None  # None: pixel space (the toy)
    tokens: int
    pixels_per_latent: int
    sample_size: int  # pixels the base draws

    @property
    def backend(self):
        """The family's Backend class: how its denoiser is called (plan_inputs) and sized."""
        return self.family.backend_class()


def describe(base) -> ModelShapes:
    """`base`: a public config name (a family key whose row has public configs: sd15, sdxl, flux, zimage),
    'toy', a model folder or a hub id (its configs only are fetched), or a resolved backends.Base."""
    from . import backends

    public = registry.public_config(str(base)) if not isinstance(base, backends.Base) else None
    if public is not None:
        return ModelShapes(str(base), registry.get(str(base)), dict(public.unet), list(public.text_encoders),
                           dict(public.vae), public.tokens, model_configs.VAE_SCALE,
                           public.sample_size or public.unet["sample_size"] * model_configs.VAE_SCALE)
    base = backends.resolve_base(base, configs_only=True)  # no weights fetched
    row, folder = base.family, base.folder
    if not row.plan:
        raise NotImplementedError(f"--base {base}: the memory plan (`difflora plan`) is not for {row.label} yet")
    read = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
    encoders = [(read(sub).get("architectures", ["CLIPTextModel"])[0], read(sub))
                for sub in ("text_encoder", "text_encoder_2") if (folder / sub / "config.json").is_file()]
    tokens = row.text_tokens or encoders[0][1]["max_position_embeddings"]  # CLIP: its context (77; the toy's 12)
    vae = None if row.pixel_space else read("vae")
    scale = 1 if vae is None else 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelShapes(str(base), row, read(row.denoiser_folder), encoders, vae, tokens, scale,
                       row.backend_class().folder_sample_size(folder))


def _on_meta(cls, config: dict, dtype: torch.dtype = torch.float32):
    """A diffusers model of `config` on the meta device (shapes only), its parameters made in `dtype`
    (a .to(dtype) afterwards warns)."""
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    finally:
        torch.set_default_dtype(default)


def _meta_denoiser(shapes: ModelShapes, dtype: torch.dtype):
    import diffusers

    return _on_meta(getattr(diffusers, shapes.family.denoiser_class), shapes.unet, dtype)


def _meta_text_encoder(class_name: str, config: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers text encoder of `config` on the meta device (CLIPTextModel, T5EncoderModel, Qwen3Model...)."""
    import transformers

    cls = getattr(transformers, class_name)
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype")}
    with torch.device("meta"):
        return cls(cls.config_class(**fields)).to(dtype).eval()


def vae_dtype(shapes: ModelShapes, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype as the backend loads it: fp32 under fp16 when its config says force_upcast (SDXL)."""
    upcast = dtype == torch.float16 and shapes.vae is not None and shapes.vae.get("force_upcast", False)
    return torch.float32 if upcast else dtype


def vae_encode_workspace(shapes: ModelShapes, resolution: int, dtype: torch.dtype) -> int:
    """What the VAE holds at once while encoding one training image without gradients (the image, its
    activations, the posterior: no_grad_peak). 0 in pixel space."""
    from diffusers import AutoencoderKL

    if shapes.vae is None:
        return 0
    vae = _on_meta(AutoencoderKL, shapes.vae, dtype)
    x = torch.empty(1, 3, resolution, resolution, device="meta", dtype=dtype)  # (1, 3, H, W)
    return no_grad_peak(vae, lambda: vae.encode(x).latent_dist.mean, (x,))


def vae_decode_workspace(shapes: ModelShapes, resolution: int, dtype: torch.dtype) -> int:
    """What the VAE holds at once while decoding one latent to a resolution x resolution image. 0 in pixel space."""
    from diffusers import AutoencoderKL

    if shapes.vae is None:
        return 0
    vae = _on_meta(AutoencoderKL, shapes.vae, dtype)
    side = resolution // shapes.pixels_per_latent
    z = torch.empty(1, shapes.vae["latent_channels"], side, side, device="meta", dtype=dtype)  # (1, C, h, w)
    return no_grad_peak(vae, lambda: vae.decode(z).sample, (z,))


def text_encode_workspace(encoder: nn.Module, config: dict, tokens: int) -> int:
    """What a text encoder holds at once while encoding one prompt of `tokens` tokens (its own context
    length when shorter: CLIP's 77) with every hidden state returned (SDXL and Z-Image read hidden_states[-2])."""
    n = min(tokens, config.get("max_position_embeddings") or tokens)
    ids = torch.zeros(1, n, dtype=torch.long, device="meta")  # (1, T)
    return no_grad_peak(encoder, lambda: encoder(input_ids=ids, output_hidden_states=True), (ids,))


def training_inputs(shapes: ModelShapes, resolution: int, batch: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Meta tensors of one denoiser call of `batch` rows, as the family's denoiser takes them: (args, kwargs)."""
    side = resolution // shapes.pixels_per_latent
    return shapes.backend.plan_inputs(shapes.unet, batch, side, shapes.tokens, dtype)


# ----------------------------------------------------------------------------- counting saved tensors
class _Ledger:
    """Bytes of distinct storages (a view counts once, parameters never)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.bytes, self.keep = exclude, {}, []

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude and key not in self.bytes:
            self.bytes[key] = storage.nbytes()
            self.keep.append(storage)  # alive: no address reuse while counting

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @property
    def largest(self) -> int:
        return max(self.bytes.values(), default=0)


class _FusedAttention(torch.autograd.Function):
    """What flash / memory-efficient attention keeps for backward: q, k, v, the output and the
    row logsumexp (B, H, N) fp32. (On the meta device PyTorch would pick the math kernel, which
    keeps the N x N attention matrix: no GPU run of the kit does that.)"""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)  # (B, H, N, d)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """scaled_dot_product_attention's signature: diffusers' attention dispatcher passes q, k, v by keyword."""
    return _FusedAttention.apply(query, key, value)


@dataclasses.dataclass
class Activations:
    saved: int
    """Bytes kept for the backward pass at the end of the forward pass."""
    workspace: int
    """Backward temporaries (estimate: twice the largest saved tensor)."""

    @property
    def total(self) -> int:
        return self.saved + self.workspace


def measure_activations(unet: nn.Module, inputs: tuple, checkpointing: bool) -> Activations:
    """Run the (meta) denoiser forward once and count what the backward pass would need."""
    exclude = {t.untyped_storage()._cdata for t in (*unet.parameters(), *unet.buffers())}
    outer, stack = _Ledger(exclude), []
    stack.append(outer)
    recompute = [0, 0]  # largest (saved, largest tensor) inside one checkpointed block

    def pack(t):
        stack[-1].add(t)
        return t

    def counting_checkpoint(module, *args):
        for a in args:
            if isinstance(a, torch.Tensor):
                outer.add(a)  # a checkpoint keeps its inputs for the recompute
        inner = _Ledger(exclude | set(outer.bytes))
        stack.append(inner)
        try:
            out = module(*args)
        finally:
            stack.pop()
        recompute[0], recompute[1] = max(recompute[0], inner.total), max(recompute[1], inner.largest)
        return out

    if checkpointing:
        unet.enable_gradient_checkpointing(counting_checkpoint)
    unet.train()
    args, kwargs = inputs
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = _fused_attention
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(*args, **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        if checkpointing:
            unet.disable_gradient_checkpointing()
    saved = outer.total + recompute[0]
    return Activations(saved, 2 * max(outer.largest, recompute[1]))


# ----------------------------------------------------------------------------- counting a no-grad pass
class _LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while a meta model runs. Every op's output storage
    counts from the op that makes it until its last reference goes (a weak reference tells), so views
    count once and freed temporaries stop counting, as PyTorch's eager allocator sees them. Storages in
    `exclude` (the model's parameters and buffers) never count."""

    def __init__(self, exclude: set[int], inputs=()):
        super().__init__()
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0
        for t in inputs:
            self.track(t)

    def _free(self, key: int, nbytes: int, _ref) -> None:
        self.refs.pop(key, None)
        self.live -= nbytes

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.exclude or key in self.refs:
            return
        n = storage.nbytes()
        self.refs[key] = weakref.ref(storage, functools.partial(self._free, key, n))
        self.live += n
        self.peak = max(self.peak, self.live)

    def moment(self, extra: int) -> None:
        """`extra` bytes alive for a moment beside what is alive now (temporaries the meta run does not make)."""
        self.peak = max(self.peak, self.live + extra)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def int8_matmul_temporaries(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """Device bytes one 8-bit linear (quant.FrozenInt8Matmul, weight-only on every device) holds beside its
    input and output at its worst moment: its weight dequantized to `dtype` (out*in elements, freed after the
    matmul) and the row scales' 1/127 multiple (4 bytes a row of the weight). `rows` does not enter: the
    activations are never quantized (bitsandbytes' CUDA int8 path, which the kit does not take, would hold
    their fp16 and int8 copies and an int32 product instead)."""
    return in_features * out_features * torch.empty(0, dtype=dtype).element_size() + 4 * out_features


def no_grad_peak(model: nn.Module, run, inputs=(), eight_bit: bool = False) -> int:
    """Bytes alive at once at the worst moment of `run()` (a forward of the meta `model`) without
    gradients: its inputs, activations and outputs, not its parameters. eight_bit: every nn.Linear is an
    8-bit linear of the kit (int8_matmul_temporaries at each call); attention as fused kernels (the
    output and its logsumexp, never the N x N matrix)."""
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    mode, hooks = _LiveBytes(exclude, [t for t in inputs if isinstance(t, torch.Tensor)]), []

    def int8_call(module, args, out):
        rows = args[0].numel() // module.in_features
        mode.moment(int8_matmul_temporaries(rows, module.in_features, module.out_features, args[0].dtype))

    if eight_bit:
        hooks = [m.register_forward_hook(int8_call) for name, m in model.named_modules()
                 if type(m) is nn.Linear and "lora_" not in name]  # the base's linears, not the LoRA's
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = _fused_attention
        with torch.no_grad(), mode:
            out = run()
        del out
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return mode.peak


# ----------------------------------------------------------------------------- the plan
SAMPLE_ROWS = 2
"""Denoiser rows of the sampling phase: one image's conditional and unconditional rows under
classifier-free guidance (or two images of a sweep without it)."""


@dataclasses.dataclass
class Phase:
    """What is on the GPU at a phase's worst moment, by component (bytes)."""

    components: dict[str, int]
    one_at_a_time: tuple[str, ...] = ()
    """Components that come one after another (encoding each prompt, then the image): the phase holds
    the largest of them, beside all the others."""

    @property
    def peak(self) -> int:
        apart = [v for k, v in self.components.items() if k in self.one_at_a_time]
        return sum(v for k, v in self.components.items() if k not in self.one_at_a_time) + max(apart, default=0)

    def largest(self) -> tuple[str, int]:
        """(name, bytes) of its largest component."""
        return max(self.components.items(), key=lambda kv: kv[1])


@dataclasses.dataclass
class MemoryPlan:
    base: str
    resolution: int
    dtype: str
    cfg: TrainConfig
    offload_encoders: bool
    encoding: Phase
    """The text encoders and the VAE encode the prompt and the image, before the denoiser arrives."""
    loading: Phase
    """The denoiser streamed in 8-bit, its largest layer in flight (the encoders on the CPU by then)."""
    step1: Phase
    step2: Phase
    sampling: Phase
    """The 8-bit denoiser + LoRA 2 on SAMPLE_ROWS rows without gradients, then the VAE decoding one image."""
    # ---- block swap (difflora_kit.block_swap)
    blocks: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    """The denoiser's swappable blocks, in the order they run: (name, bytes as weight_bytes counts them)."""
    whole_steps: tuple[Phase, Phase] | None = dataclasses.field(default=None, repr=False)
    """Step 1 and step 2 with every block on the GPU (step1, step2 above have cfg.offload_blocks off it)."""

    def block_swap(self, n: int) -> SwapPrediction:
        """The prediction for n blocks in pinned CPU memory (the n largest, as block_swap.offloaded picks)."""
        return predict_block_swap(self, n)
    # ---- end of block swap

    @property
    def phases(self) -> dict[str, Phase]:
        """Every phase, in the order a stage runs them."""
        return {"encoding": self.encoding, "loading": self.loading, "step 1": self.step1, "step 2": self.step2,
                "sampling": self.sampling}

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases.values())

    @property
    def peak_phases(self) -> list[str]:
        """The phases at the overall peak (step 1 and step 2 tie in fuse mode: the same model and LoRA)."""
        return [name for name, phase in self.phases.items() if phase.peak == self.peak]

    @property
    def peak_phase(self) -> str:
        """The first phase at the overall peak."""
        return self.peak_phases[0]

    @property
    def in_the_way(self) -> tuple[str, str, int]:
        """(phase, component, bytes): the largest component of the peak phase, what stands in the way."""
        return (self.peak_phase, *self.phases[self.peak_phase].largest())

    @property
    def load_peak(self) -> int:
        return self.loading.peak

    @property
    def encode_peak(self) -> int:
        return self.encoding.peak

    def settings(self) -> str:
        c = self.cfg
        return (f"--base {self.base} --resolution {self.resolution} --batch {c.batch} --rank {c.rank} "
                f"--dtype {self.dtype}{' --gradient-checkpointing' if c.gradient_checkpointing else ''}"
                f"{'' if c.eight_bit else ' --no-eight-bit'} --preset-mode {c.preset_mode}"
                f"{'' if self.offload_encoders else ' --keep-encoders'}"
                f"{f' --offload-blocks {c.offload_blocks}' if c.offload_blocks else ''}")


def weight_bytes(unet: nn.Module, dtype: torch.dtype, eight_bit: bool) -> int:
    """The denoiser as the kit holds it: int8 linears (+ fp32 row scales, bias in dtype), the rest in dtype."""
    size = torch.finfo(dtype).bits // 8
    total = 0
    for m in unet.modules():
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if eight_bit and type(m) is nn.Linear:
            total += m.weight.numel() + 4 * m.out_features + (m.bias.numel() * size if m.bias is not None else 0)
        else:
            total += sum(p.numel() * size for p in own)
    return total


def _attach(unet: nn.Module, cfg: TrainConfig, with_preset: bool, targets: tuple[str, ...]) -> int:
    """The LoRA(s) of a step on the meta denoiser; returns the trainable parameter count."""
    if with_preset:
        unet.add_adapter(lora.peft_config(cfg.rank, cfg.alpha, targets), adapter_name=lora.PRESET_ADAPTER)
    params = lora.attach(unet, cfg.rank, cfg.alpha, targets)
    return sum(p.numel() for p in params)


def _resolution_step(shapes: ModelShapes) -> int:
    """Training sizes must be multiples of this (a UNet halves the latent once per level; a transformer
    packs latent patches): pixels per latent x the denoiser's own multiple."""
    return shapes.pixels_per_latent * shapes.backend.latent_multiple(shapes.unet)


def _encoders(shapes: ModelShapes, resolution: int, dtype: torch.dtype) -> tuple[dict[str, int], dict[str, int], str]:
    """(weights, encoding workspaces, the VAE's component name) of the text encoders and the VAE:
    {name: bytes} each; a workspace is one prompt's or the image's encoding (one at a time)."""
    from diffusers import AutoencoderKL

    size = torch.finfo(dtype).bits // 8
    weights, work = {}, {}
    for class_name, config in shapes.text_encoders:
        encoder = _meta_text_encoder(class_name, config, dtype)
        name = f"text encoder {class_name} ({DTYPE_NAMES[dtype]})"
        if name in weights:  # two of one class (SDXL's are two classes): number them
            name = f"{name} #{sum(k.startswith(name) for k in weights) + 1}"
        weights[name] = sum(p.numel() for p in encoder.parameters()) * size
        work[f"encoding a prompt: {class_name} (activations)"] = text_encode_workspace(encoder, config, shapes.tokens)
    vae_name = ""
    if shapes.vae is not None:
        vdtype = vae_dtype(shapes, dtype)
        vae_name = f"VAE ({DTYPE_NAMES[vdtype]})"
        weights[vae_name] = sum(p.numel() for p in _on_meta(AutoencoderKL, shapes.vae).parameters()) * \
            (torch.finfo(vdtype).bits // 8)
        work["VAE encoding the image (activations)"] = vae_encode_workspace(shapes, resolution, vdtype)
    return weights, work, vae_name


def plan_memory(base: str | Path, resolution: int | None = None, cfg: TrainConfig | None = None, dtype: str = "bf16",
                offload_encoders: bool = True) -> MemoryPlan:
    """Predicted peak memory (bytes) of every phase of a stage for these settings: encoding, loading,
    step 1, step 2, sampling (resolution: training image pixels; None = the size the base was trained at).
    offload_encoders False: the text encoders and the VAE stay on the GPU throughout."""
    cfg = cfg or TrainConfig()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shapes = describe(base)
    step = _resolution_step(shapes)
    resolution = resolution or shapes.sample_size
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step} for this base, got {resolution} "
                         f"(e.g. {max(step, round(resolution / step) * step)})")
    torch_dtype = DTYPES[dtype]
    enc_weights, enc_work, vae_name = _encoders(shapes, resolution, torch_dtype)
    resident = {"text encoders + VAE": 0 if offload_encoders else sum(enc_weights.values())}
    weights_name = "denoiser weights (8-bit linears)" if cfg.eight_bit else f"denoiser weights ({dtype})"
    targets = lora_targets(cfg.targets, shapes.backend.targets_for(shapes.unet))

    encoding = Phase({**enc_weights, **enc_work}, tuple(enc_work))  # the denoiser is not there yet
    steps = {}
    for step, with_preset in ((1, False), (2, cfg.preset_mode == "adapter")):
        if step == 2 and not with_preset:  # fuse / requant: the preset is inside the int8 weights
            steps[2] = Phase(dict(steps[1].components))
            break
        unet = _meta_denoiser(shapes, torch_dtype)
        weights = weight_bytes(unet, torch_dtype, cfg.eight_bit)
        if step == 1:  # block swap: the blocks it can keep off the GPU, sized as above
            try:
                blocks = [(name, weight_bytes(m, torch_dtype, cfg.eight_bit)) for name, m in swapping.swappable_blocks(unet)]
            except ValueError:  # a denoiser without repeated blocks: nothing to swap (offload_blocks 0 only)
                blocks = []
            # loading streams the denoiser layer by layer (streaming.load_denoiser): without and with LoRA 1
            preset = streaming.target_ranks(unet, targets, cfg.rank)
            load = max(streaming.loading_peak(unet, torch_dtype, cfg.eight_bit, None, "fuse", "cuda"),
                       streaming.loading_peak(unet, torch_dtype, cfg.eight_bit, preset, cfg.preset_mode, "cuda"),
                       key=lambda p: p.peak)
            loading = Phase({f"{weights_name}, streamed so far": load.peak - load.in_flight,
                             f"the largest layer in flight ({load.layer})": load.in_flight, **resident})
        n_lora = _attach(unet, cfg, with_preset, targets)
        n_preset = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n) - n_lora
        acts = measure_activations(unet, training_inputs(shapes, resolution, cfg.batch, torch_dtype),
                                   cfg.gradient_checkpointing)
        parts = {weights_name: weights, **resident,
                 "LoRA parameters (fp32)": 4 * n_lora, "LoRA gradients (fp32)": 4 * n_lora,
                 "AdamW moments (fp32)": 8 * n_lora}
        if n_preset:
            parts["preset LoRA, frozen adapter (fp32)"] = 4 * n_preset
        parts["activations kept for backward"] = acts.saved
        parts["backward workspace (estimate)"] = acts.workspace
        steps[step] = Phase(parts)
        if step == 1:  # sampling has the same: the base (no preset) and one LoRA (LoRA 2)
            sampler = unet.eval()

    args, kwargs = training_inputs(shapes, resolution, SAMPLE_ROWS, torch_dtype)
    denoising = no_grad_peak(sampler, lambda: sampler(*args, **kwargs), [*args, *kwargs.values()], cfg.eight_bit)
    on_gpu = resident if not offload_encoders else ({vae_name: enc_weights[vae_name]} if vae_name else {})
    work = {f"denoising {SAMPLE_ROWS} rows (no gradients)": denoising}
    if vae_name:  # pixel space: the denoiser's output is the image
        vdtype = vae_dtype(shapes, torch_dtype)
        work["VAE decoding one image (activations)"] = vae_decode_workspace(shapes, resolution, vdtype)
    sampling = Phase({weights_name: steps[1].components[weights_name],
                      "LoRA 2 (fp32)": steps[1].components["LoRA parameters (fp32)"], **on_gpu, **work}, tuple(work))
    whole = (steps[1], steps[2])
    if cfg.offload_blocks:  # block swap in the training steps only (loading and sampling hold the whole denoiser)
        sizes = _offloaded_sizes(blocks, cfg.offload_blocks)
        steps = {k: _swapped(whole[k - 1], weights_name, sizes, len(blocks)) for k in (1, 2)}
    return MemoryPlan(str(base), resolution, dtype, cfg, offload_encoders, encoding, loading, steps[1], steps[2], sampling,
                      blocks, whole)


# ----------------------------------------------------------------------------- block swap
# N blocks in pinned CPU memory during training (difflora_kit.block_swap): a training step holds the rest
# of the denoiser, plus the two largest offloaded blocks in flight (the one running, the one fetched ahead),
# and copies each offloaded block in for its forward and for its rerun in backward (gradient checkpointing),
# except those still there at the turns. Predicted, not measured: bench/ has no GPU figure of it yet.
SWAP_IN_FLIGHT = "offloaded blocks in flight (the one running, the one ahead)"


@dataclasses.dataclass
class SwapPrediction:
    """What `--offload-blocks n` is predicted to do (bytes)."""

    n: int
    blocks: list[str]
    """The offloaded blocks, in the order they run (the n largest)."""
    offloaded: int
    """Their bytes, kept in pinned CPU memory during training."""
    in_flight: int
    """Device bytes of offloaded blocks at the worst moment: the two largest."""
    step_peak: int
    """The larger training step's peak (step 1 or step 2) with them off the GPU."""
    peak: int
    """The stage's peak: encoding, loading and sampling do not swap; they hold what they held."""
    moved: int
    """Host-to-device bytes of one training step in steady state (block_swap.bytes_per_step)."""
    first_step: int
    """The same for the first step (blocks 0 and 1 come in too)."""


def _offloaded_sizes(blocks: list[tuple[str, int]], n: int) -> list[int]:
    sizes = [b for _, b in blocks]
    return [sizes[i] for i in swapping.choose(sizes, n)]


def _swapped(phase: Phase, weights_name: str, sizes: list[int], total_blocks: int) -> Phase:
    """A training step with the blocks of `sizes` off the GPU: the denoiser's weights less them, plus those in flight."""
    parts = {}
    for k, v in phase.components.items():
        if k == weights_name:
            k, v = f"{weights_name} on the GPU ({len(sizes)} of {total_blocks} blocks in CPU memory)", v - sum(sizes)
        parts[k] = v
        if k.startswith(weights_name):
            parts[SWAP_IN_FLIGHT] = swapping.in_flight_bytes(sizes)
    return Phase(parts, phase.one_at_a_time)


def predict_block_swap(plan: MemoryPlan, n: int) -> SwapPrediction:
    """The plan's training steps with the n largest blocks in pinned CPU memory (MemoryPlan.block_swap)."""
    if not plan.blocks or plan.whole_steps is None:
        raise ValueError(f"{plan.base}: the plan has no swappable blocks")
    sizes_all = [b for _, b in plan.blocks]
    picked = swapping.choose(sizes_all, n)
    sizes = [sizes_all[i] for i in picked]
    weights_name = next(k for k in plan.whole_steps[0].components if k.startswith("denoiser weights"))
    steps = [_swapped(p, weights_name, sizes, len(sizes_all)) if n else p for p in plan.whole_steps]
    step_peak = max(s.peak for s in steps)
    peak = max(step_peak, plan.encoding.peak, plan.loading.peak, plan.sampling.peak)
    moved = swapping.bytes_per_step(sizes)
    return SwapPrediction(n, [plan.blocks[i][0] for i in picked], sum(sizes), swapping.in_flight_bytes(sizes),
                          step_peak, peak, moved, moved + sum(sizes[:2]))


def block_swap_table(plan_or_base, ns, resolution: int | None = None, cfg: TrainConfig | None = None,
                     dtype: str = "bf16", offload_encoders: bool = True) -> list[SwapPrediction]:
    """The prediction for each n of `ns`, from a MemoryPlan or a base (planned with `cfg`, by default batch 1
    with gradient checkpointing, which block swap needs)."""
    plan = plan_or_base
    if not isinstance(plan, MemoryPlan):
        cfg = cfg or TrainConfig(batch=1, gradient_checkpointing=True)
        plan = plan_memory(plan_or_base, resolution, dataclasses.replace(cfg, offload_blocks=0), dtype, offload_encoders)
    return [plan.block_swap(n) for n in ns]


def format_block_swap_table(rows: list[SwapPrediction]) -> str:
    gib, gb = (lambda b: f"{b / GiB:.2f}"), (lambda b: f"{b / 1e9:.2f}")  # noqa: E731
    lines = ["| --offload-blocks | in CPU memory (GiB) | training step peak (GiB) | stage peak (GiB) | "
             "host->device per step (GB) |", "|---|---|---|---|---|"]
    lines += [f"| {r.n} | {gib(r.offloaded)} | {gib(r.step_peak)} | {gib(r.peak)} | {gb(r.moved)} |" for r in rows]
    return "\n".join(lines)


PHASE_TITLES = {
    "encoding": "encoding the prompt and the image, before the denoiser is loaded",
    "loading": "loading: the denoiser streamed in, its largest layer in flight",
    "sampling": f"sampling: {SAMPLE_ROWS} rows without gradients, then the VAE decoding one image",
}


def format_plan(plan: MemoryPlan, gpu_gib: float | None = None) -> str:
    names = list(dict.fromkeys([*plan.step1.components, *plan.step2.components]))
    gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [f"memory plan: {plan.settings()}", "",
             "| component | step 1 (GiB) | step 2 (GiB) |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {gib(plan.step1.components.get(n, 0))} | {gib(plan.step2.components.get(n, 0))} |")
    lines.append(f"| **peak of a training step** | **{gib(plan.step1.peak)}** | **{gib(plan.step2.peak)}** |")
    lines += ["", "| phase (in the order they run) | peak (GiB) | on the GPU (GiB) |", "|---|---|---|"]
    for name, phase in plan.phases.items():
        if name in PHASE_TITLES:
            parts = ", ".join(f"{k} {gib(v)}" for k, v in phase.components.items() if k not in phase.one_at_a_time and v)
            apart = " or ".join(f"{k} {gib(v)}" for k, v in phase.components.items() if k in phase.one_at_a_time)
            apart = f"; one at a time: {apart}" if apart else ""
            lines.append(f"| {PHASE_TITLES[name]} | {gib(phase.peak)} | {parts}{apart} |")
        else:
            lines.append(f"| {name}: a training step (above) | {gib(phase.peak)} | |")
    _, part, size = plan.in_the_way
    lines += ["", f"predicted peak: {gib(plan.peak)} GiB, in {' and '.join(plan.peak_phases)} "
              "(torch.cuda.max_memory_allocated; the CUDA context comes on top)",
              f"what stands in the way: {part}, {gib(size)} of its {gib(plan.peak)} GiB"]
    if plan.cfg.offload_blocks:  # block swap
        s, whole = plan.block_swap(plan.cfg.offload_blocks), max(p.peak for p in plan.whole_steps)
        lines.append(f"block swap (--offload-blocks {s.n}): {s.n} of {len(plan.blocks)} blocks ({gib(s.offloaded)} GiB) "
                     f"in pinned CPU memory, {gib(s.in_flight)} GiB of them in flight: training step "
                     f"{gib(s.step_peak)} GiB ({gib(whole)} with every block on the GPU), {s.moved / 1e9:.2f} GB "
                     f"host->device a step (the first {s.first_step / 1e9:.2f}); predicted, not measured. "
                     "Loading and sampling do not swap.")
    if gpu_gib is not None:
        fits = plan.peak <= 0.9 * gpu_gib * GiB
        lines.append(f"a {gpu_gib:g} GiB GPU: {'fits' if fits else 'does NOT fit'} (keeping 10% for the allocator)")
    return "\n".join(lines)


def advice(plan: MemoryPlan) -> list[str]:
    """What to lower, most effective first, with the predicted peak of each change (GiB)."""
    c, out = plan.cfg, []
    tries = []
    if not c.gradient_checkpointing:
        tries.append(("--gradient-checkpointing", dict(gradient_checkpointing=True), plan.resolution))
    if c.batch > 1:
        tries.append((f"--batch 1 (now {c.batch})", dict(batch=1), plan.resolution))
    step = _resolution_step(describe(plan.base))
    half = max(step, plan.resolution // 2 // step * step)
    if plan.resolution > 512 and half < plan.resolution:
        tries.append((f"--resolution {half} (now {plan.resolution})", {}, half))
    if c.rank > 4:
        tries.append((f"--rank {c.rank // 2} (now {c.rank})", dict(rank=c.rank // 2, alpha=c.alpha / 2), plan.resolution))
    if len(tries) > 1:
        tries.append(("all of these together", {k: v for _, ch, _ in tries for k, v in ch.items()},
                      min(r for _, _, r in tries)))
    for text, change, resolution in tries:
        other = plan_memory(plan.base, resolution, dataclasses.replace(c, **change), plan.dtype, plan.offload_encoders)
        step = max(other.step1.peak, other.step2.peak)
        out.append((other.peak, step, f"{text}: {other.peak / GiB:.2f} GiB (training steps {step / GiB:.2f})"))
    return [text for *_, text in sorted(out)]


@contextlib.contextmanager
def explain_out_of_memory(plan_args: dict):
    """Turn a CUDA out-of-memory error into what to lower, with the plan's figures.
    plan_args: plan_memory's arguments for the current settings (computed only on error)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemoryAdvice(out_of_memory_message(plan_args, e)) from e


class OutOfMemoryAdvice(RuntimeError):
    pass


def error_line(error: BaseException, limit: int = 200) -> str:
    """The first line of `error`'s message (at most `limit` characters), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def out_of_memory_message(plan_args: dict, error: BaseException) -> str:
    first = error_line(error)
    lines = [f"the GPU ran out of memory ({first}). This step's LoRA was not written; a checkpoint written "
             "before is kept: the same command with --resume --gradient-checkpointing continues it (other changes start over)."]
    try:
        plan = plan_memory(**plan_args)
        lines.append(f"Predicted peak for these settings: {plan.peak / GiB:.2f} GiB ({plan.settings()}).")
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            lines.append(f"This GPU has {total / GiB:.1f} GiB: {free / GiB:.1f} GiB free now, "
                         f"{torch.cuda.memory_reserved() / GiB:.1f} GiB reserved by this process.")
        lines.append("Lower one of these (predicted peak after the change):")
        lines += [f"  {a}" for a in advice(plan)]
        lines.append("`difflora plan` with your settings prints the peak by component.")
    except Exception as plan_error:  # the advice must never hide the original error
        lines.append(f"(no memory plan for this base: {plan_error}) Lower --resolution, --batch or --rank.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- batches without gradients
# The health report and strength sweeps run the denoiser without gradients on batches of rows. The plan's
# sampling phase counts SAMPLE_ROWS of them (its prediction holds for any batch down to that); a bigger
# batch is faster but holds activations in proportion to its rows: on SDXL at 1024, ~0.24 GiB a row (bf16,
# 8-bit linears), so the 96 rows that once were every batch's size would hold ~23 GiB. On a GPU the kit
# sizes each batch to the memory free at the time (rows_that_fit); on the CPU it keeps its fixed size.
BATCH_HEADROOM = 0.75
"""Share of the free memory a batch may fill: the rest for what the estimate does not see (the allocator's
fragmentation, cuBLAS workspaces). The per-row figures are predictions, not measured on a GPU."""


@dataclasses.dataclass(frozen=True)
class RowBytes:
    """What a batch without gradients holds, per row and per image (bytes)."""

    denoiser_row: int
    """One denoiser row at the call's worst moment: no_grad_peak of SAMPLE_ROWS rows (the plan's sampling
    batch, 8-bit temporaries included) divided by them; activations grow in proportion to the rows."""
    decode_image: int
    """The VAE decoding one image (0: pixel space)."""
    vae_weights: int
    """The VAE's weights (0: pixel space): they come to the GPU to decode when they are on the CPU."""


def backend_shapes(backend) -> ModelShapes:
    """The ModelShapes of a loaded backend, from its own modules' configs (no folder, no download): its
    denoiser's config, its VAE's (None in pixel space), its text tokens, its latent size."""
    family, vae, encoder = backend.family, backend.vae, backend.text_encoders[0]
    tokens = family.text_tokens or encoder.config.max_position_embeddings
    per_latent = 1 if family.pixel_space or vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelShapes(backend.name, family, dict(backend.unet.config), [],
                       None if family.pixel_space or vae is None else dict(vae.config), tokens, per_latent,
                       backend.latent_shape[-1] * per_latent)


_ROW_BYTES: dict[str, RowBytes] = {}


def row_bytes(base, resolution: int | None = None, dtype: str = "bf16", eight_bit: bool = True) -> RowBytes:
    """RowBytes of `base` (anything `describe` takes, or a ModelShapes: backend_shapes) at `resolution`
    pixels (None: the base's own) in `dtype`, from its configs on the meta device (a second or two the
    first time, then remembered)."""
    from diffusers import AutoencoderKL

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shapes = base if isinstance(base, ModelShapes) else describe(base)
    resolution = resolution or shapes.sample_size
    key = json.dumps([shapes.family.key, shapes.unet, shapes.vae, shapes.tokens, shapes.pixels_per_latent, resolution,
                      dtype, eight_bit], sort_keys=True, default=str)
    if key not in _ROW_BYTES:
        torch_dtype = DTYPES[dtype]
        unet = _meta_denoiser(shapes, torch_dtype).eval()
        args, kwargs = training_inputs(shapes, resolution, SAMPLE_ROWS, torch_dtype)
        peak = no_grad_peak(unet, lambda: unet(*args, **kwargs), [*args, *kwargs.values()], eight_bit)
        vdtype = vae_dtype(shapes, torch_dtype)
        vae = 0 if shapes.vae is None else \
            sum(p.numel() for p in _on_meta(AutoencoderKL, shapes.vae).parameters()) * (torch.finfo(vdtype).bits // 8)
        _ROW_BYTES[key] = RowBytes(-(-peak // SAMPLE_ROWS), vae_decode_workspace(shapes, resolution, vdtype), vae)
    return _ROW_BYTES[key]


def rows_that_fit(cost: RowBytes, free_bytes: int, rows_per_item: int = 1, decode: bool = False,
                  vae_on_device: bool = True, cap: int = 96, least: int = 1, headroom: float = BATCH_HEADROOM) -> int:
    """How many items (a report's probe rows: rows_per_item 1; a sweep's images: 2 rows each under
    classifier-free guidance, then decoded together: `decode`) one call takes in `free_bytes`:

        usable = headroom * free - (the VAE's weights if it must come to the GPU to decode)
        items  = min(usable / (rows_per_item * denoiser_row),  usable / decode_image if decode)

    the denoising and the decoding come one after the other, so the batch is the smaller of the two;
    clipped to [least, cap]. Pure arithmetic."""
    usable = headroom * free_bytes - (cost.vae_weights if decode and not vae_on_device else 0)
    items = usable // (rows_per_item * max(1, cost.denoiser_row))
    if decode and cost.decode_image:
        items = min(items, usable // cost.decode_image)
    return int(max(least, min(cap, items)))


def batch_rows(base, resolution: int | None, dtype: str, free_bytes: int, **fit) -> int:
    """(base or family, resolution, dtype, free bytes) -> items per call: rows_that_fit(row_bytes(...), ...).
    `fit`: rows_that_fit's keywords, and eight_bit (default True)."""
    return rows_that_fit(row_bytes(base, resolution, dtype, fit.pop("eight_bit", True)), free_bytes, **fit)
