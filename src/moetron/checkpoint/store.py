"""A directory of step_NNNNNNNN checkpoints in the one format of every layout: save, find the newest complete
one, load it, prune old ones.

A checkpoint is a flat mapping key -> tensor, written with torch.distributed.checkpoint (DCP) by every rank
(replicated keys once), plus `train_state.json` (the trainer's counters and the layout that wrote it).
Keys are independent of the layout (checkpoint/state.py): the full model's parameter names, one tensor per
global routed expert, optimizer state per parameter. So any layout reads any checkpoint: it asks for the
keys of what it holds. Saving is collective over the ranks (`barrier`), rank 0 does the file-system steps:
write under a temporary name, add `manifest.json` (size and SHA-256 of every file), then rename (a crash
never leaves a half checkpoint), keep the newest `keep`. `save_async` stages a host copy, lets DCP's async_save
write it in a background thread over its own process group, and `publish` seals and renames it the same way once
the write is done, so training runs on during the write and a crash before the publish keeps the previous
checkpoint. Loading checks the manifest first (rank 0, verdict
shared): a checkpoint with a flipped, truncated or missing file is named and moved aside as
`step_N.corrupt`, so it is never loaded, never chosen by a rollback and not counted among the kept ones.
DCP's `.metadata` is read without general unpickling (checkpoint/metadata.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager

from moetron.checkpoint.manifest import verify_manifest, write_manifest
from moetron.checkpoint.metadata import SafeFileSystemReader, read_dcp_metadata
from moetron.checkpoint.state import FlatChunk
from moetron.config import ConfigError
from moetron.device import HOST

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"
MODEL_PREFIX = "model."  # keys of the model's tensors; a model-only checkpoint (an HF import) holds only these
MASTER_PREFIX = "master."  # FP32 master weights: only in checkpoints of runs with train.param_dtype=bf16


@dataclass
class LoadedCheckpoint:
    path: Path
    train_state: dict
    skipped: list[str]  # newer checkpoints that could not be read, with the reason


@dataclass
class PendingSave:
    """A checkpoint whose shards a background thread is writing into `tmp`; `CheckpointStore.publish` makes
    it a checkpoint. Nothing reads it before then: `complete()` lists published directories only."""

    step: int
    tmp: Path
    write: Future  # DCP's write, then (rank 0) the counters and the manifest

    def done(self) -> bool:
        """This rank's write has ended (successfully or not); publishing is collective, see the trainer."""
        return self.write.done()


