"""Loading a step-2 base: the full load (from_pretrained, then preset.apply_preset) against streaming
(difflora_kit.streaming.load_denoiser), in anonymous resident memory, with the plan's prediction.

    python bench/stream_memory.py                    # the mid-size denoiser, fuse mode
    python bench/stream_memory.py --modes fuse,requant,adapter

The denoiser: an SD-1.5-like UNet at reduced width (MID_UNET, ~310 MiB in fp32, random weights),
saved once as safetensors shards under out/bench/ (git-ignored). The preset: a random rank-8 LoRA 1 on
the kit's default targets (bench/memory.py's random_lora). Each load runs in a fresh process, fp32 on
this CPU, one thread, glibc returning every large block at free (MALLOC_MMAP_THRESHOLD_, as
bench/plan_check.py). Measured: RssAnon of /proc/self/status above its value before the load, at the
end and at its peak while loading, sampled every 0.2 ms by a thread (a sample can miss a peak that
lasts less: a sampled peak is a lower bound); RssFile beside it. safetensors maps the files: what
from_pretrained reads stays file pages (RssFile, not RssAnon) until written, so the full load holds the
untouched fp32 weights there (on a GPU they are device memory); `full-read` reads the files into
memory instead (disable_mmap), the CPU picture of a GPU's. The streamed model owns its memory. Predicted:
streaming.loading_peak for the same settings on the CPU; today's plan counts the full-precision
denoiser for loading (plan.plan_memory's load_peak, without the encoders).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from memory import random_lora, vm_kib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench"
MiB = 2**20
RANK = 8


def mid_unet() -> dict:
    from difflora_kit.model_configs import SD15_UNET

    return dict(SD15_UNET, block_out_channels=(96, 192, 384, 384))  # 81.5M parameters, 311 MiB fp32


def small_unet() -> dict:
    """A few tens of MB (tests/test_streaming.py): 10.4M parameters, 40 MiB fp32."""
    from difflora_kit.model_configs import SD15_UNET

    return dict(SD15_UNET, block_out_channels=(32, 64, 128, 128))


def make_base(folder: Path, config: dict, shard: str = "64MB") -> Path:
    """A model folder holding only what streaming and from_pretrained read: model_index.json (an SD 1.x
    pipeline, so backends.resolve_base finds the family) and unet/ as safetensors shards of `shard`.
    Written once per config (a stamp file names it)."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    stamp = hashlib.sha256(json.dumps([config, shard], sort_keys=True, default=str).encode()).hexdigest()[:12]
    if (folder / "stamp").is_file() and (folder / "stamp").read_text() == stamp:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    UNet2DConditionModel(**config).save_pretrained(folder / "unet", safe_serialization=True, max_shard_size=shard)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}) + "\n")
    (folder / "stamp").write_text(stamp)
    return folder


def meta_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(folder) / "unet"))


def preset_for(folder: Path, seed: int = 0):
    from difflora_kit.config import TrainConfig

    return random_lora(meta_unet(folder), RANK, TrainConfig().targets, seed)


# ----------------------------------------------------------------------------- measuring
def rss() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process, bytes: one read of /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]


class AnonPeak:
    """Peaks of RssAnon and of RssAnon + RssFile while the block runs, sampled by a thread every
    `interval` seconds (bytes)."""

    def __init__(self, interval: float = 2e-4):
        self.interval, self.peak, self.peak_with_file, self._stop = interval, 0, 0, threading.Event()

    def _sample(self):
        anon, file = rss()
        self.peak, self.peak_with_file = max(self.peak, anon), max(self.peak_with_file, anon + file)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # the sampler gets the GIL between Python steps too
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        sys.setswitchinterval(self._switch)


HOWS = {"full": "full load (from_pretrained + apply_preset)",
        "full-read": "full load, from_pretrained(disable_mmap=True)",
        "stream": "streaming (load_denoiser)"}


