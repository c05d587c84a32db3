"""Where the project's shipped data lives (importing this costs nothing)."""

from pathlib import Path

DATA_SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
TOY_BASE = DATA_SAMPLES / "toy_base"  # the pretrained toy model: `--base toy`
