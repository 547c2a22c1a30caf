"""The run directory's JSON-lines files: metrics.jsonl (one object per logged step) and events.jsonl.

Records are strict JSON: a NaN or infinite number is written as the string "nan", "inf" or "-inf" (bare NaN
is not JSON, and other tools refuse it). A run killed while appending can leave a torn last line: readers
drop it, and the writer removes it (rewriting the file atomically) before it appends again. A damaged line
anywhere else is an error naming the file and the line.
"""

import json
import math
import os
import time
from pathlib import Path

from moetron.config import ConfigError


def strict(value):
    """`value` with every non-finite float replaced by its name ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def number(value) -> float | None:
    """A logged number back as a float ("nan"/"inf" strings and legacy bare NaN included); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def dumps(record: dict) -> str:
    return json.dumps(strict(record), allow_nan=False)


def parse_lines(path: Path, text: str) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file's `text`, and whether its last line was torn (dropped)."""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is what follows the last newline: a torn line or ""
    records = []
    for lineno, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == len(complete) and not tail.strip():  # the last line, torn mid-record
                return records, True
            raise ConfigError(f"Run file {path} has a damaged line {lineno} ({err.msg}). Valid: one JSON object "
                              "per line, as moetron writes; remove or repair that line.") from None
    if tail.strip():  # no newline after it: the write was cut short (even if what is there parses)
        return records, True
    return records, False


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it does not exist), a torn last line dropped."""
    if not path.exists():
        return []
    return parse_lines(path, path.read_text())[0]


def write_atomic(path: Path, records: list[dict]) -> None:
    """Replace `path` with `records`, so a crash leaves the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonLines:
    def __init__(self, path: Path):
        self.path = path
        self._repaired = False  # a torn last line is removed once, before this writer's first append

    def write(self, record: dict) -> None:
        self._repair()
        with open(self.path, "a") as f:
            f.write(dumps(record) + "\n")

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written by a run that stopped before its next checkpoint)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_atomic(self.path, kept)
        self._repaired = True

    def _repair(self) -> None:
        if self._repaired:
            return
        self._repaired = True
        if self.path.exists():
            records, torn = parse_lines(self.path, self.path.read_text())
            if torn:
                write_atomic(self.path, records)


class EventLog(JsonLines):
    def event(self, name: str, step: int, **fields) -> None:
        self.write({"time": round(time.time(), 3), "event": name, "step": step, **fields})
