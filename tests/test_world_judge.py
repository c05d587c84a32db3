"""The toy world renders what it captions, and the judge reads it back."""

import random

import numpy as np
import pytest

from difflora_kit.toy import judge, world


def test_judge_reads_every_render_exactly_even_with_grain():
    rng = random.Random(7)
    gen = np.random.default_rng(7)
    wrong = 0
    for _ in range(200):
        scene = world.random_scene(rng)
        style = world.Style(rng.randint(0, 1), rng.randint(0, 1))
        image = world.render(scene, style)
        grain = np.clip(image + 0.08 * gen.standard_normal(image.shape), 0, 1)
        for im in (image, grain):
            r = judge.read(im)
            ok = r.scene == scene and (r.detail > 0.5) == bool(style.detail) and (r.vivid > 0.5) == bool(style.vivid)
            wrong += not ok
    assert wrong == 0


@pytest.mark.parametrize("axis", world.AXES)
def test_pairs_differ_only_along_their_axis(axis):
    scene = world.Scene("cross", "purple", "white", "small", 4, -4)
    low, high = world.paired_styles(axis, other=1)
    r1, r2 = judge.read(world.render(scene, low)), judge.read(world.render(scene, high))
    assert r1.scene == r2.scene == scene
    assert r1.score(axis) == pytest.approx(0, abs=0.05) and r2.score(axis) == pytest.approx(1, abs=0.05)
    other = [a for a in world.AXES if a != axis][0]
    assert r1.score(other) == pytest.approx(r2.score(other), abs=0.05)


def test_style_scores_are_monotone_in_a_blend():
    scene = world.Scene("square", "green", "black")
    low, high = world.render(scene, world.Style(0, 1)), world.render(scene, world.Style(1, 1))
    scores = [judge.read((1 - a) * low + a * high).detail for a in (0, 0.25, 0.5, 0.75, 1)]
    assert all(b > a for a, b in zip(scores, scores[1:]))


def test_captions_and_held_out_split():
    held, train = set(world.held_out_captions()), set(world.training_captions())
    assert len(held) == 12 and not held & train and held | train == set(world.all_captions())
    assert world.Scene("circle", "orange", "blue").caption == "an orange circle on a blue background"
    assert all(f != b for _, f, b in world.all_captions())


def test_psnr():
    a = np.zeros((4, 4, 3))
    assert judge.psnr(a, a + 0.1) == pytest.approx(20.0)
