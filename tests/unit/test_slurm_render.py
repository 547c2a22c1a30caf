"""`python -m moetron.slurm render`: the sbatch script from the config, and layouts refused with named fields."""

import shutil
import subprocess
import sys

import pytest

from moetron.config import ConfigError
from moetron.slurm import load, render, trainer_overrides

LOCAL = ["cluster=local", "parallel.dp=4", "parallel.ep=2", "train.micro_batch_size=2"]  # 2 x dp 4 = ramp start 8


def rendered(overrides, launcher=None):
    return render(load(overrides), overrides, launcher)


def test_per_rank_template_from_the_local_cluster():
    text = rendered([*LOCAL, "run.dir=runs/a b", "cluster.job_name=exp1", "train.steps=7"])
    assert "{{" not in text
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --partition=debug",
                 "#SBATCH --signal=B:USR1@60", "#SBATCH --requeue", "#SBATCH --job-name=exp1",
                 "#SBATCH --output=slurm-logs/%x-%j.out", "export OMP_NUM_THREADS=1",
                 'scontrol requeue "$SLURM_JOB_ID"', "trap 'forward_stop USR1' USR1"):
        assert line in text, line
    assert "-m moetron.launch moetron.train parallel.dp=4 parallel.ep=2 train.micro_batch_size=2 'run.dir=runs/a b' train.steps=7 &" in text
    assert "cluster" not in text.split("-m moetron.launch moetron.train", 1)[1].split("&")[0]
    assert 'rank-%t.out' in text and "CUDA_DEVICE_MAX_CONNECTIONS" not in text  # nccl: false on the CPU cluster


def test_torchrun_template_for_a_gpu_cluster():
    overrides = ["cluster=gpu", "cluster.nodes=2", "cluster.account=proj", "parallel.pp=2", "parallel.dp=8",
                 "parallel.ep=8", "model.n_group=2", "train=v3"]
    text = rendered(overrides)
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --account=proj",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --exclusive", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "#SBATCH --signal=B:USR1@300", 'trap "" USR1'):
        assert line in text, line
    assert "{{" not in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_rendered_scripts_are_valid_bash(tmp_path, launcher):
    script = tmp_path / "job.sbatch"
    script.write_text(rendered([*LOCAL, "cluster.setup=[source /opt/venv/bin/activate]"], launcher))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_trainer_gets_every_override_but_the_clusters():
    assert trainer_overrides(["cluster=gpu", "cluster.nodes=4", "+cluster.x=1", "parallel.dp=4", "run.dir=r"]) == [
        "parallel.dp=4", "run.dir=r"]


@pytest.mark.parametrize("overrides,fields", [
    (["cluster=local", "parallel.dp=2"], ["cluster.nodes", "cluster.ranks_per_node", "parallel.dp", "parallel.pp"]),
    (["cluster=gpu", "cluster.nodes=2", "parallel.dp=8"], ["cluster.gpus_per_node", "parallel.dp=16"]),
    (["cluster=local", "parallel.dp=4", "parallel.ranks_per_node=4"], ["parallel.ranks_per_node"]),
    (["cluster=local", "parallel.dp=4", "parallel.ep=3"], ["parallel.ep"]),
    (["cluster=local", "cluster.nodes=3", "parallel.dp=6", "parallel.ep=6", "model.n_routed_experts=12"],
     ["model.n_group", "parallel.ep", "3 nodes"]),
    (["cluster=local", "cluster.launcher=mpirun", "parallel.dp=4"], ["cluster.launcher"]),
    (["cluster=local", "cluster.time=soon", "parallel.dp=4"], ["cluster.time"]),
    (["cluster=local", "cluster.nodez=2"], ["cluster.nodez"]),
])
def test_bad_layouts_and_values_name_the_fields(overrides, fields):
    with pytest.raises(ConfigError) as err:
        rendered(overrides)
    message = str(err.value)
    assert "\n" not in message
    for field in fields:
        assert field in message, (field, message)


