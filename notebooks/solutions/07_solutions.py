"""Solutions to the exercises of 07_averaging_many_pairs.ipynb.

Each `# %% Exercise N.M` section replaces the exercise cell of that number; it uses the
notebook's variables, so it runs inside the notebook, not on its own (the tests insert each
section after its exercise cell and let the check cell below verify it).
"""

# %% Exercise 7.1
k95 = next(k for k in range(1, exact.rank + 1) if average.compress(exact, rank=k)[1].energy >= 0.95)

# %% Exercise 7.2
for i, (checkbox, weight) in enumerate(zip(averager.checkboxes, averager.weights)):
    checkbox.value = i in (0, 1)  # only pairs 0 and 1 ticked
    weight.value = {0: 2.0, 1: 1.0}.get(i, 1.0)
averager.normalise.value = True  # 2 and 1 -> 2/3 and 1/3
averager.apply()  # the Apply button
weighted = averager.result
