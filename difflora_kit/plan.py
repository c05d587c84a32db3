"""Predicted peak GPU memory of step 1 and step 2, by component, before anything is loaded.

    difflora plan --base sdxl --resolution 1024 --batch 1 [--gradient-checkpointing]

Everything comes from the model's configs, on PyTorch's meta device (shapes only: no weights, no
compute, a few seconds even for SDXL):

    denoiser weights    8-bit linears: out*in bytes + 4 a row (the scale); the rest in the compute dtype
    encoders            text encoder(s) and VAE in the compute dtype; 0 during the steps when offloaded
                        (the kit moves them to the CPU once latents and text states are cached)
    LoRA                fp32 parameters (4 B), their gradients (4 B), AdamW's two moments (8 B)
    activations         what the forward pass keeps for the backward pass: the real denoiser class with
                        the real peft LoRA, run on meta tensors of the training shapes; every tensor
                        autograd saves is counted once (by storage); the 8-bit linears keep nothing of
                        their input (quant.FrozenInt8Matmul: their weight is frozen); attention as
                        fused GPU kernels keep it (q, k, v, output, logsumexp; never the N x N matrix).
                        With gradient checkpointing: what is saved outside the checkpointed blocks, the
                        inputs they keep for the recompute, and the largest block's own saved tensors.
    backward workspace  twice the largest saved tensor (its gradient and one temporary): an estimate

A step's peak is the sum of its components. Before the steps come two phases: loading streams the
denoiser layer by layer (difflora_kit.streaming: each linear merged with the preset and quantized as
it arrives, so the 8-bit model plus its largest layer in flight; the plan walks the same layers as
the loader) beside the encoders, and caching the latent holds the encoders and the VAE's temporaries (three times its largest activation). The prediction is of
torch.cuda.max_memory_allocated (the CUDA context, ~0.3-0.5 GiB more in nvidia-smi, is not in it);
bench/gpu_memory.py measures the same on a GPU and prints both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

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
    """`base`: a public config name (a family key whose row has public configs: sd15, sdxl), 'toy', a
    model folder or a hub id (its configs only are fetched), or a resolved backends.Base."""
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


def _encoder_params(shapes: ModelShapes) -> tuple[int, int]:
    """(text encoders' parameters, the VAE's parameters), from their configs."""
    import transformers
    from diffusers import AutoencoderKL

    text = vae = 0
    with torch.device("meta"):
        for class_name, config in shapes.text_encoders:
            cls = getattr(transformers, class_name)  # CLIPTextModel, T5EncoderModel, Qwen3Model...
            fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype")}
            text += sum(p.numel() for p in cls(cls.config_class(**fields)).parameters())
    if shapes.vae is not None:
        vae = sum(p.numel() for p in _on_meta(AutoencoderKL, shapes.vae).parameters())
    return text, vae


def vae_dtype(shapes: ModelShapes, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype as the backend loads it: fp32 under fp16 when its config says force_upcast (SDXL)."""
    upcast = dtype == torch.float16 and shapes.vae is not None and shapes.vae.get("force_upcast", False)
    return torch.float32 if upcast else dtype


