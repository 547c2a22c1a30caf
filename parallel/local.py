"""Run a function on N local processes joined by a torch.distributed process group (gloo by default):
the harness of moetron's distributed tests and benchmarks, and of any one-machine experiment."""

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn, world_size: int, port: int, backend: str, timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_local(fn, world_size: int, args: tuple = (), timeout: float = 60.0, backend: str = "gloo") -> None:
    """Call fn(rank, world_size, *args) in `world_size` spawned processes that share a process group.
    A child's exception is re-raised here; ranks still running after `timeout` seconds are killed and
    TimeoutError is raised, so a hang is a failure, not a stuck job. `fn` must be picklable (module level)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank: several ranks share few cores
    context = mp.spawn(_child, args=(fn, world_size, free_port(), backend, timeout, args), nprocs=world_size,
                       join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world_size} local ranks of {fn.__name__} did not finish within {timeout:.0f} s")
