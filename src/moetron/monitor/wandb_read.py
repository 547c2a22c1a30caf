"""Read an offline wandb run file (run-*.wandb) back: its history rows and alerts.

The file is a record log in 32 KiB blocks (a 7-byte file header, then chunks with a 7-byte header:
CRC32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s, as the wandb SDK writes it.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    history: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)


def _chunks(raw: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left_in_block
            continue
        data = raw[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            yield pending + data


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """All offline wandb runs under run_dir/wandb (a resumed run has several), in time order."""
    from wandb.proto import wandb_internal_pb2 as pb

    paths = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not paths:
        found = sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).glob("wandb/**/*"))
        raise FileNotFoundError(f"no offline wandb run (wandb/offline-run-*/run-*.wandb) under {run_dir}; "
                                f"its wandb folder holds {found or 'nothing'}")
    result = OfflineRun()
    for path in paths:
        for data in _chunks(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                result.history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "alert":
                result.alerts.append({"title": record.alert.title, "text": record.alert.text})
    return result
