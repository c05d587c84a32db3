"""`difflora pairs` under `accelerate launch`: 2 CPU processes (gloo) give what one process gives.

accelerate starts several CPU processes only through mpirun: `accelerate launch --cpu --num_processes 2`
starts ONE. `--multi_gpu` starts them with torchrun, which works without GPUs; difflora_kit.distributed
always talks over gloo, so on a CPU-only machine that is the 2-process CPU run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from difflora_kit import distributed
from difflora_kit.demo import DEFAULT_PAIRS

TINY = ["--axis", "detail", "--steps", "2", "--batch", "2", "--rank", "2", "--alpha", "2"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
LAUNCHER_VARS = distributed.SIZE_VARS + distributed.RANK_VARS + ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                                 "MASTER_PORT", "ACCELERATE_USE_CPU")


def test_shard_is_round_robin_and_covers_every_item_once():
    assert distributed.shard(3, 2, 0) == [0, 2] and distributed.shard(3, 2, 1) == [1]
    assert distributed.shard(2, 4, 3) == [] and distributed.shard(5, 1, 0) == [0, 1, 2, 3, 4]
    for n in range(7):
        for size in range(1, 5):
            shares = [distributed.shard(n, size, k) for k in range(size)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for bad in ((3, 2, 2), (3, 0, 0), (3, 2, -1), (-1, 2, 0)):
        with pytest.raises(ValueError):
            distributed.shard(*bad)


def test_world_reads_the_launchers_variables():
    assert distributed.world({}) == (1, 0)
    assert distributed.world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (4, 3)  # torchrun / accelerate
    assert distributed.world({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == (2, 1)  # mpirun
    with pytest.raises(ValueError):
        distributed.world({"WORLD_SIZE": "2", "RANK": "2"})


def _env(tmp_path) -> dict:
    """One thread per process in both runs (the same float reductions, so bitwise-equal LoRAs), no user
    accelerate config (HF_HOME is where accelerate looks for it), nothing of a launcher around pytest."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("PMI_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    return env


def _run(argv, tmp_path):
    # cwd outside the repository: `python -m` puts the cwd on sys.path, and the repo's top-level kernels/
    # folder would then shadow the `kernels` package that bitsandbytes tries to import
    return subprocess.run(argv, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_a_share_each_and_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["pairs", str(DEFAULT_PAIRS), "--limit", "3", *TINY]  # 3 pairs: process 0 trains 2, process 1 trains 1
    single = _run([sys.executable, "-m", "difflora_kit.cli", *args, "--out", str(one)], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run([*LAUNCH, "-m", "difflora_kit.cli", *args, "--out", str(two)], tmp_path)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "pair 2/3 (process 1 of 2)" in multi.stdout and "pair 3/3 (process 0 of 2)" in multi.stdout
    assert "(2 processes)" in multi.stdout and "(process" not in single.stdout

    i1, i2 = (json.loads((d / "index.json").read_text()) for d in (one, two))
    assert i2.pop("processes") == 2 and "processes" not in i1
    for entries in (i1["pairs"], i2["pairs"]):
        for e in entries:
            e.pop("seconds")
    assert i2 == i1  # the pairs in metadata order (not by process), same digests, same average summary
    dirs = ["pair_000", "pair_001", "pair_002"]
    assert [e["dir"] for e in i2["pairs"]] == dirs
    files = [f"{d}/lora{k}.safetensors" for d in dirs for k in (1, 2)] + ["average.safetensors"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for f in files:
        a, b = load_file(one / f), load_file(two / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f  # bitwise
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_a_failing_process_fails_the_launch_and_writes_nothing(tmp_path):
    driver = tmp_path / "driver.py"  # process 1 fails at its first pair (pair 2) while process 0 trains pair 1
    driver.write_text("import os, sys\nfrom difflora_kit import cli, pair\n"
                      "def boom(*a, **k):\n    raise ValueError('boom on process 1')\n"
                      "if os.environ['RANK'] == '1':\n    pair.train_pair = boom\n"
                      "sys.exit(cli.main())\n")
    out = tmp_path / "out"
    run = _run([*LAUNCH, str(driver), "pairs", str(DEFAULT_PAIRS), "--limit", "2", *TINY, "--out", str(out)], tmp_path)
    assert run.returncode != 0
    assert "difflora: error: boom on process 1" in run.stderr and "process 1 of 2 failed" in run.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial"))  # the temp folder went too
