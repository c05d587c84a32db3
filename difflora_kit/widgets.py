"""Notebook widgets (ipywidgets 8): a strength slider over a precomputed sweep, and an averager of LoRA 2s.

    StrengthSlider  base (s = 0) | base + s * LoRA 2 | |difference|, one row per seed; the whole
                    sweep is sampled in ONE batched pass, so dragging only swaps PNG bytes.
    Averager        tick LoRA 2s, give weights, Apply: the exact delta-W average, sampled at s = 0 and 1
                    and judged (score change, content kept, spread); Save writes it as a LoRA file.

Both work headless (tests set `.value` and call `.click()`; observers fire synchronously) and
never raise into the notebook from a button: errors appear in the widget's `status` line.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W
import numpy as np

from . import average, evaluate, lora as lora_io, plots, sample
from .config import SampleConfig
from .lora import LoraFile, LoraMismatchError, check_fits
from .toy import judge, world

SCALE = 6  # the toy's 32x32 images are shown 6x larger (nearest neighbour)
GAP = 4  # white pixels between panels and between rows
DIFF_GAIN = 3.0  # |difference| is amplified this much
COLUMNS = f"columns: base (s = 0) · base + s·LoRA 2 · |difference| ×{DIFF_GAIN:g}"


# ---- pure helpers -------------------------------------------------------------------------------
def _panel(base: np.ndarray, image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """base | image | amplified |image - base|, upscaled: uint8 [H*scale, 3*W*scale + 2*GAP, 3]."""
    diff = np.abs(image - base) * DIFF_GAIN
    tiles = [plots.upscale(plots.to_uint8(x), scale) for x in (base, image, diff)]
    gap = np.full((tiles[0].shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


def _sheet(images: np.ndarray, zero: int, k: int, scale: int = SCALE) -> np.ndarray:
    """One _panel row per seed for strength index k of images [S, K, H, W, 3]: uint8."""
    rows = [_panel(per_seed[zero], per_seed[k], scale) for per_seed in images]
    gap = np.full((GAP, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)


def _is_toy(backend) -> bool:
    """True when the toy world's judge reads the backend's images."""
    return backend.family.toy_world


def _describe(r: judge.Reading, base: judge.Reading | None = None) -> str:
    """'detail 0.83 · vivid 0.97 · red circle on blue (content kept)'."""
    text = " · ".join(f"{a} {r.score(a):.2f}" for a in world.AXES) + f" · {r.foreground} {r.shape} on {r.background}"
    if base is not None:
        kept = (r.shape, r.foreground, r.background) == (base.shape, base.foreground, base.background)
        text += " (content kept)" if kept else " (content changed)"
    return text


def _error(message) -> str:
    """An error (message or exception) as red HTML for a status line."""
    return f"<span style='color:#b00'>{html.escape(str(message))}</span>"


class _Displayed:
    """Displays as its `.widget` (a notebook cell ending in the object shows the widget)."""

    widget: W.Widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# ---- the strength slider ------------------------------------------------------------------------
class StrengthSlider(_Displayed):
    """base + s * LoRA for a prompt and seeds, at precomputed strengths s chosen by a slider.

    `.images` is the sweep [seeds, strengths, H, W, 3]; `.slider` only swaps `.image`'s PNG bytes.
    A new prompt or seed renders a new sweep only on "Render" (text boxes don't update per key).
    """

    def __init__(self, backend, lora: LoraFile, prompt: str = "a red circle on a blue background",
                 seeds=(0,), strengths=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0),
                 sample_cfg: SampleConfig | None = None, scale: int = SCALE):
        self.strengths, seeds = [float(s) for s in strengths], [int(s) for s in seeds]
        if not seeds:
            raise ValueError("give at least one seed")
        if 0.0 not in self.strengths:
            raise ValueError("strengths must include 0: the base image every strength is compared to")
        self.backend, self.lora, self.scale = backend, lora, scale
        self.sample_cfg = sample_cfg or backend.family.sample_config()
        self.zero = self.strengths.index(0.0)

        self.slider = W.SelectionSlider(options=[(f"{s:g}", s) for s in self.strengths],
                                        value=1.0 if 1.0 in self.strengths else 0.0,
                                        description="strength", continuous_update=True)
        self.image = W.Image(format="png")
        self.readings = W.HTML()
        self.prompt_box = W.Text(value=prompt, description="prompt", continuous_update=False,
                                 layout=W.Layout(width="28em"))
        self.seed_box = W.IntText(value=seeds[0], description="first seed", continuous_update=False,
                                  layout=W.Layout(width="12em"))
        self.render_button = W.Button(description="Render", tooltip="sample this prompt at every strength (one batch)")
        self.status = W.HTML()
        self.widget = W.VBox([self.slider, self.image, W.HTML(f"<small>{COLUMNS}; one row per seed</small>"),
                              self.readings, W.HBox([self.prompt_box, self.seed_box, self.render_button]), self.status])

        self.slider.observe(lambda _: self._show(), names="value")
        self.render_button.on_click(lambda _: self.render())
        self._compute(prompt, seeds)

    @property
    def current_strength(self) -> float:
        return float(self.slider.value)

    def render(self) -> None:
        """Sample the prompt box's prompt, seeds "first seed" onward (as many as before), in one sweep.

        Errors go to `.status`; the last sweep stays shown.
        """
        prompt = self.prompt_box.value.strip()
        if not prompt:
            self.status.value = _error("the prompt is empty: describe a scene, e.g. 'a green cross on a white background'")
            return
        seeds = [self.seed_box.value + i for i in range(len(self.seeds))]
        self.render_button.disabled, self.status.value = True, "rendering…"
        try:
            self._compute(prompt, seeds)
            self.status.value = ""
        except Exception as e:  # shown, not raised: the notebook keeps the last sweep
            self.status.value = _error(e)
        finally:
            self.render_button.disabled = False

    def _compute(self, prompt: str, seeds: list[int]) -> None:
        images = sample.sweep(self.backend, self.lora, [prompt], seeds, self.strengths, self.sample_cfg)[0]
        self.prompt, self.seeds, self.images = prompt, seeds, images  # images: (S, K, H, W, 3)
        self._readings = [[judge.read(im) for im in row] for row in images] if _is_toy(self.backend) else None
        self._show()

    def _show(self) -> None:
        k = self.strengths.index(self.current_strength)
        self.image.value = plots.png_bytes(_sheet(self.images, self.zero, k, self.scale))
        if self._readings is not None:
            lines = [f"seed {seed}: {_describe(row[k], row[self.zero])}" for seed, row in zip(self.seeds, self._readings)]
            self.readings.value = f"<small>judge at s = {self.current_strength:g}:<br>" + "<br>".join(lines) + "</small>"


# ---- the averager -------------------------------------------------------------------------------
def _verdict_html(line: str) -> str:
    """A member's health verdict: green when it transfers, red for a dud, nothing when unknown."""
    if not line:
        return ""
    from .health import TRANSFERS

    colour = "#070" if line.startswith(TRANSFERS) else "#b00"
    return f'<span style="color:{colour}">{html.escape(line)}</span>'


class Averager(_Displayed):
    """Pick LoRA 2s and weights, Apply: their exact delta-W average, sampled and judged; Save writes it.

    loras: {name: LoraFile} (or a list, named "LoRA 1", ...). Apply samples base + s * average at
    s = 0 and 1 for `scenes` x `seeds` in one batched sweep (evaluate.strength_effect).
    Beside each member: its health verdict (difflora_kit.health) from the LoRA's metadata
    (`health_verdict`, stamped after step 2); a dud is shown in red.
    """

    def __init__(self, backend, loras: dict[str, LoraFile] | list[LoraFile], scenes: list[world.Scene] | None = None,
                 seeds=(0, 1), axis: str = "detail", sample_cfg: SampleConfig | None = None,
                 path: str = "average.safetensors", scale: int = 4):
        self.loras = dict(loras) if isinstance(loras, dict) else {f"LoRA {i}": l for i, l in enumerate(loras, 1)}
        if not self.loras:
            raise ValueError("give at least one LoRA to average")
        for name, member in self.loras.items():  # refused now, not at the first Apply (lora.check_fits)
            try:
                check_fits(backend.unet, member)
            except LoraMismatchError as e:
                raise LoraMismatchError(f"{name}: {e}") from None
        self.backend, self.axis, self.scale = backend, axis, scale
        self.scenes = scenes or evaluate.other_prompts(2)
        self.seeds = [int(s) for s in seeds]
        self.sample_cfg = sample_cfg or backend.family.sample_config()
        self.base_images = sample.BaseImages(backend)  # s = 0 is the same for every average: sampled once
        self.result: LoraFile | None = None
        self.scores: dict = {}
        self.effect: dict | None = None

        self.checkboxes = [W.Checkbox(value=True, description=name, indent=False) for name in self.loras]
        self.verdicts = {name: l.meta.get("health_verdict", "") for name, l in self.loras.items()}
        self.verdict_labels = [W.HTML(_verdict_html(self.verdicts[name])) for name in self.loras]
        self.weights = [W.FloatText(value=1.0, description="weight", continuous_update=False, layout=W.Layout(width="12em"))
                        for _ in self.loras]
        self.normalise = W.Checkbox(value=True, description="normalise weights to sum 1", indent=False)
        self.apply_button = W.Button(description="Apply", tooltip="average the ticked LoRAs, sample and judge")
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.path = W.Text(value=str(path), description="save to", continuous_update=False, layout=W.Layout(width="28em"))
        self.overwrite = W.Checkbox(value=False, description="overwrite", indent=False)
        self.save_button = W.Button(description="Save")
        self.status = W.HTML()
        rows = [W.HBox([c, w, v]) for c, w, v in zip(self.checkboxes, self.weights, self.verdict_labels)]
        self.widget = W.VBox([*rows, W.HBox([self.normalise, self.apply_button]), self.image,
                              W.HTML(f"<small>{COLUMNS}; one row per prompt x seed, s = 1</small>"), self.table,
                              W.HBox([self.path, self.overwrite, self.save_button]), self.status])
        self.apply_button.on_click(lambda _: self.apply())
        self.save_button.on_click(lambda _: self.save())

    def selection(self) -> tuple[list[LoraFile], list[float]]:
        """The ticked LoRAs and their weights (normalised to sum 1 when `normalise` is ticked)."""
        picked = [(l, w.value) for l, c, w in zip(self.loras.values(), self.checkboxes, self.weights) if c.value]
        if not picked:
            raise ValueError("tick at least one LoRA to average")
        loras, weights = [l for l, _ in picked], [float(w) for _, w in picked]
        if self.normalise.value:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise ValueError("the ticked weights sum to 0: cannot normalise them (untick 'normalise' or change a weight)")
            weights = [w / total for w in weights]
        return loras, weights

    def apply(self) -> None:
        """Average, sample at s = 0 and 1 in one sweep, judge; errors go to .status."""
        self.apply_button.disabled, self.status.value = True, "averaging and sampling…"
        try:
            loras, weights = self.selection()
            result = average.exact_average(loras, weights)
            if _is_toy(self.backend):
                effect = evaluate.strength_effect(self.backend, result, self.scenes, self.seeds, (0.0, 1.0),
                                                  self.axis, self.sample_cfg, self.base_images)
                images, scores = effect["images"], self._scores(effect)
            else:
                effect, scores = None, {}
                images = sample.sweep(self.backend, result, [s.caption for s in self.scenes], self.seeds,
                                      [0.0, 1.0], self.sample_cfg, base_images=self.base_images)
            self.result, self.effect, self.scores = result, effect, scores
            self.image.value = plots.png_bytes(_sheet(images.reshape(-1, *images.shape[2:]), 0, 1, self.scale))
            self.table.value = self._table(weights)
            self.status.value = f"averaged {len(loras)} LoRA(s), rank {result.rank}"
        except Exception as e:
            self.status.value = _error(e)
        finally:
            self.apply_button.disabled = False

    def _scores(self, effect: dict) -> dict:
        spread = evaluate.spread_at(effect, 1.0)
        return {"axis": self.axis, "score_at_0": effect["score_mean"][0], "score_at_1": spread["score_mean"],
                "effect": spread["mean"], "effect_std": spread["std"], "relative_spread": spread["relative"],
                "content_kept": effect["content_kept"][1], "content_right": effect["content_right"][1]}

    def _table(self, weights: list[float]) -> str:
        s = self.scores
        rows = [("weights", ", ".join(f"{w:.3g}" for w in weights))]
        if s:
            rows += [(f"{s['axis']} score, s = 0 → 1", f"{s['score_at_0']:.2f} → {s['score_at_1']:.2f}"),
                     ("change (± std over prompts × seeds)", f"{s['effect']:+.2f} ± {s['effect_std']:.2f} "
                                                            f"(relative spread {s['relative_spread']:.2f})"),
                     ("content kept at s = 1", f"{s['content_kept']:.0%}"),
                     ("content right at s = 1", f"{s['content_right']:.0%}")]
        return "<table>" + "".join(f"<tr><td>{html.escape(a)}</td><td><b>{html.escape(b)}</b></td></tr>"
                                   for a, b in rows) + "</table>"

    def save(self) -> None:
        """Write the last average to the path box (never over an existing file unless 'overwrite' is ticked)."""
        try:
            path = Path(self.path.value.strip()).expanduser()
            if self.result is None:
                raise ValueError("nothing to save yet: press Apply first")
            if path.suffix != ".safetensors":
                raise ValueError(f"{path}: give a .safetensors file name (the only LoRA format the kit reads)")
            targets = [path, *([lora_io.kohya_path(path)] if lora_io.needs_kohya_copy(self.result) else [])]
            there = [p for p in targets if p.exists()]
            if there and not self.overwrite.value:
                raise FileExistsError(f"{there[0]} already exists: tick 'overwrite' or choose another name")
            written = lora_io.save_files(path, self.result)  # SD 1.x / SDXL: its kohya copy beside it
            self.status.value = "saved " + " and ".join(html.escape(str(p)) for p in written)
        except Exception as e:
            self.status.value = _error(e)
