"""The training loop: stratified noise levels, determinism, a loud stop on a non-finite loss."""

import pytest
import torch

from difflora_kit.config import TrainConfig
from difflora_kit.images import load_image
from difflora_kit.pair import prepare_base
from difflora_kit.train import NonFiniteLossError, stratified_timesteps, train_lora


def test_stratified_timesteps_take_one_level_per_slice():
    t = stratified_timesteps(8, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (8,) and t.dtype == torch.int64
    assert all(i * 125 <= int(v) < (i + 1) * 125 for i, v in enumerate(t))


def test_same_seed_same_lora(tiny_pair_loras):
    _, row, _ = tiny_pair_loras
    image = load_image(row["image1"])
    runs = [train_lora(prepare_base("toy", TrainConfig()), image, row["prompt"], TrainConfig(steps=3), progress=False)
            for _ in range(2)]
    a, b = runs[0].lora.tensors, runs[1].lora.tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down_on_the_one_image(tiny_pair_loras):
    result, _, _ = tiny_pair_loras
    losses = result.step1.losses
    assert sum(losses[-3:]) < sum(losses[:3])


def test_non_finite_loss_stops_training(tiny_pair_loras):
    _, row, _ = tiny_pair_loras
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        train_lora(prepare_base("toy", TrainConfig()), load_image(row["image1"]), row["prompt"],
                   TrainConfig(steps=30, lr=1e30), progress=False)


@pytest.mark.parametrize("field,value", [("rank", 0), ("alpha", 0.0), ("alpha", -1.0), ("lr", 0.0), ("steps", 0)])
def test_config_refuses_nonpositive_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
