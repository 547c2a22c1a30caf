"""Typed configuration of a Slurm cluster (hydra_conf/cluster/*.yaml), used by `python -m moetron.slurm`.

`SlurmJobConfig` is the root schema of hydra_conf/slurm.yaml: the whole training config plus `cluster`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from moetron.config import MoetronConfig
from moetron.config.errors import invalid

LAUNCHERS = ("torchrun", "srun")  # torchrun: one srun task per node; srun: one srun task per rank
_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+")
# What reaches the sbatch script must not end the #SBATCH block (a newline) or be read by the shell as
# anything but a word: names, paths and sizes are letters, digits and _ . , : + = @ % / - only.
_PLAIN = re.compile(r"[A-Za-z0-9_.,:+=@%/-]*")
_PLAIN_VALID = "letters, digits and _ . , : + = @ % / - (no spaces, quotes, control or shell characters)"
_PLAIN_FIELDS = ("name", "partition", "account", "qos", "mem", "log_dir", "workdir", "python", "script", "mpi",
                 "mpi_library")
# Extra sbatch options may also use Slurm's constraint operators (--constraint=[a100|h100]&ib).
_SBATCH_OPTION = re.compile(r"-[A-Za-z0-9_.,:+=@%/|&\[\]*-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Container images name a registry with `#` (enroot: nvcr.io#nvidia/pytorch:25.01-py3); quoted in the script.
_IMAGE = re.compile(r"[A-Za-z0-9_.,:+=@%/#-]*")
_MOUNT = re.compile(r"[A-Za-z0-9_.:+=@%/-]+")  # SRC:DST[:FLAGS]; the list is joined with commas
_NCCL_VALUE = re.compile(r"[A-Za-z0-9_.,:=^/-]*")  # NCCL_IB_HCA "=mlx5_0:1,mlx5_1:1", NCCL_SOCKET_IFNAME "^lo,docker"


@dataclass
class ClusterConfig:
    name: str = "local"
    partition: str = ""  # sbatch --partition ("" leaves the cluster default)
    account: str = ""  # sbatch --account
    qos: str = ""  # sbatch --qos
    nodes: int = 1
    gpus_per_node: int = 0  # GPUs requested per node (--gpus-per-node); 0 on CPU clusters
    ranks_per_node: int = 0  # processes per node; 0: gpus_per_node (one rank per GPU), or 1 without GPUs
    cpus_per_rank: int = 1  # --cpus-per-task (per rank; per node x ranks for the torchrun launcher)
    mem: str = ""  # --mem per node, e.g. 200G ("" leaves the default)
    time: str = "01:00:00"  # --time limit
    launcher: str = "torchrun"  # torchrun | srun
    job_name: str = "moetron"
    signal_seconds: int = 300  # --signal=B:USR1@N: warn the batch shell N seconds before the time limit
    requeue: bool = True  # --requeue, and requeue the job when the trainer exits 75 (checkpointed, stopped)
    max_requeues: int = 20  # stop requeueing after this many restarts (SLURM_RESTART_COUNT)
    log_dir: str = "slurm-logs"  # batch log <log_dir>/<job>-<id>.out; per-rank logs in <log_dir>/<id>/
    workdir: str = ""  # directory the job runs in ("" : where sbatch was run)
    python: str = "python"  # interpreter on the compute nodes (e.g. /shared/moetron/.venv/bin/python)
    module: str = "moetron.train"  # what every rank runs: python -m <module> <training overrides>
    rdzv_port: int = 29500  # rendezvous / MASTER_PORT base; the job id is added to avoid clashes
    script: str = ""  # where `render` writes the sbatch script ("" : <log_dir>/<job_name>.sbatch)
    nccl: bool = True  # export NCCL/CUDA settings (CUDA_DEVICE_MAX_CONNECTIONS=1, NCCL async errors, ...)
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, source venv, ...)
    sbatch_extra: list[str] = field(default_factory=list)  # extra sbatch options, e.g. "--exclusive"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every rank
    # Site conventions. Every srun step (preflight and training) gets these:
    container_image: str = ""  # pyxis/enroot: srun --container-image (e.g. nvcr.io#nvidia/pytorch:25.01-py3)
    container_mounts: list[str] = field(default_factory=list)  # srun --container-mounts, "SRC:DST[:ro]" each
    srun_extra: list[str] = field(default_factory=list)  # extra srun options, e.g. "--cpu-bind=none"
    mpi: str = ""  # srun --mpi=<plugin> (pmix, pmi2) for the site's MPI ("" : Slurm's default)
    mpi_library: str = ""  # the site's libmpi.so for mpi4py (MPI4PY_LIBMPI) instead of the bundled mpich wheel
    kill_on_bad_exit: bool = True  # srun --kill-on-bad-exit=1: one failed rank ends the step, not a hang
    # NCCL / InfiniBand (with nccl: true). "" leaves NCCL's auto-detection.
    nccl_ib_hca: str = ""  # NCCL_IB_HCA, e.g. "mlx5_0,mlx5_1" or "=mlx5_0:1"
    nccl_socket_ifname: str = ""  # NCCL_SOCKET_IFNAME: the interface NCCL bootstraps on, e.g. "ib0" or "^lo,docker"
    # The NCCL flight recorder: the last N collectives of each rank, dumped into <run.dir>/nccl_trace/ when a
    # collective times out (TORCH_NCCL_TRACE_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT). 0: off.
    nccl_trace_buffer: int = 2000
    # The preflight (python -m moetron.launch.preflight), the first job step: devices, all-reduce and all-to-all
    # within and across nodes, free disk at run.dir, one code version everywhere. A failed check ends the job.
    preflight: bool = True
    preflight_min_free_gb: float = 10.0  # free disk at run.dir below this fails the preflight
    preflight_mb: float = 64.0  # message size of the timed collectives (MB per rank)

    @property
    def rpn(self) -> int:
        """Ranks per node, resolved."""
        if self.ranks_per_node:
            return self.ranks_per_node
        return self.gpus_per_node or 1


@dataclass
class SlurmJobConfig(MoetronConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def validate_cluster(c: ClusterConfig, prefix: str = "cluster") -> None:
    for name in ("nodes", "cpus_per_rank"):
        if getattr(c, name) < 1:
            raise invalid(f"{prefix}.{name}", getattr(c, name), "a positive integer")
    for name in ("gpus_per_node", "ranks_per_node", "signal_seconds", "max_requeues"):
        if getattr(c, name) < 0:
            raise invalid(f"{prefix}.{name}", getattr(c, name), "an integer >= 0")
    if c.launcher not in LAUNCHERS:
        raise invalid(f"{prefix}.launcher", c.launcher, " | ".join(LAUNCHERS))
    if c.gpus_per_node and c.ranks_per_node and c.ranks_per_node != c.gpus_per_node:
        raise invalid(f"{prefix}.ranks_per_node", c.ranks_per_node,
                      f"0 or cluster.gpus_per_node ({c.gpus_per_node})", "Each rank drives one GPU.")
    for name in _PLAIN_FIELDS:
        if not _PLAIN.fullmatch(getattr(c, name)):
            raise invalid(f"{prefix}.{name}", getattr(c, name), _PLAIN_VALID)
    if not _TIME.fullmatch(c.time):
        raise invalid(f"{prefix}.time", c.time, "a Slurm time such as 30, 04:00:00 or 2-00:00:00")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", c.job_name):
        raise invalid(f"{prefix}.job_name", c.job_name, "letters, digits and _ . + -")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", c.module):
        raise invalid(f"{prefix}.module", c.module, "a Python module path such as moetron.train")
    if not 1024 <= c.rdzv_port <= 45000:
        raise invalid(f"{prefix}.rdzv_port", c.rdzv_port, "1024..45000 (the job id modulo 20000 is added)")
    for key, value in c.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise invalid(f"{prefix}.env", key, "environment variable names (letters, digits, _)")
        if _CONTROL.search(str(value)):  # the value itself is quoted in the script (shlex.quote)
            raise invalid(f"{prefix}.env.{key}", value, "a value without control characters (newlines, tabs, ...)")
    for i, line in enumerate(c.setup):  # shell lines by design (module load ..., source ...), one line each
        if _CONTROL.search(line):
            raise invalid(f"{prefix}.setup[{i}]", line, "one shell line without control characters; give "
                          "several lines as several list items")
    for name in ("sbatch_extra", "srun_extra"):
        for i, line in enumerate(getattr(c, name)):
            if not _SBATCH_OPTION.fullmatch(line):
                raise invalid(f"{prefix}.{name}[{i}]", line, f"one {name.split('_')[0]} option such as '--exclusive' "
                              "or '--constraint=a100|h100': letters, digits and _ . , : + = @ % / - | & [ ] *, no "
                              "spaces, quotes, control or shell characters")
    if not _IMAGE.fullmatch(c.container_image):
        raise invalid(f"{prefix}.container_image", c.container_image, "an image such as nvcr.io#nvidia/pytorch:25.01-py3 "
                      "or /shared/images/moetron.sqsh: letters, digits and _ . , : + = @ % / # -")
    for i, mount in enumerate(c.container_mounts):
        if not _MOUNT.fullmatch(mount):
            raise invalid(f"{prefix}.container_mounts[{i}]", mount, "SRC:DST or SRC:DST:ro, letters, digits and "
                          "_ . : + = @ % / - (one mount per item, no commas, spaces or shell characters)")
    if c.container_mounts and not c.container_image:
        raise invalid(f"{prefix}.container_mounts", c.container_mounts, "[] without cluster.container_image",
                      "Mounts belong to a container.")
    for name in ("nccl_ib_hca", "nccl_socket_ifname"):
        if not _NCCL_VALUE.fullmatch(getattr(c, name)):
            raise invalid(f"{prefix}.{name}", getattr(c, name), "an NCCL list such as mlx5_0,mlx5_1 or ^lo,docker: "
                          "letters, digits and _ . , : = ^ / -")
    if c.nccl_trace_buffer < 0:
        raise invalid(f"{prefix}.nccl_trace_buffer", c.nccl_trace_buffer, "an integer >= 0 (0: no flight recorder)")
    for name in ("preflight_min_free_gb", "preflight_mb"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value >= 0):
            raise invalid(f"{prefix}.{name}", value, "a finite number >= 0")
