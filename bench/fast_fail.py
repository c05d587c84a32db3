"""How fast a bad input that needs no training fails: each as a fresh `difflora` subprocess, as a
user runs it, wall time from start to exit (imports included). Target: at most 2 s each.

    python bench/fast_fail.py [--repeat 3]

Writes bench/results/fast_fail.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = sorted((ROOT / "data_samples" / "pairs").rglob("*.png"))[:2]


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """(what is wrong, the command's arguments)."""
    not_image = tmp / "notes.png"
    not_image.write_text("not an image")
    pickle = tmp / "lora.pt"
    pickle.write_bytes(b"\x80\x04")
    existing = tmp / "grid.png"
    existing.write_bytes(b"")
    return [
        ("pair: image 1 missing", ["pair", "missing.png", str(PAIR[1]), "--prompt", "a", "--out", str(tmp / "p")]),
        ("pair: image 2 not an image", ["pair", str(PAIR[0]), str(not_image), "--prompt", "a", "--out", str(tmp / "p")]),
        ("train: preset LoRA is a pickle", ["train", str(PAIR[0]), "--prompt", "a", "--out", str(tmp / "l.safetensors"),
                                            "--preset-lora", str(pickle)]),
        ("sample: LoRA file missing", ["sample", "--lora", str(tmp / "none.safetensors"), "--prompt", "a",
                                       "--out", str(tmp / "g.png")]),
        ("sample: output exists", ["sample", "--prompt", "a", "--out", str(existing)]),
        ("average: member missing", ["average", str(tmp / "a.safetensors"), "--out", str(tmp / "avg.safetensors")]),
        ("pairs: metadata missing", ["pairs", str(tmp / "none.jsonl"), "--out", str(tmp / "many")]),
        ("train: bad flag value", ["train", str(PAIR[0]), "--prompt", "a", "--out", str(tmp / "l.safetensors"),
                                   "--rank", "eight"]),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in cases(Path(tmp)):
            seconds, code, err = [], None, ""
            for _ in range(args.repeat):
                started = time.perf_counter()
                run = subprocess.run([sys.executable, "-m", "difflora_kit.cli", *command], capture_output=True, text=True,
                                     cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
                seconds.append(time.perf_counter() - started)
                code, err = run.returncode, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
            rows.append({"case": name, "exit": code, "median_s": sorted(seconds)[len(seconds) // 2], "max_s": max(seconds),
                         "message": err[:140]})
            print(f"{name:34s} exit {code}  {rows[-1]['median_s']:.2f} s  {err[:90]}", flush=True)
    table = "| bad input | exit | median s | max s | message |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {r['case']} | {r['exit']} | {r['median_s']:.2f} | {r['max_s']:.2f} | {r['message'].replace('|', '/')} |" for r in rows)
    table += f"\n\nTarget: each at most 2 s ({sum(r['max_s'] <= 2 for r in rows)} of {len(rows)} met; {args.repeat} runs each, one torch thread)."
    print(f"wrote {write_result('fast_fail', {'rows': rows, 'repeat': args.repeat}, table)}")


if __name__ == "__main__":
    main()
