"""Typed configuration of the parallel layout (arXiv 2412.19437 §3.2): PP x DP x TP ranks, EP carved from DP."""

from dataclasses import dataclass

from moetron.config.checks import require_finite
from moetron.config.errors import invalid


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages (DualPipe: ranks of the pipeline; each holds two stages)
    dp: int = 1  # data-parallel replicas (ZeRO-1 shards the optimizer state over them)
    ep: int = 1  # expert-parallel group size, carved from dp (Megatron); experts are sharded over it
    tp: int = 1  # tensor parallel (1: none, as in the DeepSeek-V3 production layout)
    schedule: str = "1f1b"  # 1f1b | zb1p | dualpipe | dualpipev
    ranks_per_node: int = 0  # 0: the launcher's local world size (LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE)
    ep_dispatch: str = "two_hop"  # two_hop (across nodes once per node, then inside the node) | flat
    overlap: bool = True  # overlap all-to-all with computation in F&B pairs (when moetron.comm.overlap is there)
    # tp-dp-pp: a stage's DP (and EP) ranks are neighbours, i.e. on one node when they fit (Megatron's order);
    # tp-pp-dp: the pipeline ranks are neighbours, so DP/EP groups span the nodes (the arXiv 2412.19437 §3.2 layout:
    # EP across nodes, e.g. 4 ranks = 2 nodes x 2 with DualPipe pp=2 and EP 2 over both nodes).
    rank_order: str = "tp-dp-pp"
    zero1: bool = True  # shard the AdamW state (moments) over the data-parallel replicas (ZeRO stage 1)
    # Memory savings of arXiv 2412.19437 §3.2 (distributed trainer):
    recompute: bool = False  # recompute every RMSNorm and the MLA up-projections in backward
    ema: bool = False  # keep an exponential moving average of the weights in CPU memory (saved in checkpoints)
    ema_decay: float = 0.999
    # > 0: time the all-to-alls by comm/link_model.py (NVLink 160 / IB 50 GB/s times this factor) instead of
    # the local transport's own speed, for studies of layouts and overlap on a small machine. 0: off.
    link_model_scale: float = 0.0
    # Seconds a collective, pipeline transfer or step may go without progress before this rank's watchdog
    # writes run.dir/hang/rank_R.json and exits 124 (monitor/watchdog.py). The process group's own timeout, a
    # backstop, is twice this (at least 5 minutes: it also bounds the start-up rendezvous).
    comm_timeout: float = 600.0

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp


def validate_parallel(parallel: ParallelConfig, prefix: str = "parallel") -> None:
    # The lists of valid values live with the code that implements them (imported here, late, because
    # moetron.parallel and moetron.comm import torch.distributed and the FP8 wire format).
    from moetron.comm.dispatch import MODES
    from moetron.parallel.mesh import RANK_ORDERS
    from moetron.parallel.schedules import SCHEDULES

    require_finite(parallel, prefix)
    for name in ("pp", "dp", "ep", "tp"):
        if not getattr(parallel, name) >= 1:
            raise invalid(f"{prefix}.{name}", getattr(parallel, name), "a positive integer")
    if parallel.ep_dispatch not in MODES:
        raise invalid(f"{prefix}.ep_dispatch", parallel.ep_dispatch, " | ".join(MODES))
    if not parallel.link_model_scale >= 0:
        raise invalid(f"{prefix}.link_model_scale", parallel.link_model_scale, "0 (off) or a positive factor")
    if not parallel.comm_timeout > 0:
        raise invalid(f"{prefix}.comm_timeout", parallel.comm_timeout, "a positive number of seconds")
    if not parallel.ranks_per_node >= 0:
        raise invalid(f"{prefix}.ranks_per_node", parallel.ranks_per_node, "0 (from the launcher) or a positive integer")
    if parallel.dp % parallel.ep:
        raise invalid(f"{prefix}.ep", parallel.ep, f"a divisor of parallel.dp ({parallel.dp})",
                      "Expert-parallel groups are carved from the data-parallel ranks.")
    if not 0.0 <= parallel.ema_decay < 1.0:
        raise invalid(f"{prefix}.ema_decay", parallel.ema_decay, "a number in [0, 1)")
    if parallel.rank_order not in RANK_ORDERS:
        raise invalid(f"{prefix}.rank_order", parallel.rank_order, " | ".join(RANK_ORDERS))
    if parallel.schedule not in SCHEDULES:
        raise invalid(f"{prefix}.schedule", parallel.schedule, " | ".join(SCHEDULES))
