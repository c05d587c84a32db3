"""The judge: reads a toy image back into its scene and style scores.

This is the toy world's CLIP score. Because scenes are procedural, a generated image can be
read exactly: background = the border's median colour, shape/size/position = the world's template that
best explains the (blurred) image as a filled shape on that background, foreground colour = the mask's median colour
(stripes are one dark and one light row in four, so the median is the fill), and each style
axis is scored on [0, 1]-ish by comparing a statistic to the same statistic of reference
renders of the scene that was read (0 = the axis' low end, 1 = its high end; beyond 1 is
"more than the training data", below 0 "less").

    detail statistic: amplitude of the period-4 luma wave across rows inside the shape
    vivid statistic:  chroma (max - min channel) of the foreground's median colour

It also reads the incidental factors of a realistic pair (world.Incidental) as continuous numbers,
so that what a LoRA changes besides its axis (its leakage) is measured in pixels and RGB levels:

    cx, cy  centroid of the foreground near the matched template, pixels
    half    half-extent: the template's, times sqrt(foreground area / template area), pixels
    fg_luma, bg_luma   median luma of the foreground's fill rows (never a stripe row, so the detail
            style does not move it) and of the border, RGB levels 0-255
    grain   std of per-channel grain from the border's high-pass luma residual (robust MAD), RGB levels
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from . import world

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
FOREGROUND_DISTANCE = 0.15  # RGB distance from the background colour that counts as foreground


@dataclasses.dataclass(frozen=True)
class Reading:
    shape: str
    foreground: str
    background: str
    size: str
    dx: int
    dy: int
    fit: float  # share of the image's difference from the background the template explains
    detail: float  # 0 plain .. 1 detailed
    vivid: float  # 0 dull .. 1 vivid
    cx: float = 0.0  # foreground centroid, pixels
    cy: float = 0.0
    half: float = 0.0  # half-extent, pixels
    fg_luma: float = 0.0  # RGB levels 0-255
    bg_luma: float = 0.0
    grain: float = 0.0  # RGB levels

    @property
    def scene(self) -> world.Scene:
        return world.Scene(self.shape, self.foreground, self.background, self.size, self.dx, self.dy)

    def score(self, axis: str) -> float:
        return float(getattr(self, axis))

    def content_right(self, shape: str, foreground: str, background: str) -> bool:
        """Does the image show the prompted shape and colours?"""
        return (self.shape, self.foreground, self.background) == (shape, foreground, background)

    def same_scene(self, other: "Reading") -> bool:
        """Same content and layout and the same end of both style axes."""
        return self.scene == other.scene and all(
            (self.score(a) > 0.5) == (other.score(a) > 0.5) for a in world.AXES
        )


@functools.lru_cache(maxsize=None)
def _templates(res: int) -> tuple[list[tuple[str, str, int, int]], np.ndarray, np.ndarray]:
    keys, masks = [], []
    for shape, size, dx, dy in itertools.product(world.SHAPES, world.SIZES, world.OFFSETS, world.OFFSETS):
        keys.append((shape, size, dx, dy))
        masks.append(world.shape_mask(shape, world.SIZES[size], res / 2 + dx, res / 2 + dy, res))
    masks = np.stack(masks)  # (T, res, res)
    blurred = np.stack([_box_blur(m[..., None].astype(np.float32))[..., 0] for m in masks])
    return keys, masks, blurred.reshape(len(keys), -1)


def _palette(colours: dict[str, tuple[float, float, float]]) -> tuple[list[str], np.ndarray]:
    names, rgbs = [], []
    for name, rgb in colours.items():
        rgb = np.array(rgb, dtype=np.float32)
        names += [name, name]
        rgbs += [rgb, world.dull(rgb)]
    return names, np.stack(rgbs)


def nearest_colour(rgb: np.ndarray, colours: dict) -> str:
    names, rgbs = _palette(colours)
    return names[int(np.argmin(((rgbs - rgb) ** 2).sum(-1)))]


def _border_ring(shape: tuple[int, ...], width: int) -> np.ndarray:
    """Boolean (H, W) mask of the image's outer `width` pixels."""
    ring = np.ones(shape[:2], bool)
    ring[width:-width, width:-width] = False
    return ring


def _border_median(image: np.ndarray, width: int = 2) -> np.ndarray:
    return np.median(image[_border_ring(image.shape, width)], axis=0)


def _box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge padding: [H, W, C] -> [H, W, C]."""
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def detail_statistic(image: np.ndarray, region: np.ndarray) -> float:
    """Amplitude of the stripes' period-4 wave in luma, over the pixels of `region`."""
    if region.sum() < 4:
        return 0.0
    luma = image @ LUMA  # (H, W)
    rows = np.nonzero(region)[0]
    values = luma[region] - luma[region].mean()
    wave = np.exp(-2j * np.pi * rows / world.STRIPE_PERIOD)
    return float(np.abs((values * wave).mean()))


def vivid_statistic(rgb: np.ndarray) -> float:
    return float(rgb.max() - rgb.min())


