"""A rank's hang watchdog: a thread that notices when the rank stops making progress and ends it.

Progress is anything the rank's FlightRecorder (moetron.comm.recorder) sees: a collective or pipeline
transfer issued or completed, a step begun. When none happens for `parallel.comm_timeout` seconds (a peer
stopped, died or deadlocked, so a collective never completes), the watchdog writes the rank's flight record
to `run.dir/hang/rank_R.json` (atomically), prints one paragraph to stderr and ends the process with exit
code EXIT_HANG, so the launcher (torchrun --max-restarts, a requeued job) restarts the job, which resumes
from its newest checkpoint. `python -m moetron.monitor.hang RUN_DIR` reads the records and names the
stalled rank. The watchdog uses no collective (a stopped peer would block it too) and `os._exit`, because
the main thread may be blocked inside the backend where no exception reaches it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

EXIT_HANG = 124  # as timeout(1): the rank gave up waiting; its flight record is in run.dir/hang/
HANG_DIR = "hang"


def stuck_flight(record: dict) -> dict | None:
    """The collective a rank's record shows it stuck in: the incomplete one it last began to wait for, else its
    oldest incomplete one (None: none open). Transfers posted ahead are incomplete without being waited for."""
    open_ = [f for f in record["flights"] if f["completed"] is None]
    waited = [f for f in open_ if f.get("waited") is not None]
    if waited:
        return max(waited, key=lambda f: f["waited"])
    return min(open_, key=lambda f: f["issued"]) if open_ else None


def describe(flight: dict | None) -> str:
    """`all_reduce "loss sums" on world (ranks 0,1,2,3), micro-batch 2, layer 1`, in a few words."""
    if flight is None:
        return "no collective (compute or I/O)"
    text = f"{flight['kind']}"
    if flight["what"]:
        text += f' "{flight["what"]}"'
    text += f" on {flight['group']}"
    if not flight["group"].startswith("ranks") and "peer" not in flight["group"]:
        text += f" (ranks {','.join(map(str, flight['ranks']))})"
    for key, label in (("micro_batch", "micro-batch"), ("layer", "layer")):
        if flight.get(key) is not None:
            text += f", {label} {flight[key]}"
    return text


class HangWatchdog:
    """Watches `flight` (a FlightRecorder) from a daemon thread; `run_dir/hang/rank_R.json` is its report.
    `incarnation` is the same on every rank of one launch (the analysis reads only the newest launch's
    records); `exit` is os._exit except in tests."""

    def __init__(self, flight, timeout: float, run_dir: Path, world: int, incarnation: str, exit=os._exit,
                 stream=None):
        self.flight, self.timeout, self.world, self.incarnation = flight, timeout, world, incarnation
        self.path = Path(run_dir) / HANG_DIR / f"rank_{flight.rank}.json"
        self._exit, self._stream = exit, stream
        self._stop = threading.Event()
        self._tripped = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="moetron-hang-watchdog", daemon=True)

    def start(self) -> HangWatchdog:
        self.flight.beat(self.flight.step)  # the time before (building the model) is not a hang
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        interval = min(1.0, self.timeout / 10)
        while not self._stop.wait(interval):
            idle = self.flight.idle_seconds()
            if idle > self.timeout:
                self.trip(f"no progress for {idle:.1f} s (parallel.comm_timeout={self.timeout:g})")
                return

    def trip(self, reason: str) -> None:
        """Write the flight record, say what this rank waits for, and end the process (once)."""
        if not self._tripped.acquire(blocking=False):
            return
        record = self.flight.snapshot()
        now = time.time()
        record.update(world=self.world, incarnation=self.incarnation, written=now, timeout=self.timeout,
                      reason=reason, pid=os.getpid())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.path)
        stuck = stuck_flight(record)
        waited = f", issued {now - stuck['issued']:.1f} s ago" if stuck is not None else ""
        print(f"moetron: hang: rank {self.flight.rank} (step {record['step']}): {reason}; it waits for "
              f"{describe(stuck)}{waited}. Its last {len(record['flights'])} collectives are in {self.path}. "
              f"Exiting {EXIT_HANG} so the launcher restarts the job from its newest checkpoint; "
              f"`python -m moetron.monitor.hang {self.path.parent.parent}` names the stalled rank.",
              file=self._stream or sys.stderr, flush=True)
        self._exit(EXIT_HANG)
