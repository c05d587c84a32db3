"""Solutions to the exercises of 05_step2_lora2_difference.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""

# %% Exercise 5.1
strengths = lora1_effect["strengths"]  # [0.0, 1.0, 2.0]: the lists below follow it
lora1_kept = lora1_effect["content_kept"][strengths.index(2.0)]
lora1_score_change = lora1_effect["score_mean"][strengths.index(2.0)] - lora1_effect["score_mean"][strengths.index(0.0)]
