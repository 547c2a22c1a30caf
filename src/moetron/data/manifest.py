"""The files a prepared directory holds besides its shards: plan.json (written first) and manifest.json (last)."""

from __future__ import annotations

import json
import os

FORMAT = "moetron-prepared/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"


def write_json(path: str, obj) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
