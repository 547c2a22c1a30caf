"""The run directory's JSON-lines files: metrics.jsonl (one object per logged step) and events.jsonl."""

import json
import time
from pathlib import Path


class JsonLines:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written by a run that stopped before its next checkpoint)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


class EventLog(JsonLines):
    def event(self, name: str, step: int, **fields) -> None:
        self.write({"time": round(time.time(), 3), "event": name, "step": step, **fields})
