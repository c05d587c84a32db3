"""The technique's five claims, measured on the toy model with the 8-bit base, on a short schedule.

Thresholds were set from measured runs with a margin (README, "The claims, measured").
This is the same code path as `difflora demo --quick`: train_pair, the control, more LoRA 2s,
measure_claims, and the demo's output writer.
"""

import json

import numpy as np
import pytest

from difflora_kit import lora
from difflora_kit.demo import quick_configs, run_claims, write_outputs


@pytest.fixture(scope="module")
def quick_run():
    cfg, eval_cfg = quick_configs()
    return run_claims(n_average=3, cfg=cfg, eval_cfg=eval_cfg, progress=False)


def test_claim1_lora1_draws_image1_for_every_seed(quick_run):
    c1 = quick_run["claims"]["claim1"]
    assert c1["base+lora1"]["match"] == 1.0
    assert c1["base"]["match"] <= 0.5
    assert c1["base+lora1"]["psnr"] > c1["base"]["psnr"] + 5


def test_claim2_lora1_plus_lora2_draws_image2(quick_run):
    c2 = quick_run["claims"]["claim2"]
    assert c2["base+lora1+lora2"]["match"] == 1.0
    assert c2["base+lora1"]["match"] == 0.0  # the preset alone draws image 1, not image 2
    assert c2["base+lora1+lora2"]["psnr"] > c2["base+lora1"]["psnr"] + 3


def test_claim3_lora2_moves_the_style_and_keeps_the_content(quick_run):
    c3 = quick_run["claims"]["claim3"]
    score = dict(zip(c3["strengths"], c3["score_mean"]))
    assert score[1.0] > score[0.0] + 0.3  # measured: 0.46 -> 1.00 (saturates near the training level)
    assert score[2.0] > score[0.0] + 0.3
    assert score[-1.0] < score[0.0] - 0.2  # negative s goes the other way: measured 0.02
    kept = dict(zip(c3["strengths"], c3["content_kept"]))
    right = dict(zip(c3["strengths"], c3["content_right"]))
    assert kept[1.0] >= 0.8 and kept[-1.0] >= 0.6
    assert right[1.0] >= right[0.0] - 0.2


def test_claim4_the_average_is_at_least_as_steady_as_single_pairs(quick_run):
    c4 = quick_run["claims"]["claim4"]
    singles = [x["relative"] for x in c4["singles"]]
    assert c4["average"]["mean"] > 0.2  # it still has an effect
    assert c4["average"]["relative"] <= np.mean(singles) + 0.05  # measured 0.83 vs 0.88
    assert c4["average"]["relative"] < max(singles)  # steadier than the worst pair (measured 1.08)


def test_claim5_the_control_changes_the_content_far_more(quick_run):
    c3, c5 = quick_run["claims"]["claim3"], quick_run["claims"]["claim5"]
    top = c3["strengths"].index(max(c3["strengths"]))
    assert c5["content_kept"][top] <= c3["content_kept"][top] - 0.3  # measured at s=2: 8% vs 75%
    positive = [k for k, s in enumerate(c3["strengths"]) if s > 0]
    assert np.mean([c5["content_kept"][k] for k in positive]) < np.mean([c3["content_kept"][k] for k in positive])


def test_demo_outputs_are_written_whole(quick_run, tmp_path):
    write_outputs(quick_run, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"lora1.safetensors", "lora2.safetensors", "control.safetensors", "lora2_average.safetensors",
            "strength_grid.png", "claims.md", "claims.json", "losses.png"} <= names
    assert lora.load(tmp_path / "lora2_average.safetensors").meta["stage"] == "average"
    assert json.loads((tmp_path / "claims.json").read_text())["claims"]["claim1"]
    assert "| 1. base + LoRA 1 draws image 1 |" in (tmp_path / "claims.md").read_text()