class _Staged(AsyncStager):
    """The state is already a host copy (`_own`): DCP's async_save writes it as it is."""

    _synchronize_after_execute = False

    def stage(self, state_dict, **kwargs):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _no_barrier() -> None:
    """One process: nothing to wait for."""


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3, rank: int = 0, barrier: Callable[[], None] = _no_barrier,
                 process_group=None, async_group=None):
        """rank / barrier / process_group: this process's rank, a barrier over every rank, and the (CPU)
        group DCP plans over; the defaults are those of a single process. async_group: a gloo group used by
        background writes alone (their collectives must not interleave with the training thread's)."""
        self.root = Path(root)
        self.keep = keep
        self.rank, self.barrier, self.process_group = rank, barrier, process_group
        self.async_group = async_group
        self.writer = FileSystemWriter  # DCP's storage writer class (tests substitute slow or failing ones)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Published checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.name)

    # ---- save -----------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, torch.Tensor], train_state: dict, before_publish=None) -> Path:
        """Publish `state` (this rank's keys; every rank calls it) with `train_state` (rank 0 writes it).
        `before_publish` runs when everything is written but not yet renamed (fault drills use it). A full
        disk or a read-only directory is a ConfigError naming the path and the free space; the temporary
        directory is removed and the published checkpoints stay as they were."""
        tmp = self._temporary(step)
        with self._cleanup_on_failure(tmp):
            self._prepare(tmp)
            with warnings.catch_warnings():  # DCP warns when it runs without a process group: intended
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(_owned(state), storage_writer=self.writer(str(tmp)), process_group=self.process_group)
            self._seal(tmp, train_state)
        return self._publish(step, tmp, before_publish)

    def save_async(self, step: int, state: dict[str, torch.Tensor], train_state: dict,
                   during_write=None) -> PendingSave:
        """Stage a host copy of `state` and start writing it in the background (every rank calls it);
        returns at once. `during_write` runs in the writer thread once this rank's shards are on disk, before
        DCP's index (fault drills use it). Call `publish` with the result: at most one save in flight."""
        tmp = self._temporary(step)
        with self._cleanup_on_failure(tmp):
            self._prepare(tmp)
            writer = self.writer(str(tmp))
            if during_write is not None:
                writer.write_data = _then(writer.write_data, during_write)
            write = dcp.async_save(_owned(state), storage_writer=writer, async_stager=_Staged(),
                                   process_group=self.async_group)
        # The manifest hashes every file: that too happens off the training thread, in DCP's writer thread
        # once its write is done (a callback, not another thread to start).
        sealed: Future = Future()
        write.add_done_callback(lambda done: self._seal_when_written(done, tmp, train_state, sealed))
        return PendingSave(step, tmp, sealed)

    def _seal_when_written(self, write: Future, tmp: Path, train_state: dict, sealed: Future) -> None:
        try:
            write.result()  # every rank's shards are on disk once DCP's write returns
            self._seal(tmp, train_state)
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            sealed.set_exception(err)
        else:
            sealed.set_result(None)

    def publish(self, pending: PendingSave) -> Path:
        """Wait for the background write of `pending`, then publish it as `save` does (collective). A failed
        write is the ConfigError `save` raises; the published checkpoints stay as they were."""
        with self._cleanup_on_failure(pending.tmp):
            pending.write.result()
        return self._publish(pending.step, pending.tmp)

    def _temporary(self, step: int) -> Path:
        return self.root / f".{self.path(step).name}.tmp-save"

    @contextmanager
    def _cleanup_on_failure(self, tmp: Path):
        """A write that fails (full disk, read-only directory) removes its temporary directory and becomes a
        ConfigError naming the path and the free space."""
        try:
            yield
        except (OSError, CheckpointException) as err:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(self._cannot_write(tmp, err)) from err

    def _prepare(self, tmp: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()

    def _seal(self, tmp: Path, train_state: dict) -> None:
        """Rank 0, once every rank's shards are written (DCP has returned): the counters, then the manifest."""
        if self.rank == 0:
            with open(tmp / TRAIN_STATE, "w") as f:
                json.dump(train_state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            write_manifest(tmp)

    def _publish(self, step: int, tmp: Path, before_publish=None) -> Path:
        final = self.path(step)
        if before_publish is not None:
            before_publish()
        self.barrier()
        if self.rank == 0:
            if final.exists():  # re-saving the same step (e.g. after a rollback): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)  # the atomic publish
            self._prune()
        self.barrier()
        return final

    def _cannot_write(self, tmp: Path, err: BaseException) -> str:
        try:
            usage = shutil.disk_usage(self.root)
            space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
        except OSError:
            space = "free space unknown"
        cause = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        kept = [p.name for p in self.complete()]
        return (f"Cannot write checkpoint {tmp.name.removeprefix('.').split('.tmp')[0]} under {self.root} "
                f"({cause[0].strip()}; {space}). The checkpoints already published are untouched "
                f"({', '.join(kept) or 'none yet'}). Valid: a run.dir on a writable file system with room for "
                "another checkpoint (free space, or lower run.keep_checkpoints), then rerun to resume.")

    def remove_stale(self) -> list[Path]:
        """Delete the temporary directories of saves that were interrupted (never published): rank 0."""
        if self.rank != 0 or not self.root.is_dir():
            return []
        stale = list(self.root.glob(".step_*.tmp-*"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------------------
    def load_latest(self, state: dict[str, torch.Tensor]) -> LoadedCheckpoint | None:
        """Load the newest checkpoint that reads back into `state`; fall back past damaged ones (moved aside)
        and unreadable ones (both reported in `skipped`)."""
        self.barrier()  # rank 0 may just have removed stale temporaries
        skipped = []
        for path in reversed(self.complete()):
            try:
                train_state = self.load(path, state)
            except ConfigError as err:
                skipped.append(str(err))
                continue
            return LoadedCheckpoint(path, train_state, skipped)
        if skipped:
            raise ConfigError(
                f"No checkpoint under {self.root} could be read: {' '.join(skipped)} "
                "Valid: a directory with at least one complete checkpoint, or an empty run.dir to start fresh."
            )
        return None

    def load(self, path: Path, state: dict[str, torch.Tensor]) -> dict:
        """Copy the checkpoint's values into the tensors of `state` (key -> destination); a model-only
        checkpoint fills only the model's keys and leaves the rest (the optimizer's) as they are."""
        self._check_integrity(path)
        train_state = read_train_state(path)
        if not train_state.get("has_optimizer", True):
            state = {k: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
        if not train_state.get("has_masters", False):  # FP32 parameters are their own masters
            state = {k: v for k, v in state.items() if not k.startswith(MASTER_PREFIX)}
        buffers = {key: torch.empty_like(_local(value)) for key, value in state.items()}
        loaded = {key: value.for_dcp(buffers[key]) if isinstance(value, FlatChunk) else buffers[key]
                  for key, value in state.items()}
        load_dcp(loaded, path, self.process_group)
        with torch.no_grad():
            for key, target in state.items():
                _local(target).copy_(buffers[key])
        return train_state

    def _check_integrity(self, path: Path) -> None:
        """Rank 0 checks the manifest and the shards and shares the verdict; a damaged checkpoint is moved
        aside as step_N.corrupt and raises ConfigError naming the file."""
        reason = None
        if self.rank == 0:
            try:
                read_train_state(path)
                verify_manifest(path)
                verify_shards(path)
            except ConfigError as err:
                reason = str(err)
        if dist.is_initialized() and dist.get_world_size() > 1:
            verdict = [reason]
            dist.broadcast_object_list(verdict, src=0, group=self.process_group)
            reason = verdict[0]
        if reason is None:
            return
        aside = path.with_name(path.name + ".corrupt")
        if self.rank == 0:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        self.barrier()
        raise ConfigError(f"{reason} The checkpoint was moved aside to {aside}.")


def _local(value) -> torch.Tensor:
    return value.local if isinstance(value, FlatChunk) else value


def _own(value):
    """A host copy of `value` (a FlatChunk as DCP's 1-D chunk of its key): views of stacks get their own
    storage, and training may change the live tensor while the copy is written."""
    if isinstance(value, FlatChunk):
        return value.for_dcp(value.local.detach().to(HOST, copy=True))
    return value.detach().to(HOST, copy=True)


def _owned(state: dict) -> dict:
    return {key: _own(value) for key, value in state.items()}


def _then(write_data, hook):
    """`write_data` of a DCP storage writer, followed by `hook` once the shards are written."""
    def write_then_hook(plan, planner):
        written = write_data(plan, planner)
        written.wait()
        hook()
        return written
    return write_then_hook


def verify_shards(path: Path) -> None:
    """Check that every byte range DCP's metadata points at exists, so a truncated or missing shard is
    reported by file name before anything is loaded."""
    metadata = read_dcp_metadata(path)  # no general unpickling; a ConfigError naming the file
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        actual = shard.stat().st_size if shard.exists() else None
        if actual is None or actual < size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise ConfigError(f"Checkpoint file {shard} is truncated or missing: {found}, expected at least {size} bytes.")


def read_train_state(path: Path) -> dict:
    state_file = path / TRAIN_STATE
    try:
        with open(state_file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Checkpoint file {state_file} is missing or corrupt ({err}).") from err


def load_dcp(state: dict, path: Path, process_group=None) -> None:
    """dcp.load into `state` in place; a truncated or unreadable checkpoint becomes a ConfigError."""
    try:
        with warnings.catch_warnings():  # DCP warns when it runs without a process group: intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), process_group=process_group)
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        cause = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise ConfigError(f"Checkpoint {path} is incomplete or corrupt ({cause[0].strip()}).") from err