def one_run(folder: str, how: str, mode: str) -> dict:
    """In its own process: load the step-2 base of `folder` the `how` way (HOWS)."""
    from diffusers import UNet2DConditionModel

    from difflora_kit import kernels, preset as presets, quant, streaming

    folder = Path(folder)
    lora1 = preset_for(folder)
    with torch.no_grad():  # warm-up: the first call of each op loads code and allocates once
        w = torch.randn(256, 256)
        kernels.merge_quantize(w, torch.randn(RANK, 256), torch.randn(256, RANK), 1.0)
        quant.quantize_linears(torch.nn.Sequential(torch.nn.Linear(256, 256)))
        meta_unet(folder)
        del w
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    (before, file_before), started = rss(), time.time()
    with AnonPeak() as sampled:
        if how.startswith("full"):  # pair.prepare_base's way (its backend loads the UNet so)
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32, use_safetensors=True,
                                                        disable_mmap=how == "full-read")
            presets.apply_preset(unet, lora1, 1.0, mode)
        else:
            unet = streaming.load_denoiser(folder, "cpu", torch.float32, lora1, 1.0, mode)
    seconds = time.time() - started
    anon_after, file_after = rss()
    return {"how": how, "mode": mode, "seconds": seconds, "anon_before": before, "anon_peak": sampled.peak,
            "anon_after": anon_after, "file_before": file_before, "with_file_peak": sampled.peak_with_file,
            "file_after": file_after, "vm_hwm": vm_kib("VmHWM") * 1024,
            "weights": quant.weight_bytes(unet)["total"]}


def run_in_subprocess(folder: Path, how: str, mode: str) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import stream_memory; "
            f"print('RESULT', json.dumps(stream_memory.one_run({str(folder)!r}, {how!r}, {mode!r})))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{how}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def predicted(folder: Path, mode: str) -> dict:
    """streaming.loading_peak on this CPU (fp32, the file fp32), and the full-precision denoiser."""
    from difflora_kit import streaming

    unet = meta_unet(folder)
    p = streaming.loading_peak(unet, torch.float32, True, streaming.preset_ranks(preset_for(folder)), mode, "cpu")
    full = sum(t.numel() for t in unet.parameters()) * 4
    return {"peak": p.peak, "resident": p.resident, "layer": p.layer, "in_flight": p.in_flight, "full_fp32": full}


# ----------------------------------------------------------------------------- report
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="fuse")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each load (the table keeps the median)")
    args = parser.parse_args(argv)
    folder = make_base(OUT / "stream_mid", mid_unet())
    shards = sorted(p.name for p in (folder / "unet").glob("*.safetensors"))
    rows = []
    for mode in args.modes.split(","):
        plan = predicted(folder, mode)
        for how in HOWS:
            runs = []
            for _ in range(args.repeats):
                print(f"... {how} {mode}", flush=True)
                runs.append(run_in_subprocess(folder, how, mode))
            runs.sort(key=lambda r: r["anon_peak"] - r["anon_before"])
            rows.append({**runs[len(runs) // 2], "runs": runs, "predicted": plan})
    lines = [f"Loading a step-2 base (MID_UNET: SD-1.5 layout at block widths {mid_unet()['block_out_channels']}, "
             f"{rows[0]['predicted']['full_fp32'] / MiB:.0f} MiB in fp32, {len(shards)} safetensors shards; "
             f"random rank-{RANK} preset on the default targets; fp32 on this CPU, 1 thread). "
             "RssAnon above its value before the load, MiB:", "",
             "| mode | path | RssAnon peak | RssAnon after | predicted peak | predicted after | "
             "RssAnon + RssFile peak | RssFile after | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, full = r["predicted"], r["how"].startswith("full")
        pred_peak, pred_after = (p["full_fp32"], p["full_fp32"]) if full else (p["peak"], p["resident"])
        note = " (today's plan: the fp32 denoiser)" if full else ""
        lines.append(f"| {r['mode']} | {HOWS[r['how']]} | {(r['anon_peak'] - r['anon_before']) / MiB:.1f} | "
                     f"{(r['anon_after'] - r['anon_before']) / MiB:.1f} | {pred_peak / MiB:.1f}{note} | "
                     f"{pred_after / MiB:.1f} | {(r['with_file_peak'] - r['anon_before'] - r['file_before']) / MiB:.1f} | "
                     f"{(r['file_after'] - r['file_before']) / MiB:.1f} | {r['seconds']:.1f} |")
    stream = [r for r in rows if r["how"] == "stream"]
    lines += ["", "Streaming's predicted peak: " + "; ".join(
        f"{r['mode']}: {r['predicted']['resident'] / MiB:.1f} MiB loaded + worst layer {r['predicted']['layer']!r} "
        f"in flight {r['predicted']['in_flight'] / MiB:.1f} MiB (measured / predicted "
        f"{(r['anon_peak'] - r['anon_before']) / r['predicted']['peak']:.3f})" for r in stream)]
    table = "\n".join(lines)
    print(table)
    write_result("stream_memory", {"unet": mid_unet(), "shards": shards, "rank": RANK, "rows": rows,
                                   "env": {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"},
                                   "platform": platform.platform(), "gpu_measured": False}, table)


if __name__ == "__main__":
    main()
