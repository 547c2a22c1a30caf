"""Typed configuration of the parallel layout (SPEC §3): PP x DP x TP ranks, EP carved from DP."""

from dataclasses import dataclass

from moetron.config.errors import invalid

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages (DualPipe: ranks of the pipeline; each holds two stages)
    dp: int = 1  # data-parallel replicas (ZeRO-1 shards the optimizer state over them)
    ep: int = 1  # expert-parallel group size, carved from dp (Megatron); experts are sharded over it
    tp: int = 1  # tensor parallel (1: none, as in the DeepSeek-V3 production layout)
    schedule: str = "1f1b"  # 1f1b | zb1p | dualpipe | dualpipev
    ranks_per_node: int = 0  # 0: the launcher's local world size (LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE)
    overlap: bool = True  # overlap all-to-all with computation in F&B pairs

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp


def validate_parallel(parallel: ParallelConfig, prefix: str = "parallel") -> None:
    for name in ("pp", "dp", "ep", "tp"):
        if getattr(parallel, name) < 1:
            raise invalid(f"{prefix}.{name}", getattr(parallel, name), "a positive integer")
    if parallel.ranks_per_node < 0:
        raise invalid(f"{prefix}.ranks_per_node", parallel.ranks_per_node, "0 (from the launcher) or a positive integer")
    if parallel.dp % parallel.ep:
        raise invalid(f"{prefix}.ep", parallel.ep, f"a divisor of parallel.dp ({parallel.dp})",
                      "Expert-parallel groups are carved from the data-parallel ranks.")
    if parallel.schedule not in SCHEDULES:
        raise invalid(f"{prefix}.schedule", parallel.schedule, " | ".join(SCHEDULES))
