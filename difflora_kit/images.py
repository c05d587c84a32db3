"""Reading training images: anything PIL opens, converted to RGB float [H, W, 3] in [0, 1]."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageInputError(ValueError):
    pass


def load_image(path: Path, size: int | None = None, resize: bool = False) -> np.ndarray:
    """Open `path` as RGB float32 [H, W, 3] in [0, 1].

    RGBA, LA, P, grayscale, 16-bit and CMYK images are converted to RGB (with a warning that
    says so). With `size`, an image of another size is an error unless `resize` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rgb = _to_rgb(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ImageInputError(f"cannot read {path} as an image ({e}); give a PNG or JPEG file") from e
    if mode != "RGB":
        warnings.warn(f"{path.name}: converted {mode} image to RGB", stacklevel=2)
    if size is not None and rgb.size != (size, size):
        if not resize:
            raise ImageInputError(
                f"{path} is {rgb.size[0]}x{rgb.size[1]} but the model draws {size}x{size}; "
                f"pass --resize to resize it, or give a {size}x{size} image"
            )
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8-bit first
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if a.max() > 255 or im.mode.startswith("I;16") else 255.0
        im = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)  # transparent pixels become white
    return im.convert("RGB")


def check_pair(image1: np.ndarray, image2: np.ndarray) -> None:
    if image1.shape != image2.shape:
        raise ImageInputError(
            f"the pair has different sizes ({image1.shape[1]}x{image1.shape[0]} vs {image2.shape[1]}x{image2.shape[0]}); "
            "pass --resize to bring both to the model's size"
        )


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()[:16]


def save_png(image: np.ndarray, path: Path) -> None:
    from .files import atomic_file

    with atomic_file(Path(path)) as tmp:
        Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(tmp, format="PNG")
