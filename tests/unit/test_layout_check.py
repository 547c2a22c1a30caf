"""One layout check (config/layout.py) for every entry point: what the trainer refuses at start-up,
`moetron.slurm render` refuses before anything is written, naming the same field, check by check."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from moetron.config import ConfigError
from moetron.config.layout import check_layout
from moetron.slurm import load, render

REPO = Path(__file__).resolve().parents[2]
THREE_NODES = ["cluster.nodes=3", "cluster.ranks_per_node=1", "parallel.ranks_per_node=1"]

# (overrides on the local cluster: 2 nodes x 2 ranks unless changed; the field both must name; more words)
CHECKS = {
    "tensor_parallel": (["parallel.tp=2", "parallel.dp=2"], "parallel.tp", "no tensor parallelism"),
    "micro_batch_x_dp_over_ramp_start": (["parallel.dp=4"], "train.micro_batch_size", "batch_ramp_start"),
    "ranks_per_node_divides_world": (["parallel.dp=4", "parallel.ranks_per_node=3", "train.micro_batch_size=1"],
                                     "parallel.ranks_per_node", "3"),
    "ep_groups_cover_nodes_evenly": (["cluster.nodes=3", "parallel.dp=6", "parallel.ep=3", "parallel.ranks_per_node=2",
                                      "train.micro_batch_size=1"], "parallel.ep", "unevenly"),
    "experts_per_ep_rank": ([*THREE_NODES, "parallel.dp=3", "parallel.ep=3", "train.micro_batch_size=1"],
                            "parallel.ep", "routed experts (8)"),
    "stages_within_layers": (["parallel.pp=4", "parallel.schedule=dualpipev"], "parallel.pp", "8 pipeline stages"),
    "dualpipe_even_pp": ([*THREE_NODES, "parallel.pp=3", "parallel.schedule=dualpipe"], "parallel.pp", "even"),
    "expert_groups_per_node": (["cluster.nodes=3", "parallel.dp=6", "parallel.ep=6", "model.n_routed_experts=12",
                                "parallel.ranks_per_node=2", "train.micro_batch_size=1"], "model.n_group", "3 nodes"),
}


def trainer_refusal(config) -> str:
    """The trainer's start-up on the same config, as rank 0 of its layout (a dry run on the fake process
    group: the layout is checked before any model is built)."""
    from moetron.train.trainer import Trainer

    config.run.dry_run = True
    try:
        with pytest.raises(ConfigError) as err:
            Trainer(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return str(err.value)


@pytest.mark.parametrize("name", list(CHECKS))
def test_render_refuses_what_the_trainer_refuses(name):
    extra, field, words = CHECKS[name]
    overrides = ["cluster=local", *extra]
    config = load(overrides)  # each field is valid alone: only the layout as a whole is wrong
    with pytest.raises(ConfigError) as rendered:
        render(config, overrides)
    by_trainer = trainer_refusal(config)
    for message in (str(rendered.value), by_trainer):
        assert f"`{field}`" in message and words in message and "\n" not in message, (name, message)


def readme_render_command() -> list[str]:
    """The arguments of README.md's `moetron.slurm render` example."""
    text = (REPO / "README.md").read_text()
    command = re.search(r"^\.venv/bin/python -m moetron\.slurm render (.*?)(?<!\\)\n", text, re.S | re.M).group(1)
    command = re.sub(r"#[^\n]*", "", command).replace("\\\n", " ").replace("$PWD", str(REPO))
    return shlex.split(command)


def test_the_readme_example_renders_and_passes_the_trainers_check():
    args = readme_render_command()
    assert "model=lite_16b" in args
    config = load(args)
    assert "#SBATCH --nodes=4" in render(config, args)
    layout = check_layout(config, 32, 8)  # what the trainer runs at start-up on the 32 ranks of that job
    assert (layout.mesh.pp, layout.mesh.dp, layout.mesh.ep, layout.ep_nodes) == (4, 8, 8, 1)


def test_cli_refuses_the_readme_example_without_the_v3_batch(tmp_path):
    """The README's example once rendered with train=tiny (8 sequences x dp 8 > batch_ramp_start 8), which the
    trainer refused at start-up; render refuses it now, exit 2, the field named, nothing written."""
    args = [a for a in readme_render_command() if not a.startswith("train=")]
    out = tmp_path / "job.sbatch"
    result = subprocess.run([sys.executable, "-m", "moetron.slurm", "render", "-o", str(out),
                             f"cluster.log_dir={tmp_path / 'logs'}", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "`train.micro_batch_size`" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
