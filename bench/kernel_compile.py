"""The merge kernels built for each card on this CPU: registers, spills, access widths (no GPU needed).

    python bench/kernel_compile.py            # the whole matrix, ~2 min on 2 idle cores
    python bench/kernel_compile.py --cards 75,80 --ranks 8

Runs kernels/compile_matrix.py in a subprocess (without TRITON_INTERPRET) and writes
bench/results/kernel_compile.md (+ .json): one table row per kernel, dtype and rank, one column per
card; each cell is registers per thread / spill stores in bytes / main load / main store width in
bits. Static facts of the build: nothing here runs on a GPU, so no GB/s.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from difflora_kit.kernels import compile_matrix as cm  # noqa: E402


def _case(row: dict) -> cm.Case:
    return cm.Case(**{f.name: row[f.name] for f in cm.dataclasses.fields(cm.Case)})


def cell(row: dict) -> str:
    """'regs / spill B / load/store bits' of one build, or why it did not build."""
    if not row["built"]:
        return f"not built: {row['error'][:60]}"
    acc = row["accesses"]
    ld = max(acc[cm.MAIN_LOAD[row["kernel"]]]["ld"])
    st = max(acc[cm.MAIN_STORE[row["kernel"]]]["st"])
    return f"{row['registers']} / {row['spill_stores']} / {ld}/{st}"


def table(rows: list[dict], cols: int, cards: list[int]) -> str:
    by_key = {}
    for r in rows:
        if r["cols"] == cols and r.get("tile_k") is not None and _case(r) != cm.CONTROL:
            by_key.setdefault((r["kernel"], r["dtype"], r["rank"], r["r_pad"], r["tile_k"]), {})[r["capability"]] = r
    head = "| kernel | dtype | rank (pad) | tile M x K | " + " | ".join(f"sm{c} ({cm.CARDS[c]})" for c in cards) + " |"
    lines = [head, "|" + "---|" * (4 + len(cards))]
    for (kernel, dtype, rank, r_pad, bk), per_card in by_key.items():
        any_row = next(iter(per_card.values()))
        lines.append(f"| {kernel} | {dtype} | {rank} ({r_pad}) | {any_row['tile_m']} x {bk} | "
                     + " | ".join(cell(per_card[c]) if c in per_card else "" for c in cards) + " |")
    return "\n".join(lines)


def shared_table(rows: list[dict], cards: list[int]) -> str:
    """Largest shared memory per block of any built kernel, per card, against the card's limit."""
    lines = ["| card | most shared memory of any kernel | the card's limit per block |", "|---|---|---|"]
    for c in cards:
        used = max((r["shared_bytes"] for r in rows if r["capability"] == c and r["built"]), default=0)
        lines.append(f"| sm{c} | {used // 1024} KiB | {cm.SHARED_LIMIT[c] // 1024} KiB |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", default=",".join(map(str, cm.CARDS)))
    parser.add_argument("--ranks", default=",".join(map(str, cm.RANKS)))
    args = parser.parse_args()
    start = time.perf_counter()
    result = cm.run_in_subprocess(["--cards", args.cards, "--ranks", args.ranks])
    wall = time.perf_counter() - start
    cards = [int(c) for c in args.cards.split(",")]
    rows = result["rows"]
    control = next(r for r in rows if _case(r) == cm.CONTROL)
    text = (f"Triton {result['triton']}, torch {result['torch']}: {len(rows)} builds in {wall:.0f} s wall "
            f"({result['cpu_seconds']:.0f} CPU-seconds, {result['workers']} worker processes; the subprocess's "
            f"own count {result['seconds']:.0f} s).\n\n"
            f"Each cell: registers per thread / spill stores (bytes per thread, ptxas -v) / widest global "
            f"load of the weight (W or CB) / widest store of the result (CB or W'), in bits. `in` = {cm.COLS} "
            f"(divisible by 16, so rows start 16-byte aligned), 64 rows, 4 warps.\n\n"
            + table(rows, cm.COLS, cards)
            + f"\n\nThe same kernels at rank 8 with `in` = {cm.TAIL_COLS} (not divisible by 16: rows start "
            f"unaligned, Triton may not assume more than one element):\n\n" + table(rows, cm.TAIL_COLS, cards)
            + "\n\nShared memory (a kernel asking more than its card allows would fail at launch):\n\n"
            + shared_table(rows, cards)
            + f"\n\nControl (a K tile of 24, no power of two; must not build): built={control['built']}, "
            f"{control.get('error', '')}\n")
    print(text)
    path = write_result("kernel_compile", {"wall_seconds": round(wall, 1), **result}, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
