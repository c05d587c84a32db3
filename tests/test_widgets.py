"""The notebook widgets and plots, headless: set `.value`, `.click()`; observers fire synchronously."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from difflora_kit import average, lora, plots, sample, widgets
from difflora_kit.config import SampleConfig
from difflora_kit.lora import LoraFile
from difflora_kit.pair import prepare_base

FAST = SampleConfig(steps=4)
STRENGTHS = (-1.0, 0.0, 1.0, 2.0)


@pytest.fixture
def sweeps(monkeypatch):
    """Counts sample.sweep calls (the widgets must sample through it)."""
    calls = []
    real = sample.sweep

    def counted(*args, **kwargs):
        calls.append(args[2])  # the prompts
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sweep", counted)
    return calls


@pytest.fixture(scope="module")
def backend(tiny_pair_loras):
    return prepare_base("toy", tiny_pair_loras[2])


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def middle_panel(sheet: np.ndarray, seed_row: int, size: int, scale: int) -> np.ndarray:
    """The 'base + s * LoRA' tile of one seed's row (layout: base | s | diff, GAP pixels apart)."""
    side, gap = size * scale, widgets.GAP
    top, left = seed_row * (side + gap), side + gap
    return sheet[top : top + side, left : left + side]


def expected_tile(image: np.ndarray, scale: int) -> np.ndarray:
    u8 = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.kron(u8, np.ones((scale, scale, 1), np.uint8))


def scaled(l: LoraFile, factor: float) -> LoraFile:
    """The same LoRA with delta-W multiplied by `factor` (B scaled)."""
    tensors = {k: v * factor if ".lora_B." in k else v.clone() for k, v in l.tensors.items()}
    return LoraFile(tensors, dict(l.config), dict(l.meta))


def assert_same_deltas(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


# ---- StrengthSlider -----------------------------------------------------------------------------
def test_slider_swaps_precomputed_images_without_sampling(backend, tiny_pair_loras, sweeps):
    lora2 = tiny_pair_loras[0].lora2
    w = widgets.StrengthSlider(backend, lora2, prompt="a red circle on a blue background", seeds=[0, 1],
                               strengths=STRENGTHS, sample_cfg=FAST, scale=4)
    assert len(sweeps) == 1, "the whole sweep must be one sample.sweep call"
    assert w.images.shape == (2, len(STRENGTHS), 32, 32, 3)
    assert isinstance(w.widget, widgets.W.VBox) and w.slider in w.widget.children and w.image in w.widget.children
    assert w.slider.description == "strength"
    assert "application/vnd.jupyter.widget-view+json" in w._repr_mimebundle_()

    before = w.image.value
    for target in (2.0, -1.0):
        w.slider.value = target
        assert w.current_strength == target
        k = STRENGTHS.index(target)
        sheet = decode(w.image.value)
        assert sheet.shape == (2 * 32 * 4 + widgets.GAP, 3 * 32 * 4 + 2 * widgets.GAP, 3)
        for row in range(2):
            np.testing.assert_array_equal(middle_panel(sheet, row, 32, 4), expected_tile(w.images[row, k], 4))
            np.testing.assert_array_equal(sheet[row * (128 + widgets.GAP) :][:128, :128], expected_tile(w.images[row, 1], 4))
    assert w.image.value != before
    assert len(sweeps) == 1, "moving the slider must not sample"
    assert "seed 0" in w.readings.value and "seed 1" in w.readings.value and "detail" in w.readings.value


def test_slider_renders_a_new_prompt_only_on_click(backend, tiny_pair_loras, sweeps):
    w = widgets.StrengthSlider(backend, tiny_pair_loras[0].lora2, seeds=[0], strengths=STRENGTHS, sample_cfg=FAST)
    assert w.prompt_box.continuous_update is False and w.seed_box.continuous_update is False
    old_images, old_png = w.images.copy(), w.image.value

    w.prompt_box.value = "a green cross on a white background"
    w.seed_box.value = 5
    assert len(sweeps) == 1, "typing must not sample"
    w.render_button.click()
    assert sweeps == [["a red circle on a blue background"], ["a green cross on a white background"]]
    assert w.prompt == "a green cross on a white background" and w.seeds == [5]
    assert not np.array_equal(w.images, old_images) and w.image.value != old_png
    assert w.status.value == ""

    w.prompt_box.value = "   "
    w.render_button.click()  # an empty prompt: an error in the widget, no exception, no sampling
    assert len(sweeps) == 2 and "empty" in w.status.value


def test_slider_needs_strength_zero(backend, tiny_pair_loras):
    with pytest.raises(ValueError, match="include 0"):
        widgets.StrengthSlider(backend, tiny_pair_loras[0].lora2, strengths=(0.5, 1.0), sample_cfg=FAST)


def test_panel_is_base_image_and_amplified_difference():
    base, img = np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.2)
    p = widgets._panel(base, img, scale=3)
    assert p.dtype == np.uint8 and p.shape == (6, 3 * 6 + 2 * widgets.GAP, 3)
    assert (p[:, :6] == 0).all() and (p[:, 6 + widgets.GAP : 12 + widgets.GAP] == 51).all()
    assert (p[:, -6:] == round(0.2 * widgets.DIFF_GAIN * 255)).all()


