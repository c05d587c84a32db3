"""Solutions to the exercises of 06_lora2_strength_slider.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""

# %% Exercise 6.1
my_prompt = "a yellow square on a black background"
slider.prompt_box.value = my_prompt
slider.render()  # what the Render button does: one new batched sweep of this prompt
slider.slider.value = -1.0
k = STRENGTHS.index(-1.0)
minus_scores = [judge.read(image).score(AXIS) for image in slider.images[:, k]]  # one per seed

# %% Exercise 6.2
gated_cfg = SampleConfig(steps=SAMPLE_STEPS, lora_off_first=0.5)  # LoRA 2 off for the first half of the steps
gated = evaluate.strength_effect(plain, lora2, scenes, sweep_seeds, (0.0, 1.0, 2.0), AXIS, gated_cfg)
