"""Solutions to the exercises of 03_the_8bit_base.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""


# %% Exercise 3.1
def int8_linear_bytes(out_features, in_features):
    return out_features * in_features * 1 + out_features * 4  # CB int8 (out, in) + SCB float32 (out,)


# %% Exercise 3.2
CB1, SCB1 = kernels.remerge_int8(CB0, SCB0, A_big, B_big, s)  # + ΔW
CB2, SCB2 = kernels.remerge_int8(CB1, SCB1, A_big, B_big, -s)  # - ΔW, on the merged base: rounds again
changed = int((CB2 != CB0).sum())
