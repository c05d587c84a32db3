"""`difflora pairs` on several processes: each trains its share of the pairs, the main process averages.

    accelerate launch --multi_gpu --num_processes N -m difflora_kit.cli pairs METADATA.jsonl --out DIR ...
    torchrun --nproc-per-node N -m difflora_kit.cli pairs METADATA.jsonl --out DIR ...

Process k of N trains the pairs i with i % N == k (`shard`), on its own GPU (cuda:LOCAL_RANK) when
there are GPUs. Every process writes its pair_XXX folders into the one temp folder the main process
made beside DIR (its path is broadcast); after the last pair (a gather of the pairs' index entries,
which also waits for everyone) the main process loads the LoRA 2 files, averages them in pair order
and renames the temp folder to DIR. Pair i gets the same seed, and so the same LoRAs, whichever
process trains it. Not launched (no WORLD_SIZE > 1 in the environment): one process, as always.

The processes talk over gloo (CPU), even on GPUs: only a path and a few small dicts travel, and
gloo can wait as long as a share takes (WAIT; START for the processes to connect). Several
machines need DIR's parent on a shared filesystem (untested). A process that fails exits non-zero;
the launcher (torchrun under `accelerate launch`) then SIGTERMs the others (turned into an
exception here, so they clean up), and a process waiting for a dead one gets a connection error,
reported as "another process stopped". Either way the temp folder is removed, DIR is not written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import torch

START = datetime.timedelta(minutes=10)
"""How long the processes wait for each other to start (a launch that never connects, e.g. a wrong port,
fails after this)."""
WAIT = datetime.timedelta(days=2)
"""How long a process waits for the others at a gather: a share's training time (uneven shares, more
processes than pairs), not a collective's usual seconds. A failed process ends the wait sooner."""

SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun, MPI launchers
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_int(names, default: int, environ=None) -> int:
    environ = os.environ if environ is None else environ
    for name in names:
        if environ.get(name, "").strip():
            return int(environ[name])
    return default


def world(environ=None) -> tuple[int, int]:
    """(number of processes, this process' index) of the launch, from the launcher's environment
    variables; (1, 0) when the process was not started by a launcher."""
    size, index = _env_int(SIZE_VARS, 1, environ), _env_int(RANK_VARS, 0, environ)
    if size < 1 or not 0 <= index < size:
        raise ValueError(f"a launcher set process index {index} of {size} processes: that is not a valid launch")
    return size, index


def shard(n_items: int, processes: int, index: int) -> list[int]:
    """The items process `index` of `processes` handles: i with i % processes == index (round robin, so
    shares differ by at most one item; processes beyond n_items get none)."""
    if processes < 1 or not 0 <= index < processes:
        raise ValueError(f"process index {index} of {processes} processes")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    return list(range(index, n_items, processes))


class PeerFailedError(RuntimeError):
    """Another process of the launch stopped (its error is in the log) while this one waited for it."""


@dataclasses.dataclass(frozen=True)
class Group:
    """This process' place in the launch; `processes` == 1: not launched (no collective does anything)."""

    processes: int = 1
    index: int = 0
    pg: object = dataclasses.field(default=None, compare=False, repr=False)
    """The gloo process group of the collectives (timeout WAIT)."""

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def tag(self) -> str:
        """' (process k of N)' for messages; '' for one process."""
        return f" (process {self.index} of {self.processes})" if self.processes > 1 else ""

    def _collective(self, what: str, call):
        try:
            return call()
        except RuntimeError as e:  # gloo: the peer's connection closed (it exited) or the wait timed out
            raise PeerFailedError(f"process {self.index} of {self.processes}: another process of the launch "
                                  f"stopped while this one waited for it to {what} (its error is above); "
                                  f"nothing was written to the output ({type(e).__name__}: {e})") from e

    def share_folder(self, folder: Path | None) -> Path:
        """The main process' `folder`, on every process (the others pass None)."""
        if self.processes == 1:
            return Path(folder)
        box = [str(folder) if self.is_main else None]
        self._collective("make the temp folder",
                         lambda: torch.distributed.broadcast_object_list(box, src=0, group=self.pg))
        return Path(box[0])

    def gather(self, obj) -> list | None:
        """[obj of process 0, obj of process 1, ...] on the main process, None on the others.
        Returns only when every process has called it (a barrier)."""
        if self.processes == 1:
            return [obj]
        out = [None] * self.processes if self.is_main else None
        self._collective("finish its pairs",
                         lambda: torch.distributed.gather_object(obj, out, dst=0, group=self.pg))
        return out


class Stopped(SystemExit):
    """SIGTERM: the launcher stops this process (another one failed); raised so that `finally` and
    `except` clean up (the temp folder) before the process exits with 128 + 15."""


def _stop(signum, frame):
    raise Stopped(128 + signum)


@contextlib.contextmanager
def launched() -> Iterator[Group]:
    """The launch this process belongs to: Group() when not launched; else a gloo process group
    (accelerate's PartialState), this process on its own GPU if there are GPUs, SIGTERM turned into
    `Stopped`, all undone at the end. An error here is reported with the process index."""
    processes, index = world()
    if processes == 1:
        yield Group()
        return
    from accelerate import PartialState

    state = PartialState(cpu=True, backend="gloo", timeout=START)  # cpu=True: gloo, whatever the devices
    long_waits = torch.distributed.new_group(backend="gloo", timeout=WAIT)  # START: only for the rendezvous
    group = Group(state.num_processes, state.process_index, long_waits)
    if torch.cuda.is_available():  # "cuda" (load_backend's default) is now this process' own GPU
        torch.cuda.set_device(state.local_process_index % torch.cuda.device_count())
    main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers: main thread only)
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        yield group
    except PeerFailedError:
        raise
    except Stopped:
        print(f"difflora: process {group.index} of {group.processes} stopped by the launcher (SIGTERM: another "
              "process failed)", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        print(f"difflora: process {group.index} of {group.processes} failed ({type(e).__name__}); the launch "
              "stops and writes nothing", file=sys.stderr, flush=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # closes this process' connections: a waiting peer learns


@contextlib.contextmanager
def discarded_on_error(folder: Path) -> Iterator[None]:
    """For a process other than the main one, until its gather returned: on any error (its own, the
    main process gone, SIGTERM) the launch cannot succeed, so remove the main process' temp folder
    (a pair it wrote after the main process had removed it would otherwise stay behind)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
