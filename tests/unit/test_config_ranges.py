"""Every validator refuses NaN, infinities and out-of-range values, naming its own field, through the real
entry: Hydra composes hydra_conf/config.yaml with the override, and to_config validates it."""

import dataclasses
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from moetron.config import ConfigError, MoetronConfig
from moetron.config.hardware import HardwareConfig
from moetron.config.hydra import register_schema, to_config


def compose_config(*overrides: str) -> MoetronConfig:
    register_schema()
    with initialize_config_module("moetron.hydra_conf", version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def float_fields(config, prefix: str = "") -> list[str]:
    """Dotted names of every float field of the training config."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            found.append(f"{prefix}{f.name}")
    return found


def refused(override: str) -> str:
    with pytest.raises(ConfigError) as err:
        compose_config(override)
    message = str(err.value)
    assert "Valid:" in message and "\n" not in message
    return message


def test_defaults_pass():
    config = compose_config()
    assert config.train.max_nonfinite_steps >= 1


@pytest.mark.parametrize(
    "override, field",
    [
        ("run.threads=-1", "run.threads"),  # used to report run.save_every
        ("run.save_every=-1", "run.save_every"),
        ("train.eval_batches=-1", "train.eval_batches"),  # used to report train.eval_every
        ("train.eval_batches=0", "train.eval_batches"),  # validation is on in train=tiny
        ("monitor.spike.max_rollbacks=-1", "monitor.spike.max_rollbacks"),  # used to report rollback_skip_batches
        ("monitor.spike.min_ratio=0.5", "monitor.spike.min_ratio"),  # used to report spike.sigmas
        ("monitor.spike.window=1", "monitor.spike.window"),
        ("train.optim.min_lr=-1e-5", "train.optim.min_lr"),  # used to report train.optim.lr
        ("train.optim.final_lr=-1e-5", "train.optim.final_lr"),
        ("train.optim.weight_decay=-0.1", "train.optim.weight_decay"),  # used to report train.optim.grad_clip
        ("train.optim.beta2=1.0", "train.optim.beta2"),
        ("train.optim.eps=0", "train.optim.eps"),
        ("train.optim.lr=0", "train.optim.lr"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
        ("model.rope_theta=-1", "model.rope_theta"),
        ("monitor.peak_tflops=-5", "monitor.peak_tflops"),
    ],
)
def test_out_of_range_names_its_own_field(override, field):
    message = refused(override)
    assert f"`{field}`" in message and "`" not in message.replace(f"`{field}`", "")


@pytest.mark.parametrize("field", float_fields(MoetronConfig()))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_naming_the_field(field, value):
    message = refused(f"{field}={value}")
    assert f"`{field}`" in message and value.lstrip("-") in message


def test_max_nonfinite_steps_is_configurable():
    assert compose_config("train.max_nonfinite_steps=3").train.max_nonfinite_steps == 3


def test_cli_refuses_nan_lr_with_exit_code_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "moetron.train", f"run.dir={run_dir}", "train.optim.lr=nan",
                           "monitor.wandb=false"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "`train.optim.lr`" in done.stderr and "nan" in done.stderr and "Traceback" not in done.stderr
    assert not run_dir.exists()  # refused before any work


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(HardwareConfig) if f.type in (float, "float")])
def test_hardware_non_finite_is_refused_naming_the_field(field):
    with pytest.raises(ConfigError, match=f"`hardware.{field}`"):
        HardwareConfig(**{field: float("nan")}).validate()
