"""Shared by the benchmark scripts: where they ran and how results are written down."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no GPU measured)",
        "torch": torch.__version__, "python": platform.python_version(),
    }


def write_result(name: str, result: dict, table: str) -> Path:
    """bench/results/<name>.json (all numbers) and <name>.md (the table), with the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, **result}, indent=1, default=str) + "\n")
    header = f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, torch {info['torch']}, GPU: {info['cuda']}).\n\n"
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    return RESULTS / f"{name}.md"
