"""Compose, validate and render an sbatch script for a moetron run (no Slurm needed until `submit`)."""

from __future__ import annotations

import os
import re
import shlex
from importlib import resources

from omegaconf import OmegaConf

from moetron.config.cluster import ClusterConfig, SlurmJobConfig, validate_cluster
from moetron.config.errors import ConfigError
from moetron.config.layout import check_layout

TEMPLATES = {"srun": "srun.sbatch", "torchrun": "torchrun.sbatch"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def load(overrides: list[str]) -> SlurmJobConfig:
    """hydra_conf/slurm.yaml + overrides -> the typed, validated config (ConfigError on a bad value).

    config.yaml builds on `moetron_schema`; for this composition that name means SlurmJobConfig (the
    training schema plus `cluster`), and MoetronConfig again afterwards, so the trainer's schema is untouched."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moetron.config import MoetronConfig

    store = ConfigStore.instance()
    store.store(name="moetron_schema", node=SlurmJobConfig)
    try:
        with initialize_config_module("moetron.hydra_conf", version_base=None):
            cfg = compose("slurm", overrides=list(overrides))
        config: SlurmJobConfig = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"Invalid override or config: {message}") from None
    finally:
        store.store(name="moetron_schema", node=MoetronConfig)
    config.validate()
    validate_cluster(config.cluster)
    return config


def check_cluster_layout(config: SlurmJobConfig) -> dict:
    """Does the parallel layout fit the cluster? Returns a summary; raises ConfigError naming the fields."""
    c, p = config.cluster, config.parallel
    rpn = c.rpn
    world = p.pp * p.dp * p.tp
    if c.nodes * rpn != world:
        per_node = "cluster.ranks_per_node" if c.ranks_per_node or not c.gpus_per_node else "cluster.gpus_per_node"
        options = []
        if world % rpn == 0:
            options.append(f"cluster.nodes={world // rpn}")
        if (c.nodes * rpn) % (p.pp * p.tp) == 0:
            options.append(f"parallel.dp={c.nodes * rpn // (p.pp * p.tp)}")
        hint = " or ".join(options) if options else f"a world size that is a multiple of {rpn}"
        raise ConfigError(
            f"Invalid layout: cluster.nodes ({c.nodes}) x {per_node} ({rpn}) = {c.nodes * rpn} ranks, but "
            f"parallel.pp x parallel.dp x parallel.tp = {p.pp} x {p.dp} x {p.tp} = {world}. Valid: the same "
            f"number, e.g. {hint}.")
    if p.ranks_per_node and p.ranks_per_node != rpn:
        raise ConfigError(
            f"Invalid value for `parallel.ranks_per_node`: {p.ranks_per_node}. The cluster runs {rpn} ranks per "
            f"node ({'cluster.ranks_per_node' if c.ranks_per_node else 'cluster.gpus_per_node'}). Valid: 0 (taken "
            f"from the launcher) or {rpn}.")
    # What the trainer checks at start-up (config/layout.py), for the world this allocation launches.
    checked = check_layout(config, world, rpn, f"the allocation runs {c.nodes * rpn} ranks")
    m = config.model
    return dict(checked.summary(), nodes=c.nodes, n_group=m.n_group, topk_group=m.topk_group)


def trainer_overrides(overrides: list[str]) -> list[str]:
    """The overrides the trainer takes: everything except the cluster's own (cluster=..., cluster.x=...)."""
    def is_cluster(o: str) -> bool:
        key = o.lstrip("+~").split("=", 1)[0]
        return key == "cluster" or key.startswith("cluster.") or key.startswith("cluster@")
    return [o for o in overrides if not is_cluster(o)]


def _sbatch_lines(c: ClusterConfig) -> list[str]:
    lines = [f"--time={c.time}"]
    for flag, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos), ("mem", c.mem)):
        if value:
            lines.append(f"--{flag}={shlex.quote(value)}")
    if c.gpus_per_node:
        lines.append(f"--gpus-per-node={c.gpus_per_node}")
    lines += list(c.sbatch_extra)
    return [f"#SBATCH {line}" for line in lines]


def _srun_options(c: ClusterConfig) -> str:
    """The options every srun step of the job takes (preflight and training): the site's conventions."""
    options = [f"--kill-on-bad-exit={int(c.kill_on_bad_exit)}"]
    if c.container_image:  # pyxis
        options.append(f"--container-image={shlex.quote(c.container_image)}")
    if c.container_mounts:
        options.append(f"--container-mounts={shlex.quote(','.join(c.container_mounts))}")
    if c.mpi:
        options.append(f"--mpi={shlex.quote(c.mpi)}")
    return " ".join(options + list(c.srun_extra))


