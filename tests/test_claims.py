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
    s = c3["strengths"]
    score = dict(zip(s, c3["score_mean"]))
    assert score[1.0] > score[0.0] + 0.3
    assert score[2.0] > score[1.0]
    assert score[-1.0] <= score[0.0] + 0.05  # negative s does not add detail
    kept = dict(zip(s, c3["content_kept"]))
    assert kept[1.0] >= 0.8
    right = dict(zip(s, c3["content_right"]))
    assert right[1.0] >= right[0.0] - 0.2


def test_claim4_the_average_is_steadier_than_single_pairs(quick_run):
    c4 = quick_run["claims"]["claim4"]
    singles = np.mean([x["relative"] for x in c4["singles"]])
    assert c4["average"]["mean"] > 0.2
    assert c4["average"]["relative"] < singles


def test_claim5_the_control_changes_the_content_far_more(quick_run):
    c3, c5 = quick_run["claims"]["claim3"], quick_run["claims"]["claim5"]
    k = c3["strengths"].index(1.0)
    assert c5["content_kept"][k] <= c3["content_kept"][k] - 0.3


def test_demo_outputs_are_written_whole(quick_run, tmp_path):
    write_outputs(quick_run, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"lora1.safetensors", "lora2.safetensors", "control.safetensors", "lora2_average.safetensors",
            "strength_grid.png", "claims.md", "claims.json", "losses.png"} <= names
    assert lora.load(tmp_path / "lora2_average.safetensors").meta["stage"] == "average"
    assert json.loads((tmp_path / "claims.json").read_text())["claims"]["claim1"]
    assert "| 1. base + LoRA 1 draws image 1 |" in (tmp_path / "claims.md").read_text()
