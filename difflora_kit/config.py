"""One typed configuration for training and sampling, shared by the CLI and the notebooks.

    cfg = TrainConfig(rank=8, steps=120)      # notebooks
    difflora train IMG --rank 8 --steps 120   # CLI: every field is a flag of the same name
"""

from __future__ import annotations

import dataclasses

# Where LoRA goes in a diffusers UNet. With attention only at low resolution (the toy model,
# and the top level of SD), attention-only LoRA cannot draw a texture: the ResNet convolutions
# must be adapted too (../shared/toy_experiment).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")

# How a preset LoRA enters the base in step 2 (difflora_kit.preset draws the three).
PRESET_MODES = ("fuse", "requant", "adapter")


def check_mode(mode: str, eight_bit: bool = True) -> str:
    """`mode` if it is a preset mode that works with `eight_bit`, else a ValueError saying why."""
    if mode not in PRESET_MODES:
        raise ValueError(f"preset_mode must be one of {', '.join(PRESET_MODES)}, got {mode!r}")
    if mode == "requant" and not eight_bit:
        raise ValueError("preset_mode 'requant' re-merges into int8 weights: it needs the 8-bit base "
                         "(drop --no-eight-bit, or use --preset-mode fuse)")
    return mode


def lora_targets(targets: tuple[str, ...], family_targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """The module suffixes a LoRA goes on: the family's own (e.g. a transformer's) when the user kept
    the UNet defaults and the family has its own, else `targets` as given."""
    return tuple(family_targets) if tuple(targets) == DEFAULT_TARGETS and family_targets else tuple(targets)


@dataclasses.dataclass
class TrainConfig:
    """Settings of one LoRA training run (step 1 or step 2: the same loop)."""

    rank: int = 8
    """LoRA rank r: A is (r, in), B is (out, r)."""
    alpha: float = 8.0
    """LoRA alpha: the update is (alpha / r) * B @ A."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name suffixes of the denoiser that get a LoRA (peft `target_modules`)."""
    steps: int = 100
    """Optimizer steps."""
    batch: int = 8
    """Timesteps per step: copies of the one training image at stratified noise levels."""
    lr: float = 5e-3
    """AdamW learning rate of the LoRA parameters (constant after a short warmup)."""
    seed: int = 0
    """Seed of noise and timesteps: same seed, same LoRA (on the same machine)."""
    eight_bit: bool = True
    """Keep the denoiser's linear layers in 8-bit (bitsandbytes Linear8bitLt); False = full precision."""
    preset_scale: float = 1.0
    """Strength at which a preset LoRA (step 2) is applied to the base."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many steps (0 = never); `--resume` continues from it."""
    preset_mode: str = "fuse"
    """How the preset LoRA enters the base in step 2: fuse | requant | adapter (difflora_kit.preset)."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's blocks in the backward pass instead of keeping their activations:
    less memory (`difflora plan` shows how much), slower steps (each block runs forward twice)."""
    # ---- block swap (difflora_kit.block_swap)
    offload_blocks: int = 0
    """Keep this many of the denoiser's 8-bit blocks in pinned CPU memory, each brought to the GPU
    (one ahead, asynchronously) for its forward and its rerun in backward: less GPU memory, more
    host-to-device copies (`difflora plan --offload-blocks N` predicts both). Needs
    --gradient-checkpointing. 0 = every block stays on the GPU."""
    # ---- end of block swap

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if int(self.offload_blocks) < 0:
            raise ValueError(f"offload_blocks must be >= 0 (0 = no block swap), got {self.offload_blocks!r}")
        if self.offload_blocks and not self.gradient_checkpointing:
            raise ValueError("offload_blocks needs gradient_checkpointing (--gradient-checkpointing): without it "
                             "autograd keeps every block's 8-bit weights on the GPU until the backward pass, so "
                             "swapping blocks out would free nothing")
        if int(self.checkpoint_every) < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every!r}")
        for name in ("rank", "steps", "batch"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("alpha", "lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        check_mode(self.preset_mode, self.eight_bit)
        if not self.targets:
            raise ValueError("targets is empty: name at least one module suffix, e.g. to_q,conv1")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


SOLVERS = ("ddim", "dpmpp", "unipc")
"""SampleConfig.solver's choices (diffusion.sampling_scheduler builds them)."""


@dataclasses.dataclass
class SampleConfig:
    """Settings of sampling (a solver with classifier-free guidance)."""

    steps: int = 20
    """Solver steps (trailing spacing)."""
    guidance: float = 2.0
    """Classifier-free guidance scale (1 = off)."""
    rescale: float = 0.7
    """Guidance rescale (Lin et al. 2023); keeps colours right at guidance > 1 on v-prediction."""
    lora_off_first: float = 0.0
    """Start-noise gate (Concept Sliders): the fraction of the first, noisiest steps sampled without
    the LoRA, so the composition is set by the base alone. 0 = the LoRA acts at every step."""
    solver: str = "ddim"
    """The sampler of the UNet families (toy, SD 1.x, SDXL): ddim, dpmpp (DPM-Solver++ 2M) or unipc
    (UniPC, order 2). FLUX and Z-Image sample with their flow Euler loop and take ddim only."""

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: one of {', '.join(SOLVERS)}")
        if self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.lora_off_first <= 1.0:
            raise ValueError(f"lora_off_first is a fraction of the steps, in [0, 1]; got {self.lora_off_first!r}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance!r}")

