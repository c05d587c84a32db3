"""Pictures: labelled image grids and loss curves (matplotlib, Agg when headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget", "ipympl"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

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
