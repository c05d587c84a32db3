"""Realistic pairs, the judge's incidental readings, and the stability curve (`difflora stability`).

The curve runs the user's code path (the CLI, training the pool, exact averages, the judge) on a
short schedule, N in {1, 4, 8}; its direction is asserted with thresholds from measured runs
(bench/results/stability_detail.md has the full curve at the default schedule).
"""

import json
import random

import numpy as np
import pytest

from difflora_kit import stability
from difflora_kit.cli import main
from difflora_kit.images import load_image
from difflora_kit.toy import judge, world
from difflora_kit.backends.toy import DATA_SAMPLES
from difflora_kit.toy.pairs import IncidentalSpread, make_pairs, read_pairs

REALISTIC = DATA_SAMPLES / "pairs_realistic" / "metadata.jsonl"


def test_shipped_realistic_pairs_are_what_make_pairs_writes(tmp_path):
    rows = read_pairs(REALISTIC)
    for axis in world.AXES:
        assert sum(r["axis"] == axis for r in rows) >= 32
    side = json.loads((REALISTIC.parent / "pairs.json").read_text())
    remade = make_pairs(tmp_path / "p", side["per_axis"], side["seed"], realistic=True,
                        spread=IncidentalSpread(**{k: tuple(v) if isinstance(v, list) else v for k, v in side["spread"].items()}))
    assert remade.read_text() == REALISTIC.read_text()
    for r in read_pairs(remade)[:: 16]:
        name = r["image1"].split("/p/")[1]
        assert np.array_equal(load_image(r["image1"]), load_image(REALISTIC.parent / name))
    drawn = [r["incidental"] for r in rows]
    assert {d["grain_on"] for d in drawn} == {1, 2}
    for f in ("shift_x", "shift_y", "size", "fg_shade", "bg_shade"):  # random signs: zero mean over pairs
        values = np.array([d[f] for d in drawn])
        assert (values > 0).any() and (values < 0).any()
        assert abs(values.mean()) < 0.5 * np.abs(values).mean()


def test_judge_reads_each_incidental_factor():
    rng = random.Random(3)
    errors = {f: [] for f in judge.INCIDENTAL_FACTORS}
    for i in range(40):
        scene = world.random_scene(rng)
        style = world.Style(rng.randint(0, 1), rng.randint(0, 1))
        inc = world.Incidental(shift_x=rng.uniform(-2.5, 2.5), shift_y=rng.uniform(-2.5, 2.5), size=rng.uniform(-1.5, 1.5),
                               fg_shade=rng.uniform(-0.1, 0.1), bg_shade=rng.uniform(-0.1, 0.1))
        a, b = judge.read(world.render(scene, style)), judge.read(world.render(scene, style, incidental=inc))
        assert a.scene == world.Scene(scene.shape, scene.foreground, scene.background, scene.size, scene.dx, scene.dy)
        drawn = stability.drawn_changes({**{k: getattr(inc, k) for k in ("shift_x", "shift_y", "size", "fg_shade",
                                                                          "bg_shade")}, "grain": 0.0, "grain_on": 2})
        for f, (field, _) in judge.INCIDENTAL_FACTORS.items():
            if f != "grain":
                errors[f].append(getattr(b, field) - getattr(a, field) - drawn[f])
    # shapes are drawn on a pixel grid and shades clip at 0 and 1: readings are close, not exact
    assert np.median(np.abs(errors["shift_x"])) < 0.4 and np.median(np.abs(errors["shift_y"])) < 0.4
    assert np.median(np.abs(errors["size"])) < 0.6
    assert np.median(np.abs(errors["bg_shade"])) < 3 and np.median(np.abs(errors["fg_shade"])) < 4
    clean, grainy = world.Scene("circle", "red", "grey"), world.Incidental(grain=0.08, grain_seed=1)
    assert judge.read(world.render(clean)).grain < 2
    assert abs(judge.read(world.render(clean, incidental=grainy)).grain - 0.08 * 255) < 4


