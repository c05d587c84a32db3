"""Solutions to the exercises of 01_setup_and_tour.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""

# %% Exercise 1.1
t4_dtype = torch.float16  # compute capability 7.5 < 8.0: no fast bfloat16
rtx4090_dtype = torch.bfloat16  # 8.9 >= 8.0

# %% Exercise 1.2
my_image = world.render(world.Scene("cross", "purple", "white", size="small", dx=-4, dy=-4),
                        world.Style(detail=1, vivid=0))
