"""Solutions to the exercises of 04_step1_overfit_lora1.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""

# %% Exercise 4.1
psnrs = [judge.psnr(image, image1) for image in after["images"]]  # one per seed
worst_seed = seeds[int(np.argmin(psnrs))]

# %% Exercise 4.2
from difflora_kit import sample

half = sample.sweep(plain, lora1, [prompt], [100], [0.5], sample_cfg)[0, 0, 0]  # (32, 32, 3)
half_psnr = judge.psnr(half, image1)
