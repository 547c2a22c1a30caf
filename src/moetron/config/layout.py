"""The one layout check of every entry point: the trainer at start-up, `python -m moetron.slurm render|submit`
and `python -m moetron.plan` all call `check_layout`, so what one refuses the others refuse too.

It checks what needs the whole config plus the world (launched processes, or nodes x ranks per node of an
allocation): tensor parallelism, the world size, whole micro-batches per replica at the start of the batch
ramp, the process mesh (ranks per node, EP groups covering their nodes evenly, experts per EP rank), the
pipeline stages against the layers, and node-limited routing (arXiv 2412.19437 §2.1.2: expert groups =
nodes of the EP group). Each failure is a ConfigError naming the config field.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from moetron.config.errors import ConfigError, invalid

# The config field behind each parameter name moetron.parallel / moetron.comm / moetron.device report.
CONFIG_FIELDS = {
    "pp": "parallel.pp", "ep": "parallel.ep", "tp": "parallel.tp", "order": "parallel.rank_order",
    "ranks_per_node": "parallel.ranks_per_node", "mode": "parallel.ep_dispatch",
    "num_experts": "model.n_routed_experts", "world_size": "parallel.pp x parallel.dp x parallel.tp",
}


@contextmanager
def config_fields():
    """Show the libraries' parameter errors as errors of the config fields a user sets."""
    from moetron.comm.errors import ParameterError

    try:
        yield
    except ParameterError as err:
        field = CONFIG_FIELDS.get(err.param, err.param)
        raise invalid(field, err.value, err.valid, err.detail) from err


@dataclass(frozen=True)
class Layout:
    """A checked layout: the mesh (moetron.parallel.MeshLayout) and what the entry points report."""

    mesh: object  # moetron.parallel.mesh.MeshLayout (imported late: it pulls in torch.distributed)
    num_stages: int  # pipeline stages of the schedule (DualPipeV: 2 x pp)
    ep_nodes: int  # nodes the widest EP group spans

    def summary(self) -> dict:
        m = self.mesh
        return dict(world_size=m.world_size, ranks_per_node=m.ranks_per_node, pp=m.pp, dp=m.dp, ep=m.ep,
                    tp=m.tp, ep_nodes=self.ep_nodes, num_stages=self.num_stages)


def check_layout(config, world_size: int | None = None, ranks_per_node: int = 0, launched: str = "") -> Layout:
    """Refuse a layout the trainer cannot run, naming the field. `config` is a MoetronConfig (or a subclass);
    `world_size` the processes there will be (None: the layout's own pp x dp x tp), described by `launched`
    in the message; `ranks_per_node` the ranks on each node (0: parallel.ranks_per_node, else the world)."""
    from moetron.parallel import ScheduleError, build_schedule
    from moetron.parallel.mesh import MeshLayout

    par, train, model = config.parallel, config.train, config.model
    world = par.world_size if world_size is None else world_size
    if par.tp != 1:
        raise invalid("parallel.tp", par.tp, "1", "The trainer has no tensor parallelism (the DeepSeek-V3 "
                      "layout uses none).")
    if par.world_size != world:
        raise invalid("parallel.pp x parallel.dp x parallel.tp", f"{par.pp} x {par.dp} x {par.tp} = {par.world_size}",
                      f"a layout whose product is {world} (parallel=single for one process), or "
                      f"{par.world_size} processes", f"The layout needs {par.world_size} ranks, but {launched or world}.")
    rpn = ranks_per_node or par.ranks_per_node or world
    with config_fields():
        mesh = MeshLayout(world, rpn, pp=par.pp, ep=par.ep, tp=par.tp, order=par.rank_order)
        mesh.check_experts(model.n_routed_experts)
    try:  # the stage placement, as parallelize builds it (any micro-batch count will do)
        num_stages = build_schedule(par.schedule, par.pp, 2 * par.pp).num_stages
    except ScheduleError as err:
        raise ConfigError(f"Invalid value for `parallel.pp`: {par.pp} with parallel.schedule={par.schedule}. "
                          f"{err}") from None
    if num_stages > model.num_hidden_layers:
        raise invalid("parallel.pp", par.pp, f"at most {par.pp * model.num_hidden_layers // num_stages} for "
                      f"{par.schedule}", f"{num_stages} pipeline stages cannot share model.num_hidden_layers = "
                      f"{model.num_hidden_layers} Transformer layers (every stage holds at least one).")
    ep_nodes = max(len({r // rpn for r in ranks}) for ranks in mesh.ep_groups())
    if model.n_group > 1 and ep_nodes > 1 and model.n_group % ep_nodes:
        raise invalid("model.n_group", model.n_group, f"1 or a multiple of {ep_nodes}, or a parallel.ep that spans "
                      f"a divisor of {model.n_group} nodes", f"Each EP group (parallel.ep = {par.ep}) spans "
                      f"{ep_nodes} nodes ({rpn} ranks per node), and node-limited routing needs every expert group "
                      "inside one node (groups = nodes).")
    if train.micro_batch_size * par.dp > train.batch_ramp_start:
        raise invalid("train.micro_batch_size", train.micro_batch_size,
                      f"at most train.batch_ramp_start / parallel.dp = {train.batch_ramp_start // par.dp}",
                      f"Every data-parallel replica needs whole micro-batches from the first step on "
                      f"(train.batch_ramp_start = {train.batch_ramp_start} sequences over parallel.dp = {par.dp}).")
    return Layout(mesh, num_stages, ep_nodes)
