"""Solutions to the exercises of 02_lora_from_scratch.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""


# %% Exercise 2.1
def lora_parameter_count(out_features, in_features, rank):
    return rank * in_features + out_features * rank  # A: (r, in), B: (out, r)


# %% Exercise 2.2
conv_name = "down_blocks.0.resnets.0.conv1"
conv = unet.get_submodule(conv_name)
A_c = conv.lora_A["difflora"].weight  # (r, in, 3, 3)
B_c = conv.lora_B["difflora"].weight  # (out, r, 1, 1)
conv_delta = conv.scaling["difflora"] * (B_c.flatten(1) @ A_c.flatten(1))  # (out, r) @ (r, in*9) -> (out, in*9)
conv_delta = conv_delta.view(B_c.shape[0], *A_c.shape[1:]).detach()  # (out, in, 3, 3)
