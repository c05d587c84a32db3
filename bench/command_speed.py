"""Whole commands as a user runs them, this tree against an earlier commit, side by side.

    python bench/command_speed.py --ref 64762f4 [--commands pair:2,demo:1] [--threads 2]

Each command runs as a fresh process (`python -m difflora_kit.cli ...`: imports, loading, training,
sampling, writing, all of it), first with the package of `--ref` (a git worktree of that commit
under .cache/bench_ref/, same virtual environment), then with this tree, A B A B ...; the ratio
is taken pair by pair, so a drift of the shared machine's speed cancels. Prints the table and
writes bench/results/command_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = "data_samples/pairs/detail/000"
COMMANDS = {
    "pair": ["pair", f"{PAIR}_1.png", f"{PAIR}_2.png",
             "--prompt", "a red triangle on a blue background", "--out", "{out}"],
    "demo": ["demo", "--out", "{out}"],
}


def reference_tree(ref: str) -> Path:
    """A worktree of `ref` (made once)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = ROOT / ".cache" / "bench_ref" / sha
    if not (tree / "difflora_kit").is_dir():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def run_once(tree: Path, name: str, threads: int) -> float:
    """Wall seconds of one `difflora NAME` in a fresh process with the package in `tree`."""
    out = Path(tempfile.mkdtemp(prefix=f"bench_{name}_")) / "out"
    args = [a.replace("{out}", str(out)) for a in COMMANDS[name]]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "difflora_kit.cli", *args], cwd=tree, env=env,
                          capture_output=True, text=True)
    seconds = time.time() - started
    shutil.rmtree(out.parent, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"difflora {name} in {tree} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the earlier commit (e.g. the main of the last landing)")
    ap.add_argument("--commands", default="pair:2,demo:1", help="NAME:RUNS, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each command (torch's default here)")
    args = ap.parse_args()
    before, after = reference_tree(args.ref), ROOT
    rows, lines = [], ["| command | before (ref) | now | before / now (pair by pair) |", "|---|---|---|---|"]
    for item in args.commands.split(","):
        name, runs = item.split(":") if ":" in item else (item, "1")
        pairs = []
        for _ in range(int(runs)):
            a = run_once(before, name, args.threads)
            b = run_once(after, name, args.threads)
            pairs.append((a, b))
            print(f"{name}: before {a:.1f} s, now {b:.1f} s", flush=True)
        ratios = [a / b for a, b in pairs]
        row = {"command": name, "before": [a for a, _ in pairs], "now": [b for _, b in pairs], "ratios": ratios}
        rows.append(row)
        lines.append(f"| difflora {name} | {statistics.median(row['before']):.1f} s | {statistics.median(row['now']):.1f} s | "
                     f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}) |")
    lines += ["", f"Whole processes (`python -m difflora_kit.cli`, imports included), runs {args.commands}, interleaved; "
              f"before = commit {args.ref}; OMP/MKL threads {args.threads}."]
    table = "\n".join(lines)
    print(table)
    print("wrote", write_result("command_speed", {"ref": args.ref, "threads": args.threads, "rows": rows}, table))


if __name__ == "__main__":
    main()
