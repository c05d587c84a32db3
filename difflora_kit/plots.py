"""Pictures: labelled image grids, loss and strength-effect curves (matplotlib, Agg when headless), PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget", "ipympl"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from .files import atomic_file


def grid_figure(images: np.ndarray, row_labels=None, col_labels=None, title: str | None = None, cell: float = 1.0):
    """images: [R, C, H, W, 3] in [0, 1] -> a matplotlib Figure."""
    R, C = images.shape[:2]
    fig, axes = plt.subplots(R, C, figsize=(cell * C + 1.4, cell * R + 0.6), squeeze=False)
    for r in range(R):
        for c in range(C):
            ax = axes[r][c]
            ax.imshow(np.clip(images[r, c], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_labels is not None:
                ax.set_title(str(col_labels[c]), fontsize=8)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    """Write a figure atomically as PNG and close it."""
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_grid(images: np.ndarray, path: Path, row_labels=None, col_labels=None, title: str | None = None) -> None:
    save_figure(grid_figure(images, row_labels, col_labels, title), path)


def loss_figure(curves: dict[str, list[float]], title: str = "training loss"):
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, losses in curves.items():
        x = np.arange(1, len(losses) + 1)
        ax.plot(x, losses, alpha=0.3)
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1 :], smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def effect_curves(effects: dict[str, dict], axis: str = "detail", title: str | None = None):
    """The judge's view of base + s * LoRA for several LoRAs: style score and content kept against s.

    effects: {label: evaluate.strength_effect(...) dict}. Left: the `axis` score, mean over
    prompts x seeds with a +-1 std band (the spread). Right: the share of samples whose content
    (shape and colours) is the same as at s = 0. One line per LoRA on each side.
    """
    fig, (score_ax, kept_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, (label, e) in enumerate(effects.items()):
        colour = f"C{i}"
        s = np.asarray(e["strengths"], dtype=float)
        mean, std = np.asarray(e["score_mean"]), np.asarray(e["score_std"])
        score_ax.plot(s, mean, "o-", color=colour, label=label)
        score_ax.fill_between(s, mean - std, mean + std, color=colour, alpha=0.2)
        kept_ax.plot(s, 100 * np.asarray(e["content_kept"]), "o-", color=colour, label=label)
    score_ax.set(xlabel="strength s", ylabel=f"{axis} score (0 = image 1's end, 1 = image 2's)",
                 title=f"{axis} score (band: +-1 std over prompts x seeds)")
    kept_ax.set(xlabel="strength s", ylabel="content kept (%)", ylim=(-5, 105),
                title="content kept (same shape and colours as s = 0)")
    for ax in (score_ax, kept_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"base + s * LoRA 2, judged on the {axis} axis", fontsize=10)
    fig.tight_layout()
    return fig


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [0, 1] -> uint8 (rounded as images.save_png does)."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an [H, W, C] image: every pixel becomes a factor x factor block."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of an [H, W, 3] image (uint8, or floats in [0, 1])."""
    image = image if image.dtype == np.uint8 else to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
