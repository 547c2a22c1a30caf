"""Reading DCP's `.metadata` without running code from it.

torch.distributed.checkpoint stores its index (tensor shapes, dtypes, byte ranges of the shards) as a
pickle, and its FileSystemReader loads it with plain `pickle.load`: a `.metadata` whose object reduces to
`os.system` would run its command on resume or export. This unpickler admits only the classes DCP writes
into that index and the few torch and standard-library values they hold; anything else is a ConfigError
naming the file. Shard payloads are read by DCP itself with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from moetron.config import ConfigError

METADATA_FILE = ".metadata"

# (module, name) -> what the pickle may construct. DCP's index classes, and what their fields hold.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by its name (torch.strided, ...)
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),  # storage_meta.checkpoint_id
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":  # dtypes, layouts and memory formats are plain values (torch.float32, ...)
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_dcp_metadata(path: str | Path, name: str = METADATA_FILE) -> Metadata:
    """The DCP Metadata of the checkpoint directory `path` (ConfigError naming `.metadata` if it is
    missing, unreadable, or asks for anything but DCP's own metadata types)."""
    file = Path(path) / name
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ConfigError(f"Checkpoint file {file} is missing. Valid: a complete checkpoint directory written by "
                          "moetron (a step_NNNNNNNN directory with its .metadata file).") from None
    except Exception as err:  # UnpicklingError, EOFError, a refused global, a truncated file
        raise ConfigError(f"Checkpoint file {file} is corrupt or not a checkpoint index ({type(err).__name__}: "
                          f"{err}); it was not loaded. Valid: the .metadata that torch.distributed.checkpoint "
                          "writes, holding only its metadata types.") from None
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"Checkpoint file {file} holds a {type(metadata).__name__}, not a checkpoint index. "
                          "Valid: the .metadata that torch.distributed.checkpoint writes.")
    if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with `.metadata` read by read_dcp_metadata; give it to `dcp.load` as
    `storage_reader=` so that loading a checkpoint never unpickles its index with plain pickle."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")  # DCP asks for a per-rank index when it loads without collectives
        metadata = read_dcp_metadata(self.path, METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
        metadata.storage_meta.load_id = self.load_id
        return metadata
