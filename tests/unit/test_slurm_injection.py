"""Slurm script injection: a newline or shell characters in any cluster.* string are refused naming the
field (they would end the #SBATCH block, dropping --signal/--requeue, or run as shell lines), and what
reaches the script is quoted."""

import dataclasses

import pytest

from moetron.config import ConfigError
from moetron.config.cluster import validate_cluster
from moetron.slurm import load, render

LOCAL = ["cluster=local", "parallel.dp=4", "parallel.ep=2", "train.micro_batch_size=2"]  # 2 x dp 4 <= tiny's batch_ramp_start
FIELDS = ["name", "partition", "account", "qos", "mem", "time", "job_name", "log_dir", "workdir", "python",
          "module", "script", "launcher"]
PAYLOADS = ["gpu\necho pwned", "gpu\r\n#SBATCH --no-requeue", "gpu; touch /tmp/pwned", "$(touch /tmp/pwned)",
            "`id`", "a b", "gpu\x00", "x'y", 'x"y', "a|b", "a&b", "a>b"]


def quoted(value: str) -> str:
    """A Hydra override value that carries `value` verbatim (single-quoted, quotes and backslashes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sbatch_block_is_whole(text: str) -> bool:
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    return all(line.startswith("#SBATCH") for line in lines[first: last + 1])


@pytest.mark.parametrize("field", FIELDS)
def test_a_newline_is_refused_naming_the_field(field):
    with pytest.raises(ConfigError) as err:
        load([*LOCAL, f"cluster.{field}={quoted('gpu' + chr(10) + 'echo pwned')}"])
    message = str(err.value)
    assert f"`cluster.{field}`" in message and "Valid:" in message


@pytest.fixture(scope="module")
def loaded():
    return load(LOCAL)


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_shell_and_control_characters_are_refused_naming_the_field(loaded, field, payload):
    cluster = dataclasses.replace(loaded.cluster, **{field: payload})
    with pytest.raises(ConfigError, match=f"`cluster.{field}`"):
        validate_cluster(cluster)


@pytest.mark.parametrize("override, field", [
    ("cluster.setup=['source /opt/venv/bin/activate\necho pwned']", "cluster.setup[0]"),
    ("cluster.sbatch_extra=['--exclusive\necho pwned']", "cluster.sbatch_extra[0]"),
    ("cluster.sbatch_extra=['--comment=$(id)']", "cluster.sbatch_extra[0]"),
    ("cluster.sbatch_extra=['--exclusive', '--x;id']", "cluster.sbatch_extra[1]"),
    ("+cluster.env.NCCL_DEBUG='INFO\necho pwned'", "cluster.env.NCCL_DEBUG"),
])
def test_lists_and_env_values_name_the_item(override, field):
    with pytest.raises(ConfigError, match=f"`{field.replace('[', '.').replace(']', '.')}`"):
        load([*LOCAL, override])


def test_valid_values_render_one_sbatch_block_with_signal_and_requeue():
    overrides = [*LOCAL, "cluster.partition='gpu,debug'", "cluster.account=proj-1", "cluster.qos=high",
                 "cluster.mem=200G", "cluster.sbatch_extra=['--constraint=[a100|h100]&ib', --exclusive]",
                 "+cluster.env.NCCL_SOCKET_IFNAME='^lo,docker0 x'", "cluster.setup=['module load cuda && echo ok']"]
    text = render(load(overrides), overrides)
    assert sbatch_block_is_whole(text)
    for line in ("#SBATCH --partition=gpu,debug", "#SBATCH --account=proj-1", "#SBATCH --qos=high",
                 "#SBATCH --mem=200G", "#SBATCH --constraint=[a100|h100]&ib", "#SBATCH --signal=B:USR1@60",
                 "#SBATCH --requeue", "export NCCL_SOCKET_IFNAME='^lo,docker0 x'", "module load cuda && echo ok"):
        assert line in text, line


def test_render_checks_a_config_changed_after_load():
    config = load(LOCAL)
    config.cluster.qos = "normal\necho pwned"
    with pytest.raises(ConfigError, match="`cluster.qos`"):
        render(config, LOCAL)
