"""The toy world: procedural scenes with captions, rendered in paired styles.

A scene is content (shape, foreground colour, background colour, size, position) plus a style
(detail: plain or striped-with-outline; vivid: dull or vivid). The caption names only the
content ("a red circle on a blue background"), so a model pretrained on all styles has both
ends of every style axis in distribution. Rendering is exact and cheap, so the judge
(`judge.py`) can read an image back.

    content ----render(style=(detail, vivid), incidental)----> image [H, W, 3] float32 in [0, 1]

`Incidental` holds what a real before/after pair also changes besides the style (a shift of a
pixel or two, a size change, other shades, grain): the realistic pairs (`pairs.py`) draw it at
random per pair, and the judge reads each factor back as a continuous number.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle", "cross")
FOREGROUNDS = {
    "red": (0.90, 0.12, 0.10),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.12, 0.25, 0.95),
    "purple": (0.60, 0.15, 0.85),
}
BACKGROUNDS = {
    "black": (0.03, 0.03, 0.03),
    "white": (0.97, 0.97, 0.97),
    "grey": (0.50, 0.50, 0.50),
    "blue": (0.12, 0.25, 0.95),
}
SIZES = {"small": 7, "large": 10}  # half-extent in pixels
OFFSETS = (-4, 0, 4)  # centre offset from the middle, pixels, on each axis
AXES = ("detail", "vivid")

DULL_KEEP = 0.35  # dull style keeps this fraction of each colour's chroma
STRIPE_PERIOD = 4  # detailed style: horizontal stripes, one dark and one light row in 4
DARK, LIGHT = 0.45, 0.45  # stripe/outline darkening, light-row blend toward white


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    foreground: str
    background: str
    size: str = "large"
    dx: int = 0
    dy: int = 0

    @property
    def caption(self) -> str:
        article = "an" if self.foreground[0] in "aeiou" else "a"
        return f"{article} {self.foreground} {self.shape} on a {self.background} background"


@dataclasses.dataclass(frozen=True)
class Style:
    detail: int = 0  # 0 plain, 1 detailed (stripes + outline)
    vivid: int = 1  # 0 dull, 1 vivid

    def with_axis(self, axis: str, value: int) -> "Style":
        return dataclasses.replace(self, **{axis: value})


def all_captions() -> list[tuple[str, str, str]]:
    """Every (shape, foreground, background) the world can caption (foreground != background)."""
    return [(s, f, b) for s, f, b in itertools.product(SHAPES, FOREGROUNDS, BACKGROUNDS) if f != b]


def held_out_captions() -> list[tuple[str, str, str]]:
    """Twelve captions never shown in pretraining: the base model's generalisation test."""
    combos = all_captions()
    return random.Random(1234).sample(combos, 12)


def training_captions() -> list[tuple[str, str, str]]:
    held = set(held_out_captions())
    return [c for c in all_captions() if c not in held]


@dataclasses.dataclass(frozen=True)
class Incidental:
    """Changes that are not the style: zero for the clean world, drawn per pair for realistic pairs."""

    shift_x: float = 0.0
    """Sub-template shift of the shape's centre, pixels (positive: right)."""
    shift_y: float = 0.0
    """The same, downward."""
    size: float = 0.0
    """Change of the shape's half-extent, pixels."""
    fg_shade: float = 0.0
    """Added to every channel of the foreground colour (RGB in [0, 1]; luma moves by the same)."""
    bg_shade: float = 0.0
    """The same for the background colour."""
    grain: float = 0.0
    """Std of Gaussian grain added to every pixel (RGB in [0, 1]); 0 = none."""
    grain_seed: int = 0
    """Seed of that grain."""


NO_INCIDENTAL = Incidental()


def random_scene(rng: random.Random, captions: list[tuple[str, str, str]] | None = None) -> Scene:
    shape, fg, bg = rng.choice(captions or all_captions())
    return Scene(shape, fg, bg, rng.choice(list(SIZES)), rng.choice(OFFSETS), rng.choice(OFFSETS))


def shape_mask(shape: str, half: int, cx: float, cy: float, res: int = RESOLUTION) -> np.ndarray:
    """Boolean [res, res] mask of one shape centred at (cx, cy) with half-extent `half`."""
    y, x = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    u, v = x - cx, y - cy
    if shape == "circle":
        return u * u + v * v <= half * half
    if shape == "square":
        h = half * 0.85
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "triangle":  # apex up, base at the bottom
        top, bottom = -half, half * 0.8
        inside_y = (v >= top) & (v <= bottom)
        width = (v - top) / (bottom - top) * half
        return inside_y & (np.abs(u) <= width)
    if shape == "cross":
        arm = half * 0.38
        return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(v) <= arm) & (np.abs(u) <= half))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def scene_mask(scene: Scene, res: int = RESOLUTION, incidental: Incidental = NO_INCIDENTAL) -> np.ndarray:
    return shape_mask(scene.shape, SIZES[scene.size] + incidental.size, res / 2 + scene.dx + incidental.shift_x,
                      res / 2 + scene.dy + incidental.shift_y, res)


def dull(rgb: np.ndarray) -> np.ndarray:
    """Pull a colour toward its own grey (luma) level, keeping DULL_KEEP of its chroma."""
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return luma[..., None] + DULL_KEEP * (rgb - luma[..., None])


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def render(scene: Scene, style: Style = Style(), res: int = RESOLUTION,
           incidental: Incidental = NO_INCIDENTAL) -> np.ndarray:
    """Draw a scene: float32 [res, res, 3] in [0, 1]."""
    fg = np.clip(np.array(FOREGROUNDS[scene.foreground], dtype=np.float32) + incidental.fg_shade, 0.0, 1.0)
    bg = np.clip(np.array(BACKGROUNDS[scene.background], dtype=np.float32) + incidental.bg_shade, 0.0, 1.0)
    image = np.broadcast_to(bg, (res, res, 3)).copy()
    mask = scene_mask(scene, res, incidental)
    image[mask] = fg
    if style.detail:
        rows = np.arange(res)[:, None] % STRIPE_PERIOD
        dark = mask & (rows == 0)
        light = mask & (rows == 2)
        image[dark] = fg * DARK
        image[light] = fg + LIGHT * (1.0 - fg)
        image[_outline(mask)] = fg * DARK
    if not style.vivid:
        image = dull(image)
    if incidental.grain > 0:
        image = image + np.random.default_rng(incidental.grain_seed).normal(0.0, incidental.grain, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def paired_styles(axis: str, other: int = 1) -> tuple[Style, Style]:
    """(image 1 style, image 2 style) for a pair along `axis`: low end -> high end."""
    if axis not in AXES:
        raise ValueError(f"unknown style axis {axis!r}; known: {AXES}")
    base = Style(detail=other, vivid=other)
    return base.with_axis(axis, 0), base.with_axis(axis, 1)
