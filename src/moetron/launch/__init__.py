"""Rank bootstrap: who am I in the job, whatever started the processes.

Three launchers are understood, each giving the same `RankInfo` (rank, local rank, world size, ranks per
node, node index, rendezvous address):

  torchrun  RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / GROUP_RANK / MASTER_ADDR / MASTER_PORT
  slurm     one `srun` task per rank: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_NODEID /
            SLURM_STEP_TASKS_PER_NODE; MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST
  mpi       mpiexec/mpirun: rank and size from MPI.COMM_WORLD (mpi4py), the local rank from a
            shared-memory split, MASTER_ADDR and MASTER_PORT broadcast from rank 0

`export_env(info)` writes the torchrun variables, so code that reads them (torch's env:// init, the
trainer) runs unchanged under srun or mpiexec. `python -m moetron.launch MODULE [ARGS]` does exactly that
and then runs MODULE as __main__; `python -m moetron.launch.probe` checks a job's wiring.
"""

from moetron.launch.bootstrap import (
    LAUNCHERS,
    RankInfo,
    detect,
    export_env,
    from_mpi,
    from_slurm,
    from_torchrun,
    init_process_group,
    parse_tasks_per_node,
)

__all__ = [
    "LAUNCHERS", "RankInfo", "detect", "export_env", "from_mpi", "from_slurm", "from_torchrun",
    "init_process_group", "parse_tasks_per_node",
]