# ---- Averager -----------------------------------------------------------------------------------
def test_averager_applies_the_exact_weighted_average_and_saves_safely(backend, tiny_pair_loras, sweeps, tmp_path):
    lora2 = tiny_pair_loras[0].lora2
    half, flipped = scaled(lora2, 0.5), scaled(lora2, -1.0)
    w = widgets.Averager(backend, {"pair": lora2, "half": half, "flipped": flipped}, seeds=[0], sample_cfg=FAST,
                         path=str(tmp_path / "avg.safetensors"))

    w.save_button.click()  # before Apply: an error in the widget, nothing written
    assert "Apply" in w.status.value and not (tmp_path / "avg.safetensors").exists()

    for box in w.checkboxes:
        box.value = False
    w.apply_button.click()
    assert "tick at least one" in w.status.value and w.result is None

    w.checkboxes[0].value = w.checkboxes[1].value = True
    w.weights[0].value, w.weights[1].value = 1.0, 3.0  # normalised: 0.25, 0.75
    w.apply_button.click()
    assert w.result is not None, w.status.value
    assert len(sweeps) == 1, "Apply samples s = 0 and 1 in one sweep"
    want = {n: 0.625 * d for n, d in lora.module_deltas(lora2).items()}  # 0.25 * 1 + 0.75 * 0.5
    assert_same_deltas(lora.module_deltas(w.result), want)
    assert_same_deltas(lora.module_deltas(w.result), lora.module_deltas(average.exact_average([lora2, half], [0.25, 0.75])))
    assert set(w.scores) >= {"score_at_0", "score_at_1", "effect", "effect_std", "relative_spread", "content_kept"}
    assert w.scores["score_at_1"] - w.scores["score_at_0"] == pytest.approx(w.scores["effect"])
    assert decode(w.image.value).shape[0] == 2 * 32 * 4 + widgets.GAP  # 2 prompts x 1 seed

    w.normalise.value = False  # raw weights: 1 * d + 3 * 0.5 d
    w.apply_button.click()
    assert_same_deltas(lora.module_deltas(w.result), {n: 2.5 * d for n, d in lora.module_deltas(lora2).items()})

    path = tmp_path / "avg.safetensors"
    w.save_button.click()
    assert path.is_file(), w.status.value
    assert_same_deltas(lora.module_deltas(lora.load(path)), lora.module_deltas(w.result))
    saved = path.read_bytes()

    w.normalise.value = True
    w.apply_button.click()  # a different average, then save again without "overwrite"
    w.save_button.click()
    assert "already exists" in w.status.value and path.read_bytes() == saved
    w.overwrite.value = True
    w.save_button.click()
    assert path.read_bytes() != saved
    assert_same_deltas(lora.module_deltas(lora.load(path)), want)

    w.path.value = str(tmp_path / "avg.pt")
    w.save_button.click()
    assert ".safetensors" in w.status.value and not (tmp_path / "avg.pt").exists()


# ---- plots --------------------------------------------------------------------------------------
def fake_effect(slope: float) -> dict:
    s = [-1.0, 0.0, 1.0, 2.0]
    return {"strengths": s, "score_mean": [0.2 + slope * x for x in s], "score_std": [0.1] * 4,
            "effect_mean": [slope * x for x in s], "effect_std": [0.1] * 4,
            "content_kept": [0.75, 1.0, 1.0, 0.5], "content_right": [0.75, 0.75, 0.75, 0.5]}


def test_effect_curves_has_a_line_and_band_per_lora():
    fig = plots.effect_curves({"single pair": fake_effect(0.3), "average of 3": fake_effect(0.4)}, axis="detail")
    score_ax, kept_ax = fig.axes
    for ax in (score_ax, kept_ax):
        assert len(ax.get_lines()) == 2
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["single pair", "average of 3"]
        assert ax.get_xlabel() == "strength s" and ax.get_title()
    assert len(score_ax.collections) == 2  # the +-std bands
    np.testing.assert_allclose(score_ax.get_lines()[1].get_ydata(), fake_effect(0.4)["score_mean"])
    np.testing.assert_allclose(kept_ax.get_lines()[0].get_ydata(), [75, 100, 100, 50])
    plots.plt.close(fig)


def test_loss_figure_still_works():
    fig = plots.loss_figure({"step 1": list(np.linspace(1, 0.1, 40)), "step 2": list(np.linspace(0.5, 0.05, 40))})
    assert len(fig.axes[0].get_lines()) == 4  # raw + smoothed per curve
    plots.plt.close(fig)
