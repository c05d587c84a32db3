"""How fast a bad input that needs no training fails: each as a fresh `difflora` subprocess, as a
user runs it, wall time from start to exit (imports included). Target: at most 2 s each, which a check
made after torch and diffusers are imported (about 5 s on this 2-core CPU) cannot meet: every case here
is refused by cli._check_inputs before them.

    python bench/fast_fail.py [--repeat 3]

Writes bench/results/fast_fail.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = sorted((ROOT / "data_samples" / "pairs").rglob("*.png"))[:2]
METADATA = ROOT / "data_samples" / "pairs" / "metadata.jsonl"


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """(what is wrong, the command's arguments)."""
    not_image = tmp / "notes.png"
    not_image.write_text("not an image")
    pickle = tmp / "lora.pt"
    pickle.write_bytes(b"\x80\x04")
    existing = tmp / "grid.png"
    existing.write_bytes(b"")
    lora_out = tmp / "have.safetensors"
    lora_out.write_bytes(b"")
    pair_out, many_out = tmp / "pair", tmp / "many"
    pair_out.mkdir()
    (pair_out / "lora1.safetensors").write_bytes(b"")
    many_out.mkdir()
    new = str(tmp / "new.safetensors")
    train = ["train", str(PAIR[0]), "--prompt", "a", "--out"]
    pair = ["pair", str(PAIR[0]), str(PAIR[1]), "--prompt", "a", "--out"]
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
        ("train: output exists", [*train, str(lora_out)]),
        ("pair: DIR/lora1 exists", [*pair, str(pair_out)]),
        ("pairs: DIR exists", ["pairs", str(METADATA), "--out", str(many_out)]),
        ("train: --rank 0", [*train, new, "--rank", "0"]),
        ("pair: --rank 0", [*pair, str(tmp / "p"), "--rank", "0"]),
        ("pairs: --rank 0", ["pairs", str(METADATA), "--out", str(tmp / "m"), "--rank", "0"]),
        ("plan: --rank 0", ["plan", "--rank", "0"]),
        ("train: --alpha -2", [*train, new, "--alpha", "-2"]),
        ("train: --offload-blocks without checkpointing", [*train, new, "--offload-blocks", "2"]),
        ("train: empty prompt", ["train", str(PAIR[0]), "--prompt", " ", "--out", new]),
        ("pairs: --rank-out 0", ["pairs", str(METADATA), "--out", str(tmp / "m"), "--rank-out", "0"]),
        ("sample: requant without 8-bit", ["sample", "--prompt", "a", "--out", str(tmp / "g.png"),
                                           "--preset-mode", "requant", "--no-eight-bit"]),
        ("inspect: LoRA is a pickle", ["inspect", str(pickle)]),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows, load = [], os.getloadavg()
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
    table += (f"\n\nTarget: each at most 2 s ({sum(r['max_s'] <= 2 for r in rows)} of {len(rows)} met; {args.repeat} runs "
              f"each, one torch thread). Load average when it started: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min): "
              "other jobs may have shared the CPU.")
    print(f"wrote {write_result('fast_fail', {'rows': rows, 'repeat': args.repeat, 'load_average': load}, table)}")


if __name__ == "__main__":
    main()
