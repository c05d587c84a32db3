"""difflora-kit: differential LoRA training for diffusion models, taught step by step.

Step 1: LoRA 1 overfits image 1. Step 2: fuse LoRA 1 into the base, train LoRA 2 on image 2.
Use: drop LoRA 1; base + s * LoRA 2 moves any generation from image 1's look toward image 2's.
"""

__version__ = "0.1.0"