def test_cli_refuses_a_bad_layout_and_writes_nothing(tmp_path):
    out = tmp_path / "job" / "x.sbatch"
    result = subprocess.run([sys.executable, "-m", "moetron.slurm", "submit", "-o", str(out), "cluster=local",
                             f"cluster.log_dir={tmp_path / 'logs'}", "parallel.dp=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("moetron.slurm: error: Invalid layout: cluster.nodes (2)")
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "logs").exists()


def test_cli_render_writes_the_script(tmp_path):
    out = tmp_path / "x.sbatch"
    result = subprocess.run([sys.executable, "-m", "moetron.slurm", "render", "-o", str(out), *LOCAL,
                             f"cluster.log_dir={tmp_path / 'logs'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.read_text().startswith("#!/bin/bash") and (tmp_path / "logs").is_dir()


def test_config_groups_reach_the_job_and_the_trainers_schema_is_untouched():
    overrides = ["cluster=local", "parallel=cpu_2x2", "train.micro_batch_size=4"]
    config = load(overrides)
    assert (config.parallel.pp, config.parallel.dp, config.parallel.ep) == (2, 2, 2)
    assert config.model.hidden_size == 128 and config.cluster.nodes == 2  # model=tiny and cluster=local applied
    text = render(config, overrides)
    assert "EP groups span 2 node(s)" in text
    assert "-m moetron.launch moetron.train parallel=cpu_2x2 train.micro_batch_size=4 &" in text

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from moetron.config import MoetronConfig

    with initialize_config_module("moetron.hydra_conf", version_base=None):
        plain = OmegaConf.to_object(compose("config"))
    assert type(plain) is MoetronConfig


SITE = ["cluster=gpu", "cluster.nodes=2", "parallel.dp=16", "parallel.ep=8", "train=v3",
        "cluster.container_image='nvcr.io#nvidia/pytorch:25.01-py3'",
        "cluster.container_mounts=[/shared:/shared,/scratch:/scratch:ro]", "cluster.mpi=pmix",
        "cluster.mpi_library=/opt/mpi/lib/libmpi.so", "cluster.nccl_ib_hca='=mlx5_0:1,mlx5_1:1'",
        "cluster.nccl_socket_ifname='^lo,docker'", "cluster.srun_extra=['--cpu-bind=none']", "run.dir='/shared/runs/a b'"]


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_site_conventions_reach_every_srun_step(launcher):
    text = rendered(SITE, launcher)
    steps = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
    assert len(steps) == 2  # the preflight, then the training
    for step in steps:
        assert ("--kill-on-bad-exit=1 --container-image='nvcr.io#nvidia/pytorch:25.01-py3' "
                "--container-mounts=/shared:/shared,/scratch:/scratch:ro --mpi=pmix --cpu-bind=none") in step, step
    for line in ("export NCCL_IB_HCA==mlx5_0:1,mlx5_1:1", "export NCCL_SOCKET_IFNAME='^lo,docker'",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export TORCH_NCCL_TRACE_BUFFER_SIZE=2000",
                 "export TORCH_NCCL_DUMP_ON_TIMEOUT=1",
                 "export TORCH_NCCL_DEBUG_INFO_TEMP_FILE='/shared/runs/a b/nccl_trace'/rank_",
                 "export MPI4PY_LIBMPI=/opt/mpi/lib/libmpi.so",
                 "-m moetron.launch.preflight --run-dir='/shared/runs/a b' --device=auto --min-free-gb=50 --mb=256"):
        assert line in text, line
    assert text.index("moetron.launch.preflight") < text.index("-m moetron.train") if launcher == "torchrun" else \
        text.index("moetron.launch.preflight") < text.index("moetron.launch moetron.train")


def test_without_nccl_or_with_the_recorder_off_no_nccl_block():
    text = rendered([*LOCAL, "cluster.kill_on_bad_exit=false"])
    assert "NCCL" not in text and "--kill-on-bad-exit=0" in text and "--container" not in text
    text = rendered(["cluster=gpu", "parallel.dp=16", "parallel.ep=8", "train=v3", "cluster.nccl_trace_buffer=0"])
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in text


@pytest.mark.parametrize("override,field", [
    ("cluster.container_image='img;rm -rf x'", "cluster.container_image"),
    ("cluster.container_mounts=['/a:/b,/c:/d']", "cluster.container_mounts[0]"),
    ("cluster.container_mounts=[/a:/b]", "cluster.container_mounts"),  # mounts without an image
    ("cluster.srun_extra=['--cpu-bind=none --x']", "cluster.srun_extra[0]"),
    ("cluster.mpi='pmix;id'", "cluster.mpi"),
    ("cluster.mpi_library='/opt/$(id)/libmpi.so'", "cluster.mpi_library"),
    ("cluster.nccl_ib_hca='mlx5_0 mlx5_1'", "cluster.nccl_ib_hca"),
    ("cluster.nccl_socket_ifname='ib0`id`'", "cluster.nccl_socket_ifname"),
    ("cluster.nccl_trace_buffer=-1", "cluster.nccl_trace_buffer"),
    ("cluster.preflight_min_free_gb=nan", "cluster.preflight_min_free_gb"),
    ("cluster.preflight_mb=-4", "cluster.preflight_mb"),
])
def test_site_values_with_shell_characters_are_refused(override, field):
    with pytest.raises(ConfigError) as err:
        rendered([*LOCAL, override])
    assert f"`{field}`" in str(err.value), str(err.value)


def run_script(tmp_path, text, preflight_rc=0):
    """Run the rendered batch script with stand-ins for srun, scontrol and scancel that log their arguments
    (the preflight step's srun exits `preflight_rc`); returns (exit code, the srun command lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "srun.log"
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$*" >> {log}\n'
                                  f'case "$*" in *moetron.launch.preflight*) exit {preflight_rc};; esac\nexit 0\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    (bin_dir / "scancel").write_text("#!/bin/bash\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_NNODES": "2"}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result.returncode, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_the_preflight_step_runs_first_and_a_failure_stops_the_job(tmp_path, launcher):
    rc, steps = run_script(tmp_path, rendered(LOCAL, launcher))
    assert rc == 0 and len(steps) == 2
    assert "moetron.launch.preflight" in steps[0] and "moetron.train" in steps[1]
    failing = tmp_path / "failing"
    failing.mkdir()
    rc, steps = run_script(failing, rendered(LOCAL, launcher), preflight_rc=1)
    assert rc == 1 and len(steps) == 1 and "moetron.launch.preflight" in steps[0]  # no training step
    skipped = tmp_path / "skipped"
    skipped.mkdir()
    rc, steps = run_script(skipped, rendered([*LOCAL, "cluster.preflight=false"], launcher))
    assert rc == 0 and len(steps) == 1 and "moetron.train" in steps[0]