def test_subsets_are_distinct_and_their_overlap_is_measured():
    rng = random.Random(0)
    subsets = stability.draw_subsets(8, 4, 5, rng)
    assert len(set(subsets)) == 5 and all(len(set(s)) == 4 for s in subsets)
    assert stability.draw_subsets(4, 4, 5, rng) == [(0, 1, 2, 3)]  # only one exists
    assert stability.mean_overlap([(0, 1), (2, 3)]) == 0.0 and stability.mean_overlap([(0, 1), (0, 1)]) == 1.0
    with pytest.raises(ValueError, match="pool of 3"):
        stability.draw_subsets(3, 4, 2, rng)
    left = stability.leftover([{"a": 2.0}, {"a": -2.0}, {"a": 1.0}], (0, 1))
    assert left == {"a": 0.0}


def test_stability_refuses_bad_requests_fast(tmp_path, capsys):
    assert main(["stability", str(REALISTIC), "--from", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["stability", str(REALISTIC), "--axis", "detail", "--limit", "2", "--n", "1,4",
                 "--out", str(tmp_path / "s")]) == 2
    assert "pool holds 2 pairs" in capsys.readouterr().err
    assert main(["stability", "--from", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "index.json" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


SHORT = ["--steps", "30", "--lr", "1e-2", "--prompts", "4", "--seeds-per-prompt", "2", "--candidates", "8",
         "--sample-steps", "10"]


@pytest.fixture(scope="module")
def short_curve(tmp_path_factory):
    """The CLI on 8 realistic detail pairs, short schedule: trains the pool, N = 1, 4, 8, 3 subsets each."""
    out = tmp_path_factory.mktemp("stability") / "curve"
    assert main(["stability", str(REALISTIC), "--axis", "detail", "--limit", "8", "--n", "1,4,8", "--subsets", "3",
                 "--out", str(out), *SHORT]) == 0
    return out


def test_stability_writes_its_outputs_and_the_curve_goes_the_right_way(short_curve):
    result = json.loads((short_curve / "stability.json").read_text())
    assert (short_curve / "stability.md").read_text().startswith("| N |")
    assert (short_curve / "stability.png").stat().st_size > 10_000
    rows = {r["n"]: r for r in result["rows"]}
    assert set(rows) == {1, 4, 8} and rows[8]["subsets"] == 1  # one subset of 8 from a pool of 8
    assert rows[1]["overlap"] == 0.0 and 0 < rows[4]["overlap"] < 1
    # Measured on this schedule (8 cases only, so single factors are noisy): the pairs' own changes, averaged over
    # the factors, shrink to 0.26 of N = 1 at N = 8; what the LoRAs leak of them (systematic part, mean over the
    # factors) to 0.28; the effect 0.76 -> 1.14, content kept 67% -> 88%, the spread of subset means 0.354 -> 0.008.
    left = np.mean([rows[8]["leftover"][f] / rows[1]["leftover"][f] for f in rows[1]["leftover"]])
    assert left < 0.6  # the data: zero-mean draws wash out
    sys1 = np.mean([rows[1]["leakage_systematic"][f] for f in rows[1]["leakage_systematic"]])
    sys8 = np.mean([rows[8]["leakage_systematic"][f] for f in rows[8]["leakage_systematic"]])
    assert sys8 < 0.7 * sys1  # the LoRAs: what they leak of them washes out too
    assert rows[8]["effect_mean"] > 0.5 * rows[1]["effect_mean"] > 0  # the shared change stays
    assert rows[8]["content_kept"] >= rows[1]["content_kept"]
    assert rows[4]["effect_subset_std"] < rows[1]["effect_subset_std"]


def test_stability_from_a_pairs_folder_reuses_its_lora2s(short_curve, tmp_path):
    out = tmp_path / "again"
    assert main(["stability", "--from", str(short_curve / "pairs"), "--n", "1,2", "--subsets", "2", "--out", str(out),
                 *SHORT[4:]]) == 0
    result = json.loads((out / "stability.json").read_text())
    assert result["pool"] == 8 and result["axis"] == "detail" and [r["n"] for r in result["rows"]] == [1, 2]
    assert all(r["leftover"] for r in result["rows"])  # the incidental values were found through index.json
