"""One trainer per run directory: a second one on the same run.dir would interleave checkpoints and logs.

Rank 0 holds an exclusive `flock` on `run.dir/.lock` for the run's lifetime (released when the process ends,
however it ends, so a killed run never leaves a stale lock) and writes its pid and host into it, so the
refusal a second trainer gets names the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._file = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else a description of the holder."""
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            handle.close()
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
            return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {since}"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle.flush()
        self._file = handle
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