def vae_encode_workspace(shapes: ModelShapes, resolution: int, dtype: torch.dtype) -> int:
    """Temporaries of encoding one training image with the VAE (no gradients): three times its
    largest activation (a layer's input, its output and one temporary). 0 in pixel space."""
    from diffusers import AutoencoderKL

    if shapes.vae is None:
        return 0
    largest = [0]

    def record(module, args, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    vae = _on_meta(AutoencoderKL, shapes.vae, dtype)
    for m in vae.encoder.modules():
        if not list(m.children()):
            m.register_forward_hook(record)
    with torch.no_grad():
        vae.encoder(torch.empty(1, 3, resolution, resolution, device="meta", dtype=dtype))
    return 3 * largest[0]


def training_inputs(shapes: ModelShapes, resolution: int, batch: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Meta tensors of one training step, as the family's denoiser takes them: (args, kwargs)."""
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


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class StepPlan:
    components: dict[str, int]  # name -> bytes

    @property
    def peak(self) -> int:
        return sum(self.components.values())


@dataclasses.dataclass
class MemoryPlan:
    base: str
    resolution: int
    dtype: str
    cfg: TrainConfig
    offload_encoders: bool
    load_peak: int
    """Loading: the denoiser streamed in 8-bit (its largest layer in flight) and the encoders."""
    encode_peak: int
    """Caching latents and text states: 8-bit denoiser, encoders, the VAE encoding the image."""
    step1: StepPlan
    step2: StepPlan

    @property
    def peak(self) -> int:
        return max(self.load_peak, self.encode_peak, self.step1.peak, self.step2.peak)

    def settings(self) -> str:
        c = self.cfg
        return (f"--base {self.base} --resolution {self.resolution} --batch {c.batch} --rank {c.rank} "
                f"--dtype {self.dtype}{' --gradient-checkpointing' if c.gradient_checkpointing else ''}"
                f"{'' if c.eight_bit else ' --no-eight-bit'} --preset-mode {c.preset_mode}")


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


def plan_memory(base: str | Path, resolution: int | None = None, cfg: TrainConfig | None = None, dtype: str = "bf16",
                offload_encoders: bool = True) -> MemoryPlan:
    """Predicted peak memory (bytes) of loading, step 1 and step 2 for these settings
    (resolution: training image pixels; None = the size the base was trained at)."""
    cfg = cfg or TrainConfig()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shapes = describe(base)
    step = _resolution_step(shapes)
    resolution = resolution or shapes.sample_size
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step} for this base, got {resolution} "
                         f"(e.g. {max(step, round(resolution / step) * step)})")
    torch_dtype, size = DTYPES[dtype], torch.finfo(DTYPES[dtype]).bits // 8
    text_params, vae_params = _encoder_params(shapes)
    encoders = text_params * size + vae_params * torch.finfo(vae_dtype(shapes, torch_dtype)).bits // 8
    steps = {}
    for step, with_preset in ((1, False), (2, cfg.preset_mode == "adapter")):
        if step == 2 and not with_preset:  # fuse / requant: the preset is inside the int8 weights
            steps[2] = StepPlan(dict(steps[1].components))
            break
        unet = _meta_denoiser(shapes, torch_dtype)
        weights = weight_bytes(unet, torch_dtype, cfg.eight_bit)
        if step == 1:  # loading streams the denoiser layer by layer (streaming.load_denoiser): without and with LoRA 1
            preset = streaming.target_ranks(unet, lora_targets(cfg.targets, shapes.backend.targets_for(shapes.unet)), cfg.rank)
            load = max(streaming.loading_peak(unet, torch_dtype, cfg.eight_bit, None, "fuse", "cuda").peak,
                       streaming.loading_peak(unet, torch_dtype, cfg.eight_bit, preset, cfg.preset_mode, "cuda").peak)
        n_lora = _attach(unet, cfg, with_preset, lora_targets(cfg.targets, shapes.backend.targets_for(shapes.unet)))
        n_preset = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n) - n_lora
        acts = measure_activations(unet, training_inputs(shapes, resolution, cfg.batch, torch_dtype),
                                   cfg.gradient_checkpointing)
        parts = {"denoiser weights (8-bit linears)" if cfg.eight_bit else f"denoiser weights ({dtype})": weights,
                 "text encoders + VAE": 0 if offload_encoders else encoders,
                 "LoRA parameters (fp32)": 4 * n_lora, "LoRA gradients (fp32)": 4 * n_lora,
                 "AdamW moments (fp32)": 8 * n_lora}
        if n_preset:
            parts["preset LoRA, frozen adapter (fp32)"] = 4 * n_preset
        parts["activations kept for backward"] = acts.saved
        parts["backward workspace (estimate)"] = acts.workspace
        steps[step] = StepPlan(parts)
    encode_peak = weights + encoders + vae_encode_workspace(shapes, resolution, vae_dtype(shapes, torch_dtype))
    return MemoryPlan(str(base), resolution, dtype, cfg, offload_encoders, load + encoders, encode_peak, steps[1], steps[2])


def format_plan(plan: MemoryPlan, gpu_gib: float | None = None) -> str:
    names = list(dict.fromkeys([*plan.step1.components, *plan.step2.components]))
    gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [f"memory plan: {plan.settings()}", "",
             "| component | step 1 (GiB) | step 2 (GiB) |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {gib(plan.step1.components.get(n, 0))} | {gib(plan.step2.components.get(n, 0))} |")
    lines.append(f"| **peak of a training step** | **{gib(plan.step1.peak)}** | **{gib(plan.step2.peak)}** |")
    lines += ["", f"loading (the denoiser streamed in 8-bit, its largest layer in flight, + encoders): {gib(plan.load_peak)} GiB",
              f"encoding the image and prompt once (8-bit denoiser + encoders + VAE at work): {gib(plan.encode_peak)} GiB",
              f"predicted peak: {gib(plan.peak)} GiB (torch.cuda.max_memory_allocated; the CUDA context comes on top)"]
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


def out_of_memory_message(plan_args: dict, error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lines = [f"the GPU ran out of memory ({first[:200]}). This step's LoRA was not written; a checkpoint written "
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
