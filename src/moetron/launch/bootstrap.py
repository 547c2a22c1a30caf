"""Rank, local rank, world size and ranks per node from torchrun, Slurm (srun) or MPI (mpi4py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

from moetron.config.errors import ConfigError

LAUNCHERS = ("auto", "torchrun", "slurm", "mpi", "single")
DEFAULT_PORT = 29500
# Environment variables that mean "started by an MPI launcher" (MPICH/Hydra, Open MPI, PMIx, Intel MPI).
MPI_MARKERS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


@dataclass(frozen=True)
class RankInfo:
    launcher: str  # torchrun | slurm | mpi | single
    rank: int
    local_rank: int
    world_size: int
    ranks_per_node: int  # processes on this node (the same on every node)
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def check(self) -> RankInfo:
        """Ranks must be laid out by node (rank // ranks_per_node == node), as the process mesh assumes."""
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.ranks_per_node):
            raise ConfigError(f"Inconsistent {self.launcher} environment: rank {self.rank} of {self.world_size}, "
                              f"local rank {self.local_rank} of {self.ranks_per_node}.")
        if self.world_size != self.ranks_per_node * self.num_nodes:
            raise ConfigError(
                f"Invalid {self.launcher} layout: world size {self.world_size} is not {self.num_nodes} nodes x "
                f"{self.ranks_per_node} ranks per node. Valid: the same number of ranks on every node "
                f"(srun --ntasks-per-node, torchrun --nproc-per-node).")
        if self.rank // self.ranks_per_node != self.node_rank or self.rank % self.ranks_per_node != self.local_rank:
            raise ConfigError(
                f"Invalid {self.launcher} rank placement: rank {self.rank} is local rank {self.local_rank} on node "
                f"{self.node_rank}, but moetron places global rank g on node g // ranks_per_node "
                f"({self.ranks_per_node}). Valid: block distribution (srun --distribution=block, "
                f"mpiexec's default fill-the-node mapping).")
        return self


def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env.get(name)
    if value is None:
        raise ConfigError(f"The {launcher} environment lacks {name}; was this process started by {launcher}?")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"Invalid value for environment variable {name}: {value!r}. Valid: an integer.") from None


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ConfigError(f"Invalid value for SLURM_STEP_TASKS_PER_NODE: {spec!r}. Valid: like '2(x2)' or '4,4'.")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('node[1-2]' -> 'node1'), via scontrol when it is there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]  # the first entry outside brackets
    m = re.fullmatch(r"([^\[]+)\[([^\]]+)\](.*)", head)
    if not m:
        return head
    first = re.split(r"[,-]", m.group(2))[0]
    return f"{m.group(1)}{first}{m.group(3)}"


def from_torchrun(env: Mapping[str, str]) -> RankInfo:
    world = _int(env, "WORLD_SIZE", "torchrun")
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    rank = _int(env, "RANK", "torchrun")
    return RankInfo(
        launcher="torchrun", rank=rank, local_rank=_int(env, "LOCAL_RANK", "torchrun"), world_size=world,
        ranks_per_node=local_world, node_rank=int(env.get("GROUP_RANK", rank // local_world)),
        num_nodes=max(1, world // local_world), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
    ).check()


def from_slurm(env: Mapping[str, str]) -> RankInfo:
    rank = _int(env, "SLURM_PROCID", "srun")
    world = _int(env, "SLURM_NTASKS", "srun")
    node = _int(env, "SLURM_NODEID", "srun")
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec is None:
        raise ConfigError("The srun environment lacks SLURM_STEP_TASKS_PER_NODE; was this process started by srun?")
    counts = parse_tasks_per_node(spec)
    if len(set(counts)) != 1:
        raise ConfigError(f"Invalid Slurm layout: tasks per node {spec!r} differ between nodes. Valid: the same "
                          f"number on every node (sbatch --ntasks-per-node=N).")
    addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    port = int(env.get("MASTER_PORT") or DEFAULT_PORT + int(env.get("SLURM_JOB_ID", 0)) % 20000)
    return RankInfo(launcher="slurm", rank=rank, local_rank=_int(env, "SLURM_LOCALID", "srun"), world_size=world,
                    ranks_per_node=counts[0], node_rank=node, num_nodes=len(counts), master_addr=addr or "127.0.0.1",
                    master_port=port).check()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def from_mpi(comm=None, env: Mapping[str, str] | None = None, shared_type=None) -> RankInfo:
    """COLLECTIVE over `comm` (default MPI.COMM_WORLD): every rank must call it. `shared_type` is the split
    type that groups the ranks of one node (default MPI.COMM_TYPE_SHARED)."""
    env = os.environ if env is None else env
    if comm is None or shared_type is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise ConfigError("The MPI launcher needs mpi4py: pip install 'moetron[mpi]' (mpi4py with an MPI "
                              "library such as the `mpich` wheel).") from None
        comm = MPI.COMM_WORLD if comm is None else comm
        shared_type = MPI.COMM_TYPE_SHARED if shared_type is None else shared_type
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(shared_type, key=rank)  # the ranks sharing my node's memory
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
        leader = local.bcast(rank, root=0)  # my node's lowest global rank names the node
    finally:
        local.Free()
    leaders = sorted(set(comm.allgather(leader)))
    sizes = set(comm.allgather(local_size))
    if len(sizes) != 1:
        raise ConfigError(f"Invalid MPI layout: ranks per node {sorted(sizes)} differ between nodes. Valid: the "
                          f"same number on every node (mpiexec -ppn N).")
    addr, port = None, None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or socket.gethostname()
        port = int(env.get("MASTER_PORT") or _free_port())
    addr, port = comm.bcast((addr, port), root=0)
    return RankInfo(launcher="mpi", rank=rank, local_rank=local_rank, world_size=world, ranks_per_node=local_size,
                    node_rank=leaders.index(leader), num_nodes=len(leaders), master_addr=addr,
                    master_port=port).check()


def which_launcher(env: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return "torchrun"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # inside an srun step, not the batch shell
        return "slurm"
    if any(k in env for k in MPI_MARKERS):
        return "mpi"
    return "single"


def detect(launcher: str = "auto", env: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise ConfigError(f"Invalid value for `launcher`: {launcher!r}. Valid: {' | '.join(LAUNCHERS)}.")
    if launcher == "auto":
        launcher = which_launcher(env)
    if launcher == "torchrun":
        return from_torchrun(env)
    if launcher == "slurm":
        return from_slurm(env)
    if launcher == "mpi":
        return from_mpi(env=env)
    return RankInfo("single", 0, 0, 1, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                    int(env.get("MASTER_PORT") or DEFAULT_PORT))


def export_env(info: RankInfo, env: MutableMapping[str, str] | None = None) -> None:
    """Write the torchrun variables (what torch's env:// init and the trainer read)."""
    env = os.environ if env is None else env
    env.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size),
               LOCAL_WORLD_SIZE=str(info.ranks_per_node), GROUP_RANK=str(info.node_rank),
               NODE_RANK=str(info.node_rank), MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))


def init_process_group(info: RankInfo, backend: str = "gloo", timeout_s: float = 300.0):
    """torch.distributed over a TCP store at MASTER_ADDR:MASTER_PORT (rank 0 hosts it)."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD
