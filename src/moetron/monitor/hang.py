"""`python -m moetron.monitor.hang RUN_DIR`: which rank stalled a hung run, and in which collective.

Reads the flight records the ranks' watchdogs wrote to RUN_DIR/hang/ (moetron/monitor/watchdog.py), keeps
those of the newest launch, and names the stalled rank: a rank without a record (a stopped or dead process
cannot write one) is the culprit, and what its peers wait for is the collective; when every rank wrote one
(a deadlock, or a rank stuck in its own compute), the rank whose last progress is the earliest stopped first,
and the collective is the one it is stuck in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moetron.monitor.watchdog import HANG_DIR, describe, stuck_flight


class HangReportError(ValueError):
    """RUN_DIR has no readable flight records: one paragraph for the user."""


@dataclass
class Diagnosis:
    stalled: list[int]  # the rank(s) that stalled the run
    missing: bool  # True: they wrote no record (stopped or dead), False: the earliest last progress
    collective: dict | None  # the flight the run is stuck in (a peer's wait when the stalled rank wrote none)
    waiting: list[tuple[int, dict]]  # (rank, its stuck flight) of the ranks that wait for the stalled one


def load(run_dir: Path) -> list[dict]:
    """The newest launch's records, by rank."""
    hang = Path(run_dir) / HANG_DIR
    if not Path(run_dir).is_dir():
        raise HangReportError(f"Invalid value for RUN_DIR: {str(run_dir)!r} is not a directory. Valid: the "
                              "run.dir of a run whose ranks timed out (it holds hang/rank_R.json).")
    files = sorted(hang.glob("rank_*.json")) if hang.is_dir() else []
    records = []
    for path in files:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise HangReportError(f"Invalid flight record {path}: {err}. Valid: the JSON a rank's watchdog "
                                  "writes; delete the file and read the others.") from err
    if not records:
        raise HangReportError(
            f"Invalid value for RUN_DIR: {str(run_dir)!r} holds no flight records ({hang}/rank_R.json). Valid: "
            "the run.dir of a run whose ranks timed out: each rank's watchdog writes one when it made no "
            "progress for parallel.comm_timeout seconds, then exits 124.")
    newest = max(records, key=lambda r: r["written"])["incarnation"]
    return sorted((r for r in records if r["incarnation"] == newest), key=lambda r: r["rank"])


def _signature(flight: dict) -> tuple:
    return flight["kind"], flight["group"], flight["what"]


def diagnose(records: list[dict]) -> Diagnosis:
    world = max(r["world"] for r in records)
    present = {r["rank"] for r in records}
    missing = sorted(set(range(world)) - present)
    if missing:
        # What the writers wait for, among the collectives that need a missing rank.
        stuck = [(r["rank"], f) for r in records if (f := stuck_flight(r)) is not None]
        needing = [(rank, f) for rank, f in stuck if set(f["ranks"]) & set(missing)] or stuck
        if not needing:
            return Diagnosis(missing, True, None, [])
        # The collective: the one most waiting ranks are stuck in, the earliest issued of those.
        common, _ = Counter(_signature(f) for _, f in needing).most_common(1)[0]
        first = min((f for _, f in needing if _signature(f) == common), key=lambda f: f["issued"])
        return Diagnosis(missing, True, first, needing)
    earliest = min(records, key=lambda r: r["last_activity"])
    stuck = stuck_flight(earliest)
    collective = stuck if stuck is not None else (earliest["flights"][-1] if earliest["flights"] else None)
    waiting = [(r["rank"], f) for r in records if r is not earliest and (f := stuck_flight(r)) is not None]
    return Diagnosis([earliest["rank"]], False, collective, waiting)


def table(records: list[dict]) -> str:
    rows = [f"{'rank':>4}  {'step':>6}  {'idle s':>7}  waiting for"]
    for r in records:
        idle = r["written"] - r["last_activity"]
        rows.append(f"{r['rank']:>4}  {r['step']:>6}  {idle:>7.1f}  {describe(stuck_flight(r))}")
    return "\n".join(rows)


def summary(diagnosis: Diagnosis) -> str:
    ranks = ", ".join(map(str, diagnosis.stalled))
    noun = "ranks" if len(diagnosis.stalled) > 1 else "rank"
    if diagnosis.missing:
        head = f"stalled: {noun} {ranks} (wrote no flight record: stopped or dead)"
        if diagnosis.collective is None:
            return head + "; the other ranks were not inside a collective."
        waits = "; ".join(f"rank {rank} in {describe(f)}" for rank, f in diagnosis.waiting)
        return f"{head}, in {describe(diagnosis.collective)}. Waiting for it: {waits}."
    return (f"stalled: {noun} {ranks} (its last progress is the earliest), in "
            f"{describe(diagnosis.collective)}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.monitor.hang", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run.dir of the hung run")
    args = parser.parse_args(argv)
    try:
        records = load(args.run_dir)
    except HangReportError as err:
        print(f"moetron: error: {err}", file=sys.stderr)
        return 2
    print(table(records))
    print(summary(diagnose(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