def _axis_score(measured: float, low: float, high: float) -> float:
    return (measured - low) / max(high - low, 1e-6)


INCIDENTAL_FACTORS = {"shift_x": ("cx", "px"), "shift_y": ("cy", "px"), "size": ("half", "px"),
                      "fg_shade": ("fg_luma", "RGB levels"), "bg_shade": ("bg_luma", "RGB levels"),
                      "grain": ("grain", "RGB levels")}
"""world.Incidental field -> (the Reading field that measures it, its unit)."""
WINDOW = 3  # pixels around the matched template that count for position and size


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def grain_level(image: np.ndarray, width: int = 3) -> float:
    """Std of per-channel pixel grain, RGB levels: a robust (MAD) std of luma minus its 3x3 mean on the
    border ring. The 3x3 residual of white noise keeps 8/9 of its variance; luma keeps |LUMA| of a
    channel's std."""
    luma = image @ LUMA
    residual = luma - _box_blur(luma[..., None])[..., 0]
    r = residual[_border_ring(luma.shape, width)]
    mad = np.median(np.abs(r - np.median(r)))
    return float(1.4826 * mad / np.sqrt(8 / 9) / np.linalg.norm(LUMA) * 255)


def incidental_readings(image: np.ndarray, mask: np.ndarray, template: np.ndarray, half: float,
                        fg_rgb: np.ndarray, bg_rgb: np.ndarray) -> dict[str, float]:
    # mask, template: (H, W) bool; fg_rgb, bg_rgb: (3,)
    """The continuous readings of the incidental factors (see the module docstring)."""
    near = mask & _dilate(template, WINDOW)  # foreground pixels near the template: stray grain left out
    if near.sum() < 4:
        near = template
    ys, xs = np.nonzero(near)
    fill = _erode(near) & (np.arange(image.shape[0])[:, None] % world.STRIPE_PERIOD % 2 == 1)  # rows 1, 3 of 4
    fg_luma = np.median(image[fill] @ LUMA) if fill.sum() >= 4 else fg_rgb @ LUMA
    return {"cx": float(xs.mean() + 0.5), "cy": float(ys.mean() + 0.5),
            "half": float(half * np.sqrt(near.sum() / max(template.sum(), 1))),
            "fg_luma": float(fg_luma * 255), "bg_luma": float(bg_rgb @ LUMA * 255),
            "grain": grain_level(image)}


def read(image: np.ndarray) -> Reading:
    """Read one image, float [H, W, 3] in [0, 1] (uint8 is accepted too)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    image = np.clip(image.astype(np.float32), 0.0, 1.0)
    res = image.shape[0]

    bg_rgb = _border_median(image)
    background = nearest_colour(bg_rgb, world.BACKGROUNDS)
    # Shape, size and position: the template whose blurred mask best explains the blurred map
    # of distances from the background colour (a matched filter: fill, stripes and outline all
    # count as "not background"; sampling grain averages out; the border's own grain is the floor).
    distance = np.linalg.norm(image - bg_rgb, axis=-1)  # (H, W)
    distance = _box_blur(distance[..., None])[..., 0] - _border_median(distance[..., None])[0]
    diff = distance.reshape(-1)  # (HW,)
    keys, templates, blurred = _templates(res)  # blurred: (T, HW)
    fitted = np.maximum(blurred @ diff, 0) ** 2 / (blurred**2).sum(-1)  # (T,) energy explained
    best = int(np.argmax(fitted))
    fit = float(fitted[best] / max((diff**2).sum(), 1e-12))
    mask = np.linalg.norm(image - bg_rgb, axis=-1) > FOREGROUND_DISTANCE
    shape, size, dx, dy = keys[best]
    interior = _erode(templates[best])
    region = interior & mask if (interior & mask).sum() >= 4 else interior

    fg_rgb = np.median(image[region], axis=0)
    foreground = nearest_colour(fg_rgb, {k: v for k, v in world.FOREGROUNDS.items() if k != background})

    # Style scores against reference renders of the scene just read.
    scene = world.Scene(shape, foreground, background, size, dx, dy)
    refs = {(d, v): world.render(scene, world.Style(d, v), res) for d in (0, 1) for v in (0, 1)}
    detail = _axis_score(
        detail_statistic(image, region),
        detail_statistic(refs[0, 1], interior),
        detail_statistic(refs[1, 1], interior),
    )
    vivid = _axis_score(
        vivid_statistic(fg_rgb),
        vivid_statistic(np.median(refs[0, 0][interior], axis=0)),
        vivid_statistic(np.median(refs[0, 1][interior], axis=0)),
    )
    extra = incidental_readings(image, mask, templates[best], world.SIZES[size], fg_rgb, bg_rgb)
    return Reading(shape, foreground, background, size, dx, dy, fit, detail, vivid, **extra)


def read_batch(images) -> list[Reading]:
    """Read a batch: array/tensor [N, H, W, 3] in [0, 1]."""
    return [read(np.asarray(im)) for im in images]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two [0, 1] images."""
    mse = float(((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2).mean())
    return 10.0 * np.log10(1.0 / max(mse, 1e-10))
