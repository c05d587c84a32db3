"""The own changes and the label rule of bench/health_natural.py (the natural-dud validation set): pure functions."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from difflora_kit import health
from difflora_kit.toy import judge, world

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def hn():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("health_natural", BENCH / "health_natural.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCENES = [world.Scene("circle", "red", "grey", "large", 0, 4), world.Scene("cross", "blue", "white", "small", -4, 0),
          world.Scene("square", "yellow", "black"), world.Scene("triangle", "green", "blue", "large", 4, -4)]


@pytest.mark.parametrize("name", ["warm", "light from above"])
def test_each_change_moves_its_metric_and_keeps_the_judged_content(hn, name):
    change, metric = hn.CHANGES[name]
    for scene in SCENES:
        for style in (world.Style(0, 1), world.Style(1, 0)):
            image = world.render(scene, style)
            after = change(image)
            assert after.shape == image.shape and after.dtype == np.float32
            assert 0.0 <= after.min() and after.max() <= 1.0
            assert metric(after) - metric(image) > 0.05  # along the change, well above rounding
            assert metric(image) == pytest.approx(metric(image.copy()))  # a pure function
            a, b = judge.read(image), judge.read(after)
            assert (a.shape, a.foreground, a.background) == (b.shape, b.foreground, b.background)


def test_light_from_above_leaves_the_judged_detail_and_the_warmth_alone(hn):
    image = world.render(SCENES[0], world.Style(1, 1))
    after = hn.light_from_above(image)
    assert abs(judge.read(after).detail - judge.read(image).detail) < 0.1
    assert abs(hn.warmth(after) - hn.warmth(image)) < 0.01
    assert abs(hn.top_light(hn.warm(image)) - hn.top_light(image)) < 0.02


def test_label_rule_checks_drag_first_then_a_share_of_the_median(hn):
    median = 0.5
    assert hn.label(0.0, 0.5, median) == health.DRAGS  # content lost wins over no effect
    assert hn.label(0.149, 1.0, median) == health.NO_EFFECT  # under 30% of the median
    assert hn.label(0.151, 1.0, median) == health.TRANSFERS
    assert hn.label(-0.2, 0.8, median) == health.NO_EFFECT  # against the change: no effect along it
