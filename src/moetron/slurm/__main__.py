"""`python -m moetron.slurm render|submit [options] [hydra overrides]`.

    render   check the layout against the cluster and write the sbatch script (prints its path)
    submit   render, then sbatch it (prints the job id)

Overrides compose hydra_conf/slurm.yaml (config.yaml + cluster/<name>.yaml); `cluster=...` and
`cluster.*` describe the allocation, every other override is passed on to the trainer. Examples:

    python -m moetron.slurm render cluster=local parallel.pp=2 parallel.dp=2 run.dir=runs/pp2dp2
    python -m moetron.slurm submit cluster=gpu cluster.nodes=4 cluster.partition=gpu parallel.dp=32

Options: -o/--output PATH (default: cluster.script, else <cluster.log_dir>/<cluster.job_name>.sbatch),
--launcher srun|torchrun (default: cluster.launcher). A bad layout or value is reported in one paragraph
naming the fields, with exit code 2, and nothing is written or submitted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from moetron.config.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.slurm", description="Render or submit a moetron Slurm job.",
                                     epilog="Hydra overrides follow the options, e.g. cluster=local parallel.dp=4")
    parser.add_argument("command", choices=("render", "submit"))
    parser.add_argument("-o", "--output", default=None, help="where to write the sbatch script")
    parser.add_argument("--launcher", choices=("srun", "torchrun"), default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (config and cluster)")
    args = parser.parse_intermixed_args(argv)

    from moetron.slurm.render import load, render

    try:
        config = load(args.overrides)
        text = render(config, args.overrides, args.launcher)
    except ConfigError as err:
        print(f"moetron.slurm: error: {err}", file=sys.stderr)
        return 2
    c = config.cluster
    out = Path(args.output or c.script or os.path.join(c.log_dir, f"{c.job_name}.sbatch"))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(c.workdir or ".", c.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch needs the --output directory
    out.write_text(text)
    out.chmod(0o755)
    if args.command == "render":
        print(out)
        return 0
    result = subprocess.run(["sbatch", "--parsable", str(out)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"moetron.slurm: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode or 1
    job_id = result.stdout.strip().split(";")[0]
    print(f"moetron.slurm: submitted job {job_id} ({out})", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