def _environment(c: ClusterConfig, run_dir: str) -> list[str]:
    lines = []
    if c.nccl:
        lines += [
            "# One hardware work queue per GPU: kernels start in issue order, so a communication kernel issued",
            "# before a computation kernel runs alongside it (what the F&B overlap of EP all-to-all relies on).",
            "export CUDA_DEVICE_MAX_CONNECTIONS=1",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed or hung collective ends the job instead of hanging it",
            'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        ]
        if c.nccl_ib_hca:
            lines.append(f"export NCCL_IB_HCA={shlex.quote(c.nccl_ib_hca)}  # the InfiniBand adapters NCCL uses")
        if c.nccl_socket_ifname:
            lines.append(f"export NCCL_SOCKET_IFNAME={shlex.quote(c.nccl_socket_ifname)}  # the interface NCCL "
                         "bootstraps on")
        if c.nccl_trace_buffer:
            trace = shlex.quote(os.path.join(run_dir, "nccl_trace"))
            lines += [
                "# NCCL flight recorder: each rank keeps its last collectives and dumps them on a timeout into",
                "# run.dir/nccl_trace/rank_<N> (read with torch's fr_trace tool).",
                f"export TORCH_NCCL_TRACE_BUFFER_SIZE={c.nccl_trace_buffer}",
                "export TORCH_NCCL_DUMP_ON_TIMEOUT=1",
                f"export TORCH_NCCL_DEBUG_INFO_TEMP_FILE={trace}/rank_",
                f"mkdir -p {trace}",
            ]
    if c.mpi_library:  # mpi4py loads this libmpi instead of the one of the bundled `mpich` wheel
        lines.append(f"export MPI4PY_LIBMPI={shlex.quote(c.mpi_library)}")
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items()]
    return lines


def _preflight_args(config: SlurmJobConfig) -> str:
    c = config.cluster
    return " ".join([f"--run-dir={shlex.quote(config.run.dir)}", f"--device={shlex.quote(config.run.device)}",
                     f"--min-free-gb={c.preflight_min_free_gb:g}", f"--mb={c.preflight_mb:g}"])


def render(config: SlurmJobConfig, overrides: list[str], launcher: str | None = None) -> str:
    """The sbatch script (text). `overrides` are the command line's; the trainer gets all but cluster.*."""
    validate_cluster(config.cluster)  # also when called without load(): nothing unchecked reaches the script
    layout = check_cluster_layout(config)
    c = config.cluster
    launcher = launcher or c.launcher
    if launcher not in TEMPLATES:
        raise ConfigError(f"Invalid value for `cluster.launcher`: {launcher!r}. Valid: {' | '.join(TEMPLATES)}.")
    template = resources.files("moetron.slurm").joinpath("templates", TEMPLATES[launcher]).read_text()
    cpus = c.cpus_per_rank * (layout["ranks_per_node"] if launcher == "torchrun" else 1)
    values = dict(
        job_name=shlex.quote(c.job_name), nodes=c.nodes, ranks_per_node=layout["ranks_per_node"], world_size=layout["world_size"],
        cpus_per_task=cpus, sbatch_lines="\n".join(_sbatch_lines(c)), log_dir=shlex.quote(c.log_dir),
        signal_seconds=c.signal_seconds, requeue_flag="requeue" if c.requeue else "no-requeue",
        requeue=int(c.requeue), max_requeues=c.max_requeues,
        setup="\n".join(c.setup) if c.setup else "# (no cluster.setup lines)",
        workdir=shlex.quote(c.workdir) if c.workdir else '"$SLURM_SUBMIT_DIR"',
        rdzv_port=c.rdzv_port, environment="\n".join(_environment(c, config.run.dir)), python=shlex.quote(c.python),
        srun_options=_srun_options(c), preflight=int(c.preflight), preflight_args=_preflight_args(config),
        module=shlex.quote(c.module), args=" ".join(shlex.quote(o) for o in trainer_overrides(overrides)),
        layout=(f"pp={layout['pp']} dp={layout['dp']} ep={layout['ep']} tp={layout['tp']}; EP groups span "
                f"{layout['ep_nodes']} node(s); model.n_group={layout['n_group']} topk_group={layout['topk_group']}"),
    )

    def fill(match: re.Match) -> str:
        return str(values[match.group(1)])  # a KeyError here is a bug in a template, not a user mistake

    return _PLACEHOLDER.sub(fill, template)
