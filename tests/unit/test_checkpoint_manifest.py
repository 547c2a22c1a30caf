"""A manifest of checksums catches silent corruption: 64 flipped bytes inside a tensor payload load without
complaint through DCP alone, and verify_manifest names the file."""

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import small_model_config

from moetron.checkpoint import CheckpointStore
from moetron.checkpoint.manifest import MANIFEST, verify_manifest, write_manifest
from moetron.checkpoint.metadata import read_dcp_metadata
from moetron.checkpoint.state import model_entries
from moetron.config import ConfigError
from moetron.model import DeepSeekV3


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = DeepSeekV3(small_model_config())
    step_dir = CheckpointStore(tmp_path / "checkpoints").save(3, model_entries(model),
                                                              {"step": 3, "has_optimizer": False})
    assert (step_dir / MANIFEST).is_file()  # the store seals every checkpoint it publishes
    write_manifest(step_dir)  # rewriting it is idempotent
    return step_dir, model


def _flip_payload(step_dir, count: int = 64) -> tuple[str, str]:
    """Flip `count` bytes in the middle of the largest tensor's bytes; returns (file, tensor key)."""
    metadata = read_dcp_metadata(step_dir)
    index, info = max(metadata.storage_data.items(), key=lambda kv: kv[1].length)
    path = step_dir / info.relative_path
    raw = bytearray(path.read_bytes())
    start = info.offset + info.length // 2
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    return info.relative_path, index.fqn


def _load(step_dir, model):
    """The checkpoint's values by checkpoint key (plain DCP: no manifest check)."""
    state = {k: torch.zeros_like(v) for k, v in model_entries(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(step_dir))
    return state


def test_manifest_lists_every_file_and_verifies(saved):
    step_dir, _ = saved
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(files) == on_disk and ".metadata" in files and "train_state.json" in files
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in files.values())
    verify_manifest(step_dir)  # untouched: passes


def test_flipped_payload_bytes_are_named(saved):
    step_dir, model = saved
    shard, key = _flip_payload(step_dir)
    # Without the manifest nothing notices: DCP loads the damaged tensor silently.
    loaded = _load(step_dir, model)
    assert not torch.equal(loaded[key], model_entries(model)[key])
    with pytest.raises(ConfigError) as err:
        verify_manifest(step_dir)
    message = str(err.value)
    assert str(step_dir / shard) in message and "SHA-256" in message and "\n" not in message


def test_truncated_missing_and_unlisted_files(saved, tmp_path):
    step_dir, _ = saved
    (step_dir / "notes.txt").write_text("not part of the save")  # unlisted files are not checked
    verify_manifest(step_dir)
    shard = next(step_dir.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=f"{shard}.* has .* bytes"):
        verify_manifest(step_dir)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard} is missing"):
        verify_manifest(step_dir)


def test_missing_or_bad_manifest_is_named(saved):
    step_dir, _ = saved
    manifest = step_dir / MANIFEST
    manifest.write_text('{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "0"}}}')
    with pytest.raises(ConfigError, match="outside the checkpoint"):
        verify_manifest(step_dir)
    manifest.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{manifest} is corrupt"):
        verify_manifest(step_dir)
    manifest.unlink()
    with pytest.raises(ConfigError, match=f"{manifest} is missing"):
        verify_manifest(step_dir)
