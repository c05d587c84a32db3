"""Image pairs for differential LoRA, written by the kit: the same scene at both ends of an axis.

    data_samples/pairs/metadata.jsonl   {"image1": ..., "image2": ..., "prompt": ..., "axis": ...}
    data_samples/pairs/<axis>/<nnn>_1.png, <nnn>_2.png

Image 1 is the axis' low end (plain / dull), image 2 its high end (detailed / vivid); the other
axis is the same in both images and varies across pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..files import atomic_directory, check_writable
from ..images import save_png
from . import world


def make_pairs(out: Path, per_axis: int = 24, seed: int = 0, force: bool = False) -> Path:
    """Write `per_axis` pairs for every style axis under `out`, atomically; returns the metadata path."""
    out = Path(out)
    check_writable(out, force)
    rng = random.Random(seed)
    with atomic_directory(out) as tmp:
        rows = []
        for axis in world.AXES:
            for i in range(per_axis):
                scene = world.random_scene(rng)
                style1, style2 = world.paired_styles(axis, other=rng.randint(0, 1))
                names = (f"{axis}/{i:03d}_1.png", f"{axis}/{i:03d}_2.png")
                save_png(world.render(scene, style1), tmp / names[0])
                save_png(world.render(scene, style2), tmp / names[1])
                rows.append({"image1": names[0], "image2": names[1], "prompt": scene.caption, "axis": axis})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "metadata.jsonl"


def read_pairs(metadata: Path) -> list[dict]:
    """Rows of a pairs metadata file, with image paths made absolute."""
    metadata = Path(metadata)
    if not metadata.is_file():
        raise FileNotFoundError(f"pairs metadata {metadata} does not exist; make one with `difflora make-pairs`")
    rows = []
    for n, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"image1", "image2", "prompt"} - set(row)
        if missing:
            raise ValueError(f"{metadata}:{n}: missing field(s) {sorted(missing)}")
        row["image1"] = str(metadata.parent / row["image1"])
        row["image2"] = str(metadata.parent / row["image2"])
        rows.append(row)
    return rows
