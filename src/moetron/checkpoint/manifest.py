"""A manifest of checksums for a checkpoint directory, so flipped bytes are caught before anything loads.

`write_manifest(directory)` records every file's size and SHA-256 in `manifest.json` (written last, under a
temporary name, then renamed); `verify_manifest(directory)` recomputes them and names the first file that
differs. Sizes are compared first, so a truncated shard is reported without hashing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moetron.config import ConfigError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every regular file under `directory` except the manifest, in a fixed order."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: str | Path) -> Path:
    """Checksum every file under `directory` into `directory/manifest.json`; returns its path."""
    directory = Path(directory)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
               for p in _files(directory)}
    final, tmp = directory / MANIFEST, directory / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def verify_manifest(directory: str | Path) -> None:
    """Check every file listed in `directory/manifest.json` (ConfigError naming the first bad or missing
    file, or the manifest itself when it is missing or unreadable). Files the manifest does not list are
    not checked."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
        listed = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()}
    except FileNotFoundError:
        raise ConfigError(f"Checkpoint file {manifest} is missing, so the checkpoint cannot be checked. Valid: a "
                          "checkpoint published by moetron, which writes its manifest last.") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"Checkpoint file {manifest} is corrupt ({type(err).__name__}: {err}). Valid: the "
                          "manifest.json moetron writes (per file: bytes and sha256).") from None
    for name, (size, digest) in sorted(listed.items()):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # never read outside the checkpoint
            raise ConfigError(f"Checkpoint file {manifest} is corrupt: it lists {name!r}, outside the checkpoint. "
                              "Valid: paths relative to the checkpoint directory.")
        if not path.is_file():
            raise ConfigError(f"Checkpoint file {path} is missing (listed in {manifest}). The checkpoint is incomplete.")
        actual = path.stat().st_size
        if actual != size:
            raise ConfigError(f"Checkpoint file {path} has {actual} bytes, but {manifest} records {size}: it is "
                              "truncated or was changed after the save.")
        if _sha256(path) != digest:
            raise ConfigError(f"Checkpoint file {path} is corrupt: its SHA-256 differs from the one in {manifest} "
                              "(bytes changed on disk after the save).")
