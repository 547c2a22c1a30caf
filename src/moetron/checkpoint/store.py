"""A directory of step_NNNNNNNN checkpoints: save, find the newest complete one, load it, prune old ones."""

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moetron.config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"


@dataclass
class LoadedCheckpoint:
    path: Path
    train_state: dict
    skipped: list[str]  # newer checkpoints that could not be read, with the reason


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Published checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.name)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             train_state: dict, before_publish=None) -> Path:
        """Publish a checkpoint of the model (and the optimizer, unless None: e.g. an imported model).
        `before_publish` runs when everything is written but not yet renamed (fault drills use it)."""
        final = self.path(step)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model_sd, optim_sd = get_state_dict(model, optimizer or [])
        state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: that is intended here
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp))
        with open(tmp / TRAIN_STATE, "w") as f:
            json.dump({**train_state, "has_optimizer": optimizer is not None}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if before_publish is not None:
            before_publish()
        if final.exists():  # re-saving the same step (e.g. after a rollback): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)  # the atomic publish
        self._prune()
        return final

    def remove_stale(self) -> list[Path]:
        """Delete the temporary directories of saves that were interrupted (never published)."""
        stale = list(self.root.glob(".step_*.tmp-*")) if self.root.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint | None:
        """Load the newest checkpoint that reads back; fall back past corrupt ones (reported in `skipped`)."""
        skipped = []
        for path in reversed(self.complete()):
            try:
                train_state = self.load(path, model, optimizer)
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

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        train_state = read_train_state(path)
        verify_shards(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if not train_state.get("has_optimizer", True):  # a model-only checkpoint (e.g. imported weights)
            state = {"model": model_sd}
        load_dcp(state, path)
        if "optim" in state:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            model.load_state_dict(state["model"])
        return train_state

def verify_shards(path: Path) -> None:
    """Check that every byte range DCP's metadata points at exists, so a truncated or missing shard is
    reported by file name before anything is loaded."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise ConfigError(f"Checkpoint file {path / '.metadata'} is missing or corrupt ({type(err).__name__}).") from err
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


def load_dcp(state: dict, path: Path) -> None:
    """dcp.load into `state` in place; a truncated or unreadable checkpoint becomes a ConfigError."""
    try:
        with warnings.catch_warnings():  # DCP warns when it runs without a process group: intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        cause = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise ConfigError(f"Checkpoint {path} is incomplete or corrupt ({cause[0].strip()}).") from err
