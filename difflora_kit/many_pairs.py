"""Many pairs, one average: `difflora pairs` as a function (the CLI, the notebooks and the benchmarks call it).

    result = many_pairs.run(DIR, METADATA, cfg, base, axis="detail", limit=8, duds="drop")
    -> DIR/pair_000/lora1.safetensors, lora2.safetensors, report.json     one folder per pair
       DIR/average.safetensors                                             the LoRA 2s averaged exactly in delta-W
       DIR/index.json                                                      pairs, digests, verdicts, the average
    written whole at the end (files.atomic_directory), or not at all.

Each LoRA 2 gets its health report on the plain base (difflora_kit.health), after its pair's LoRAs are
written; a report that fails (a GPU out of memory...) leaves that LoRA 2 without a verdict, with a
warning, and the run goes on. A dud is a LoRA 2 whose verdict is not "transfers"; `duds` says what the
average does with it (one without a verdict is averaged like one that transfers, and named):

    keep          averaged like the others                       w_i = 1/N
    drop          left out                                       w_i = 1/(N - duds) for the others
    down-weight   raw weight dud_weight (the others 1)           w_i = raw_i / sum(raw)

Under `accelerate launch` / torchrun (difflora_kit.distributed) process k of N trains the pairs
i with i % N == k into the main process' temp folder; the main process averages them in pair order.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import average, backends, distributed, health, lora, pair, pair_files
from .average import AverageResult
from .backends import Base
from .config import TrainConfig
from .files import atomic_directory, check_writable
from .images import load_image
from .toy.pairs import read_pairs

DUD_MODES = ("keep", "drop", "down-weight")


def select_pairs(rows: list[dict], axis: str | None, limit: int | None) -> list[dict]:
    """The rows of one axis (`axis`, needed when the metadata holds several), the first `limit` of them."""
    axes = sorted({r.get("axis") or "" for r in rows})
    if axis is not None:
        rows = [r for r in rows if r.get("axis") == axis]
        if not rows:
            raise ValueError(f"no pair on axis {axis!r} in the metadata (axes there: {', '.join(a for a in axes if a) or 'none'})")
    elif len(axes) > 1:
        raise ValueError(f"the metadata holds pairs of several axes ({', '.join(a or '(none)' for a in axes)}): choose one "
                         "with --axis (an average of LoRA 2s of different axes mixes their effects)")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive integer, got {limit}")
    if not rows:
        raise ValueError("the metadata holds no pair")
    return rows[:limit] if limit else rows


def check_duds(duds: str, dud_weight: float, report: bool) -> None:
    """A clear error for dud settings that cannot work (before anything trains)."""
    if duds not in DUD_MODES:
        raise ValueError(f"duds must be one of {', '.join(DUD_MODES)}, got {duds!r}")
    if not report and duds != "keep":
        raise ValueError(f"--duds {duds} reads the LoRA 2s' health reports: leave out --no-report (or use --duds keep)")
    if not 0 < dud_weight <= 1:
        raise ValueError(f"--dud-weight must be in (0, 1] (--duds drop leaves duds out), got {dud_weight!r}")


def dud_members(entries: list[dict], mode: str, dud_weight: float) -> tuple[list[int], list[float] | None, dict, str]:
    """Which LoRA 2s the average takes, under --duds keep|drop|down-weight (a dud: a health verdict other
    than "transfers"): (their positions in `entries`, weights (None: 1/N each), index.json's record, a line).
    A LoRA 2 whose report failed (entry "report_failed") has no verdict: it is averaged like one that
    transfers, and the record's "unreported" and the line name it."""
    everyone = list(range(len(entries)))
    record = {"duds": mode, "left_out": [], "down_weighted": [], "kept_duds": []}
    failed = [k for k, e in enumerate(entries) if "report_failed" in e]
    unreported = ""
    if failed:
        record["unreported"] = [{"dir": entries[k]["dir"], "reason": entries[k]["report_failed"]} for k in failed]
        unreported = (f"; {len(failed)} of {len(entries)} LoRA 2s have no verdict (their health report failed) and are "
                      f"averaged like those that transfer: {', '.join(entries[k]['dir'] for k in failed)}")
    if all("verdict" not in e for e in entries):
        why = "no health reports (--no-report)" if not failed else "no health report could run (the warnings say why)"
        return everyone, None, {**record, "duds": "keep"}, f"{why}: every LoRA 2 is averaged"
    duds = [k for k, e in enumerate(entries) if "verdict" in e and e["verdict"] != health.TRANSFERS]
    named = ", ".join(f"{entries[k]['dir']} ({entries[k]['verdict']})" for k in duds)
    if not duds:
        return everyone, None, record, \
            f"duds (--duds {mode}): none, every LoRA 2's verdict is '{health.TRANSFERS}'{unreported}"
    of = f"{len(duds)} of {len(entries)} LoRA 2s"
    if mode == "keep":
        record["kept_duds"] = [{"dir": entries[k]["dir"], "verdict": entries[k]["verdict"]} for k in duds]
        return everyone, None, record, (f"duds (--duds keep): {of} averaged at full weight although not "
                                        f"'{health.TRANSFERS}': {named}{unreported}")
    if mode == "drop":
        members = [k for k in everyone if k not in duds]
        if not members:
            raise ValueError(f"--duds drop leaves nothing to average: every LoRA 2 is a dud ({named}). Use --duds keep "
                             "(or --duds down-weight) to average them anyway, or train longer / check the pairs "
                             "(each pair_XXX/report.json says what to try)")
        record["left_out"] = [{"dir": entries[k]["dir"], "verdict": entries[k]["verdict"],
                               "reason": f"health verdict '{entries[k]['verdict']}' (--duds drop)"} for k in duds]
        return members, None, record, f"duds (--duds drop): left out {of} from the average: {named}{unreported}"
    raw = [dud_weight if k in duds else 1.0 for k in everyone]
    weights = [w / sum(raw) for w in raw]
    record["down_weighted"] = [{"dir": entries[k]["dir"], "verdict": entries[k]["verdict"], "weight": round(weights[k], 6),
                                "reason": f"health verdict '{entries[k]['verdict']}' (--duds down-weight, "
                                          f"--dud-weight {dud_weight:g} before normalising)"} for k in duds]
    return everyone, weights, record, (f"duds (--duds down-weight): {of} at weight {dud_weight:g} before normalising "
                                       f"({weights[duds[0]]:.3g} after, the others {max(weights):.3g}): {named}{unreported}")


def train_share(rows: list[dict], images: list[tuple], cfg: TrainConfig, base: Base, group: distributed.Group,
                folder: Path, report: bool = True, progress: bool = True,
                shown: Path | None = None) -> dict[int, tuple[dict, lora.LoraFile]]:
    """Train and write this process' pairs (all of them for one process) into `folder`/pair_XXX:
    {i: (index entry, LoRA 2)}. Each pair's LoRAs are written first, then LoRA 2's health report runs on a
    plain base loaded for it and freed after it (pair_files.report_or_warn: never beside the next pair's
    training model), and its verdict is stamped into LoRA 2. A report that fails leaves its LoRA 2 without
    a verdict (the entry's "report_failed", a ReportFailedWarning) and the other pairs go on. `shown`:
    the folder the warnings name (the final DIR; None: `folder`)."""
    done = {}
    for i in distributed.shard(len(rows), group.processes, group.index):
        row, (image1, image2) = rows[i], images[i]
        if not folder.is_dir():  # removed: another process failed; train and write nothing more
            raise distributed.PeerFailedError(f"process {group.index} of {group.processes}: the temp folder "
                                              f"{folder} is gone: another process failed (its error is above)")
        if progress:
            print(f"pair {i + 1}/{len(rows)}{group.tag}: {row['prompt']!r}")
        result = pair.train_pair(image1, image2, row["prompt"], cfg, base, progress)
        name = f"pair_{i:03d}"
        paths = pair.save_pair(result, folder / name)  # both LoRAs on disk before the report runs
        entry = pair.index_entry(i, row, result)
        if report:
            final = (shown or folder) / name
            redo = pair_files.redo_call(final / "lora2.safetensors", row["image2"], row["prompt"], base,
                                        final / "report.json", cfg, resize=False)
            figures, error = pair_files.report_or_warn(
                paths[1], result.lora2, base, cfg, row["prompt"], image2, folder / name / "report.json", redo,
                also=f" (LoRA 1 beside it; {shown or folder} appears when every pair is done)",
                shown=(final / "lora2.safetensors", final / "report.json"))
            if figures is not None:
                entry.update(verdict=figures["verdict"], other_change=float(f"{figures['other_change']:.4g}"),
                             drag=float(f"{figures['drag']:.4g}"))
                if progress:
                    print(pair_files.report_line(figures, f"{name}/report.json", f"pair {i + 1}/{len(rows)} LoRA 2"))
            else:
                entry["report_failed"] = error.splitlines()[0]
        done[i] = (entry, result.lora2)
    return done


def average_record(avg: AverageResult, members: list[str], duds: dict, rank: int | str | None) -> dict:
    """index.json's "average": the file, how it was made, its members' LoRA 2 digests and weights, the duds."""
    return {"file": "average.safetensors", "method": avg.method, "members": members,
            "weights": [round(w, 6) for w in avg.weights], **duds,
            "rank": max(average.module_ranks(avg.lora).values()),
            "rank_setting": rank if rank is not None else "exact",
            "energy_kept": avg.svd.energy if avg.svd else 1.0}


def index_record(metadata: Path, axis: str, base: Base | str, cfg: TrainConfig, entries: list[dict], summary: dict,
                 processes: int = 1) -> dict:
    """index.json: where the pairs came from, the base and settings, one entry per pair, the average."""
    return {"metadata": str(metadata), "axis": axis, "base": str(base), "config": dataclasses.asdict(cfg),
            "pairs": entries, "average": summary, **({"processes": processes} if processes > 1 else {})}


@dataclasses.dataclass
class ManyPairsResult:
    """What `run` wrote into `out` (on the main process)."""

    out: Path
    pairs: int
    """How many pairs were trained (pair_000 ...)."""
    average: AverageResult
    dud_note: str
    """One line: which duds the average kept, left out or down-weighted."""
    index: dict
    """index.json's content."""
    processes: int = 1


def run(out: Path, metadata: Path, cfg: TrainConfig | None = None, base: str | Path | Base = "toy",
        axis: str | None = None, limit: int | None = None, rank: int | str | None = None, energy: float = 0.99,
        duds: str = "keep", dud_weight: float = 0.25, report: bool = True, resize: bool = False,
        force: bool = False, progress: bool = True) -> ManyPairsResult | None:
    """Train LoRA 1 and 2 for every pair of `metadata` (one `axis`, the first `limit`), report on each
    LoRA 2, average the members `duds` leaves (`rank`/`energy`: average.average's SVD), write `out`
    whole. Returns None on the processes of a launch other than the main one (which writes and reports)."""
    out = Path(out)
    check_writable(out, force)
    cfg = cfg or TrainConfig()
    check_duds(duds, dud_weight, report)
    rows = select_pairs(read_pairs(metadata), axis, limit)
    base = backends.resolve_base(base)
    size = backends.sample_size(base)
    images = [(load_image(r["image1"], size, resize), load_image(r["image2"], size, resize)) for r in rows]

    # One process, or under accelerate launch / torchrun a share of the pairs each (difflora_kit.distributed).
    with distributed.launched() as group:
        if not group.is_main:  # train into the main process' temp folder, report, exit
            tmp = group.share_folder(None)
            with distributed.discarded_on_error(tmp):
                done = train_share(rows, images, cfg, base, group, tmp, report, progress, out)
                group.gather({i: entry for i, (entry, _) in done.items()})
            return None
        with atomic_directory(out) as tmp:  # DIR appears whole at the end, or not at all
            done = train_share(rows, images, cfg, base, group, group.share_folder(tmp), report, progress, out)
            shares = group.gather({i: entry for i, (entry, _) in done.items()})  # waits for every process
            indexed = sorted((i, e) for share in shares for i, e in share.items())  # pair order, not process order
            entries = [e for _, e in indexed]
            members, weights, record, note = dud_members(entries, duds, dud_weight)
            # the members' LoRA 2s; another process' from the file it wrote
            lora2s = [done[i][1] if i in done else lora.load(tmp / e["dir"] / "lora2.safetensors")
                      for i, e in (indexed[k] for k in members)]
            avg = average.average(lora2s, weights, rank, energy)
            lora.save_files(tmp / "average.safetensors", avg.lora)
            summary = average_record(avg, [entries[k]["lora2_digest"] for k in members], record, rank)
            index = index_record(metadata, axis or rows[0].get("axis", ""), base, cfg, entries, summary, group.processes)
            (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return ManyPairsResult(out, len(rows), avg, note, index, group.processes)
