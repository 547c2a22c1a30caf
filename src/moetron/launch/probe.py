"""`python -m moetron.launch.probe [--launcher auto] [--backend gloo] [ignored...]`: check a job's wiring.

Every rank bootstraps (torchrun, srun or mpiexec), joins a process group, all-reduces rank + 1 and
all-gathers every rank's view; each prints one line `probe {json}` with its rank, local rank, world size,
ranks per node, node index, node name and whether the collectives agreed. Exit 0 only if they did.
Extra arguments (e.g. Hydra overrides a rendered job passes) are ignored.
"""

import argparse
import json
import os
import socket
import sys

from moetron.config.errors import ConfigError
from moetron.launch.bootstrap import LAUNCHERS, detect, export_env, init_process_group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.launch.probe")
    parser.add_argument("--launcher", default=os.environ.get("MOETRON_LAUNCHER", "auto"), choices=LAUNCHERS)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=120.0)
    args, _ignored = parser.parse_known_args(argv)
    try:
        info = detect(args.launcher)
    except ConfigError as err:
        print(f"probe: error: {err}", file=sys.stderr)
        return 2
    export_env(info)

    import torch
    import torch.distributed as dist

    init_process_group(info, args.backend, args.timeout)
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    mine = dict(rank=info.rank, local_rank=info.local_rank, node_rank=info.node_rank, node=node)
    views: list = [None] * info.world_size
    dist.all_gather_object(views, mine)
    expected = info.world_size * (info.world_size + 1) / 2
    ok = (total.item() == expected and [v["rank"] for v in views] == list(range(info.world_size))
          and len({v["node_rank"] for v in views}) == info.num_nodes)
    report = dict(launcher=info.launcher, rank=info.rank, local_rank=info.local_rank, world_size=info.world_size,
                  ranks_per_node=info.ranks_per_node, node_rank=info.node_rank, num_nodes=info.num_nodes, node=node,
                  master=f"{info.master_addr}:{info.master_port}", allreduce=total.item(), expected=expected,
                  nodes_seen=sorted({v["node"] for v in views}), ok=ok,
                  restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
    # One write per line: ranks share stdout under mpiexec/srun, and print() writes the newline separately.
    sys.stdout.write("probe " + json.dumps(report) + "\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
