"""`python -m moetron.launch MODULE [ARGS...]`: bootstrap the rank (torchrun, srun or mpiexec), export the
torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then run
MODULE as __main__ with ARGS, e.g.

    srun python -m moetron.launch moetron.train run.dir=runs/x parallel.pp=2
    mpiexec -n 4 python -m moetron.launch moetron.train run.dir=runs/x

MOETRON_LAUNCHER=torchrun|slurm|mpi|single forces a launcher (default: detected from the environment).
"""

import os
import runpy
import sys

from moetron.config.errors import ConfigError
from moetron.launch.bootstrap import detect, export_env


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    try:
        info = detect(os.environ.get("MOETRON_LAUNCHER", "auto"))
    except ConfigError as err:
        print(f"moetron.launch: error: {err}", file=sys.stderr)
        sys.exit(2)
    export_env(info)
    module, *args = argv
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
