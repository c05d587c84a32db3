"""Solutions to the exercises of 08_real_model_on_a_gpu.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""

# %% Exercise 8.1
plan_big = plan_memory(plan_base, plan.resolution,
                       TrainConfig(rank=RANK, alpha=float(RANK), batch=4, gradient_checkpointing=False), plan_dtype)
key = "activations kept for backward"
activations_ratio = plan_big.step1.components[key] / plan.step1.components[key]

# %% Exercise 8.2
kohya_modules = sum(k.endswith(".alpha") for k in kohya_keys)
with safe_open(str(kohya_path), framework="pt") as f:
    down = next(k for k in f.keys() if k.endswith(".lora_down.weight"))
    kohya_rank = f.get_tensor(down).shape[0]

# %% Exercise 8.3
image_minus = draw("lora2", -1.0)
