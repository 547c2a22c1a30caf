"""Checkpoint metadata is read without general unpickling: a `.metadata` that would run a command is refused
(ConfigError naming the file, the command never runs), and real DCP checkpoints still read and load."""

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import small_model_config
from torch.distributed.checkpoint.api import CheckpointException

from moetron.checkpoint import CheckpointStore
from moetron.checkpoint.metadata import SafeFileSystemReader, read_dcp_metadata
from moetron.checkpoint.state import model_entries
from moetron.config import ConfigError, MoetronConfig, OptimConfig
from moetron.config.hydra import to_yaml
from moetron.hf.__main__ import main as hf_main
from moetron.model import DeepSeekV3
from moetron.train.optim import MasterAdamW


class _RunsCommand:
    """What an attacker would put in `.metadata`: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _saved_run(tmp_path):
    """A run directory with a real checkpoint of a small model (model + AdamW moments) and its config.yaml."""
    cfg = small_model_config()
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    optimizer = MasterAdamW(list(model.named_parameters()), OptimConfig())
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:], mtp_lambda=0.3).loss.backward()
    optimizer.step()
    run = tmp_path / "run"
    state = model_entries(model)
    for name, p in model.named_parameters():
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"optim.{name}.{moment}"] = optimizer.state[p][moment]
    step_dir = CheckpointStore(run / "checkpoints").save(1, state, {"step": 1})
    (run / "config.yaml").write_text(to_yaml(MoetronConfig(model=cfg)))
    return run, step_dir, model


def _plant(step_dir, marker):
    (step_dir / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))


def test_the_planted_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the stock DCP reader runs the planted command (what this module protects against)."""
    step_dir, marker = tmp_path / "ckpt", tmp_path / "pwned"
    step_dir.mkdir()
    _plant(step_dir, marker)
    try:
        dcp.FileSystemReader(str(step_dir)).read_metadata()
    except Exception:
        pass  # os.system returns an int, not Metadata; the command has run by then
    assert marker.exists()


def test_metadata_that_runs_a_command_is_refused(tmp_path):
    step_dir, marker = tmp_path / "ckpt", tmp_path / "pwned"
    step_dir.mkdir()
    _plant(step_dir, marker)
    with pytest.raises(ConfigError) as err:
        read_dcp_metadata(step_dir)
    assert str(step_dir / ".metadata") in str(err.value) and "system" in str(err.value)
    with pytest.raises((ConfigError, CheckpointException), match="system"):  # DCP may wrap the reader's error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"x": torch.zeros(1)}, storage_reader=SafeFileSystemReader(str(step_dir)))
    assert not marker.exists()


def test_real_checkpoint_metadata_reads_and_loads(tmp_path):
    _, step_dir, model = _saved_run(tmp_path)
    safe = read_dcp_metadata(step_dir)
    stock = dcp.FileSystemReader(str(step_dir)).read_metadata()
    assert safe.state_dict_metadata == stock.state_dict_metadata
    assert safe.storage_data == stock.storage_data and len(safe.storage_data) > 10
    want = model_entries(model)
    state = {k: torch.zeros_like(v) for k, v in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(step_dir)))
    for key, value in want.items():
        assert torch.equal(state[key], value), key


def test_hf_export_refuses_a_planted_metadata_without_running_it(tmp_path, capsys):
    run, step_dir, _ = _saved_run(tmp_path)
    assert hf_main(["export", str(run), str(tmp_path / "ok"), "--allow-routing-mismatch"]) == 0  # the real one exports
    marker = tmp_path / "pwned"
    _plant(step_dir, marker)
    with pytest.raises(SystemExit) as exit_info:
        hf_main(["export", str(run), str(tmp_path / "hf"), "--allow-routing-mismatch"])
    assert exit_info.value.code == 2
    assert str(step_dir / ".metadata") in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_or_missing_metadata_names_the_file(tmp_path):
    _, step_dir, _ = _saved_run(tmp_path)
    raw = (step_dir / ".metadata").read_bytes()
    (step_dir / ".metadata").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match=r"\.metadata is corrupt"):
        read_dcp_metadata(step_dir)
    (step_dir / ".metadata").unlink()
    with pytest.raises(ConfigError, match=r"\.metadata is missing"):
        read_dcp_metadata(step_dir)
