"""`python -m moetron.parallel.simulate --schedule dualpipe --pp 8 --chunks 20 [--f 1 --b 2 ...]`

Prints per-rank busy time, bubble and peak in-flight activations and writes a timeline PNG.
`--pp` is the number of pipeline ranks (DualPipeV: N ranks holding 2N stages).
"""

from __future__ import annotations

import argparse
import sys

from .actions import ScheduleError
from .schedule_check import check_schedule
from .schedules import SCHEDULES, build_schedule
from .simulator import Costs, simulate
from .timeline import plot_timeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.parallel.simulate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--schedule", required=True, choices=sorted(SCHEDULES))
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--chunks", type=int, required=True, help="micro-batches per step")
    parser.add_argument("--f", type=float, default=1.0, help="forward chunk cost")
    parser.add_argument("--b", type=float, default=2.0, help="FULL backward chunk cost (input + weights)")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient part of b")
    parser.add_argument("--fb", type=float, default=None, help="overlapped F&B pair cost (default f+b)")
    parser.add_argument("--p2p", type=float, default=0.0, help="latency of one stage-to-stage transfer")
    parser.add_argument("--png", default=None, help="timeline picture (default: <schedule>_pp<P>_c<C>.png)")
    parser.add_argument("--print-schedule", action="store_true", help="also print every rank's action list")
    args = parser.parse_args(argv)
    try:
        schedule = build_schedule(args.schedule, args.pp, args.chunks)
        check_schedule(schedule)
        result = simulate(schedule, Costs(args.f, args.b, args.w, args.fb, args.p2p))
    except ScheduleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_schedule:
        print(schedule.format())
    png = plot_timeline(result, args.png or f"{args.schedule}_pp{args.pp}_c{args.chunks}.png")
    print(result.report())
    print(f"timeline: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
