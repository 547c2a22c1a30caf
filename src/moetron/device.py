"""The one place that names device types: the run's device and backend are chosen here, once, and every
other module receives a `torch.device` (ARCHITECTURE.md, "Device and backend are chosen once").

    run.device=auto   cuda:LOCAL_RANK with NCCL where CUDA is available, else the CPU with gloo
    run.device=cpu    the CPU with gloo (also on a GPU node: a debugging run)
    run.device=cuda   cuda:LOCAL_RANK with NCCL; an error when no GPU is visible

Beside an NCCL world a gloo group carries the CPU-side object collectives (all_gather_object of names,
layouts); on the CPU the world group serves both. One process is a world of one: the trainer runs the
same collectives over a single-rank gloo group, so one loop serves every layout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")  # the valid values of run.device
HOST = torch.device("cpu")  # host memory: pinned staging buffers, the CPU weight EMA


@dataclass
class Runtime:
    """Where this process runs: its device, its rank in the world, and the group for CPU objects."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    object_group: dist.ProcessGroup | None  # gloo group for *_object collectives (None: the world group)
    owns_group: bool = False  # start() created the process group (a bare process): its user ends it

    @property
    def backend(self) -> str:
        return backend_of(self.device)


def is_gpu(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def is_host(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def backend_of(device: torch.device) -> str:
    return "nccl" if is_gpu(device) else "gloo"


def choose_device(requested: str, local_rank: int) -> torch.device:
    """run.device -> this process's device. Raises ValueError (the caller names the config field)."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; valid: {' | '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return HOST
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device is visible to this process (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node shows {count}")
    return torch.device("cuda", local_rank)


def start(requested: str, timeout_s: float = 600.0) -> Runtime:
    """Choose the device and join (or create) the process group. Under torchrun / srun the environment
    names the world; a bare process becomes a world of one. Idempotent: a second call reuses the group.
    `timeout_s`: how long a collective may wait before the backend aborts it."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested, local_rank)
    if is_gpu(device):
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    owns_group = not dist.is_initialized()
    if owns_group:
        device_id = device if is_gpu(device) else None
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend_of(device), timeout=timeout, device_id=device_id)
        else:  # one process, no launcher: a world of one, its store in memory
            dist.init_process_group(backend_of(device), store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout, device_id=device_id)
    world_backend = dist.get_backend()
    if world_backend != backend_of(device) and dist.get_world_size() > 1:
        raise ValueError(f"the process group uses {world_backend}, but device {device} needs {backend_of(device)}")
    object_group = dist.new_group(backend="gloo", timeout=timeout) if world_backend != "gloo" else None
    return Runtime(device, dist.get_rank(), dist.get_world_size(), local_rank, object_group, owns_group)


def start_fake(requested: str, rank: int, world_size: int) -> Runtime:
    """A dry run: rank `rank` of a world of `world_size`, alone in this process, over torch's fake process
    group (every collective returns at once and moves nothing), so any rank of any layout can be built."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    device = choose_device(requested, 0)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    return Runtime(device, dist.get_rank(), dist.get_world_size(), 0, None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast on the device's own type to `dtype` (None: compute in the parameters' dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host batch to the device: through pinned memory, without blocking the host, on a GPU."""
    if batch.device == torch.device(device):
        return batch
    if is_gpu(device) and is_host(batch.device):
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def peak_memory_bytes(device: torch.device) -> int:
    """The device's peak allocated bytes (0 on the CPU, where the trainer reports peak RSS instead)."""
    return torch.cuda.max_memory_allocated(device) if is_gpu(device) else 0


def reserved_memory_bytes(device: torch.device) -> int:
    """Bytes the caching allocator holds on the device (what the driver sees as used); 0 on the CPU."""
    return torch.cuda.memory_reserved(device) if is_gpu(device) else 0


def timing_event(device: torch.device):
    """A timing event recorded now on the device's current stream (a GPU's time is the stream's, not the
    host's); None on the CPU, where the host's clock is the time."""
    if not is_gpu(device):
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def elapsed_seconds(start, end) -> float:
    """Seconds between two timing events (waits for the later one to complete)."""
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing on a GPU); nothing to wait for on the CPU."""
    if is_gpu(device):
        torch.cuda.synchronize(device)
