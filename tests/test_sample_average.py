"""One batched pass for a whole strength sweep; exact averaging in delta-W space."""

import numpy as np
import torch

from difflora_kit import average, lora, sample
from difflora_kit.config import SampleConfig, TrainConfig
from difflora_kit.pair import prepare_base


def test_batched_sweep_equals_one_run_per_strength(tiny_pair_loras):
    result, row, _ = tiny_pair_loras
    backend = prepare_base("toy", TrainConfig())
    cfg = SampleConfig(steps=5)
    strengths = [-1.0, 0.0, 2.0]
    batched = sample.sweep(backend, result.lora2, [row["prompt"], "a green cross on a black background"], [0, 1], strengths, cfg)
    assert batched.shape[:3] == (2, 2, 3)
    assert np.abs(batched[:, :, 2] - batched[:, :, 1]).max() > 0.02  # the LoRA changes the picture
    for k, s in enumerate(strengths):
        alone = sample.sweep(backend, result.lora2, [row["prompt"], "a green cross on a black background"], [0, 1], [s], cfg)
        np.testing.assert_allclose(batched[:, :, k], alone[:, :, 0], atol=1e-4)
    plain = backend.generate([row["prompt"]], [1], steps=5)
    np.testing.assert_allclose(batched[0, 1, 1], plain[0], atol=1e-4)  # s = 0 is the base


def _deltas(lf):
    return lora.module_deltas(lf)


def test_exact_average_is_the_mean_of_the_deltas(tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    members = [result.lora1, result.lora2]
    avg = average.exact_average(members)
    assert avg.rank == result.lora1.rank + result.lora2.rank
    d1, d2, da = _deltas(result.lora1), _deltas(result.lora2), _deltas(avg)
    for name in da:
        torch.testing.assert_close(da[name], (d1[name] + d2[name]) / 2, atol=1e-6, rtol=1e-5)
    weighted = _deltas(average.exact_average(members, [2.0, -0.5]))
    for name in weighted:
        torch.testing.assert_close(weighted[name], 2.0 * d1[name] - 0.5 * d2[name], atol=1e-6, rtol=1e-5)


def test_average_of_copies_is_the_lora_itself(tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    d, da = _deltas(result.lora2), _deltas(average.exact_average([result.lora2] * 3))
    for name in d:
        torch.testing.assert_close(da[name], d[name], atol=1e-6, rtol=1e-5)


def test_averaging_a_and_b_separately_is_not_the_average(tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    exact = _deltas(average.exact_average([result.lora1, result.lora2]))
    name = next(iter(exact))
    (A1, B1), (A2, B2) = result.lora1.modules()[name], result.lora2.modules()[name]
    naive = lora.delta_weight((A1 + A2) / 2, (B1 + B2) / 2, result.lora1.scaling(name))
    assert (naive - exact[name]).norm() > 0.05 * exact[name].norm()
