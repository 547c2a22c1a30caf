"""The process mesh's arithmetic: groups partition the world, EP is carved from DP, nodes and rails are
right, and invalid layouts fail with a message naming the field, the value and what is valid."""

import subprocess
import sys

import pytest
from moetron.comm.errors import ParameterError
from moetron.comm.layout import EPGroup, local_size_of, node_slices
from moetron.parallel.mesh import KINDS, MeshLayout

from moetron.config.errors import ConfigError
from moetron.config.layout import config_fields


def partitions_world(groups, world):
    flat = sorted(r for g in groups for r in g)
    return flat == list(range(world))


@pytest.mark.parametrize("world,rpn,pp,ep,tp", [
    (4, 2, 1, 4, 1), (8, 2, 2, 2, 1), (16, 8, 2, 8, 1), (16, 4, 1, 4, 2), (8, 4, 1, 2, 1), (1, 1, 1, 1, 1),
    (2048, 8, 16, 64, 1),
])
def test_groups_partition_the_world(world, rpn, pp, ep, tp):
    lay = MeshLayout(world, rpn, pp=pp, ep=ep, tp=tp)
    sizes = dict(pp=pp, dp=lay.dp, tp=tp, ep=ep, edp=lay.edp, node=rpn, rail=lay.num_nodes)
    for kind in KINDS:
        groups = getattr(lay, f"{kind}_groups")()
        assert partitions_world(groups, world), kind
        assert {len(g) for g in groups} == {sizes[kind]}, kind
    for rank in range(0, world, max(1, world // 64)):
        c = lay.coords(rank)
        assert lay.rank_of(c["pp"], c["dp"], c["tp"]) == rank
        assert set(lay.group_of("ep", rank)) <= set(lay.group_of("dp", rank))  # EP carved from DP
        assert set(lay.group_of("edp", rank)) <= set(lay.group_of("dp", rank))
        # an EP group and an expert-data-parallel group meet in exactly this rank
        assert set(lay.group_of("ep", rank)) & set(lay.group_of("edp", rank)) == {rank}
        assert all(r // rpn == c["node"] for r in lay.group_of("node", rank))
        assert all(r % rpn == c["local"] for r in lay.group_of("rail", rank))
        assert len({r // rpn for r in lay.group_of("rail", rank)}) == lay.num_nodes


def test_v3_production_layout():
    """arXiv 2412.19437 §3.2: 2048 ranks, 8 per node, PP 16, EP 64 over 8 nodes, DP (ZeRO-1) over the rest."""
    lay = MeshLayout(2048, 8, pp=16, ep=64)
    assert (lay.dp, lay.edp, lay.num_nodes) == (128, 2, 256)
    ep = lay.group_of("ep", 5)
    assert len(node_slices(ep, 8)) == 8 and local_size_of(ep, 8) == 8
    assert lay.group_of("pp", 0) == [128 * s for s in range(16)]


def test_ep_group_view():
    g = EPGroup(ranks=tuple(range(8)), rank=5, local_size=2)
    assert (g.size, g.num_nodes, g.node, g.local) == (8, 4, 2, 1)
    assert g.rail_ranks() == [1, 3, 5, 7] and g.intra_ranks() == [4, 5]
    assert g.experts_per_rank(16) == 2
    with pytest.raises(ParameterError, match="num_experts"):
        g.experts_per_rank(12)


@pytest.mark.parametrize("kwargs,param,field,hint", [
    (dict(world_size=6, ranks_per_node=4), "ranks_per_node", "parallel.ranks_per_node", "divisor of the world size 6"),
    (dict(world_size=8, ranks_per_node=2, pp=3), "pp", "parallel.pp", "dividing the world size 8"),
    (dict(world_size=8, ranks_per_node=2, pp=2, ep=3), "ep", "parallel.ep", "dp = world 8"),
    (dict(world_size=12, ranks_per_node=4, ep=6), "ep", "parallel.ep", "unevenly"),
    (dict(world_size=8, ranks_per_node=2, ep=0), "ep", "parallel.ep", "positive integer"),
    (dict(world_size=8, ranks_per_node=2, tp=16), "pp", "parallel.pp", "pp x tp"),
    (dict(world_size=8, ranks_per_node=2, order="dp-tp"), "order", "parallel.rank_order", "tp-dp-pp"),
])
def test_invalid_layouts_name_the_parameter_and_the_trainer_the_field(kwargs, param, field, hint):
    """The library names its own parameter; the trainer's config_fields() shows the config field."""
    with pytest.raises(ParameterError) as err:
        MeshLayout(**kwargs)
    assert err.value.param == param and f"`{param}`" in str(err.value) and hint in str(err.value)
    with pytest.raises(ConfigError) as shown, config_fields():
        MeshLayout(**kwargs)
    message = str(shown.value)
    assert f"`{field}`" in message and hint in message and "Valid" in message, message
    assert "\n" not in message


def test_experts_must_divide_by_ep():
    lay = MeshLayout(8, 2, ep=4)
    lay.check_experts(16)
    with pytest.raises(ParameterError, match="`ep`"):
        lay.check_experts(10)


def test_comm_and_mesh_import_no_model_trainer_data_or_hydra():
    """ARCHITECTURE.md boundaries: moetron.comm and moetron.parallel take plain modules and groups."""
    code = ("import sys, moetron.comm, moetron.parallel.mesh; "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['moetron', 'model'], ['moetron', 'train'], "
            "['moetron', 'data']) or m.split('.')[0] in ('hydra', 'omegaconf')]; print(bad); assert not bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
