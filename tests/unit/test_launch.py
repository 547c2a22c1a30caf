"""Rank bootstrap (moetron.launch) from fake torchrun, Slurm and MPI environments, and a real mpiexec run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moetron.config import ConfigError
from moetron.launch import (
    RankInfo,
    detect,
    export_env,
    from_mpi,
    from_slurm,
    from_torchrun,
    parse_tasks_per_node,
)
from moetron.launch.bootstrap import first_host, which_launcher


def slurm_env(rank, ntasks=4, per_node="2(x2)", nodes_of=lambda r: r // 2, local_of=lambda r: r % 2, **extra):
    env = dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_NODEID=str(nodes_of(rank)),
               SLURM_LOCALID=str(local_of(rank)), SLURM_STEP_TASKS_PER_NODE=per_node, SLURM_STEP_ID="0",
               SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu[017-018]", MASTER_ADDR="gpu017")
    env.update(extra)
    return env


def test_torchrun_environment():
    env = dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", GROUP_RANK="1",
               MASTER_ADDR="head", MASTER_PORT="29400", TORCHELASTIC_RUN_ID="x")
    info = detect(env=env)
    assert info == RankInfo("torchrun", 5, 1, 8, 4, 1, 2, "head", 29400)
    assert from_torchrun(env) == info


def test_slurm_environment_every_rank_of_two_nodes():
    infos = [detect(env=slurm_env(r)) for r in range(4)]
    assert [i.launcher for i in infos] == ["slurm"] * 4
    assert [(i.rank, i.local_rank, i.node_rank) for i in infos] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert {(i.world_size, i.ranks_per_node, i.num_nodes, i.master_addr) for i in infos} == {(4, 2, 2, "gpu017")}
    assert infos[0].master_port == 29500 + 1234  # the job id keeps concurrent jobs on one head node apart


def test_slurm_master_addr_defaults_to_the_first_node_of_the_allocation(monkeypatch):
    env = slurm_env(0, MASTER_ADDR="")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    assert from_slurm(env).master_addr == "gpu017"
    assert first_host("node[3,5-7],other1") == "node3"
    assert first_host("single") == "single"


def test_slurm_tasks_per_node_formats():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4,4") == [4, 4]
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE"):
        parse_tasks_per_node("two")


def test_slurm_uneven_nodes_and_cyclic_placement_are_refused():
    with pytest.raises(ConfigError, match="differ between nodes"):
        from_slurm(slurm_env(0, ntasks=3, per_node="2,1"))
    cyclic = slurm_env(1, nodes_of=lambda r: r % 2, local_of=lambda r: r // 2)  # rank 1 on node 1
    with pytest.raises(ConfigError, match="distribution=block"):
        from_slurm(cyclic)


def test_batch_shell_is_not_a_rank():
    batch = {k: v for k, v in slurm_env(0).items() if k != "SLURM_STEP_ID"}
    assert which_launcher(batch) == "single"
    assert which_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    assert detect(env={}).world_size == 1


def test_missing_variable_is_named():
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        detect("torchrun", env=dict(RANK="0", WORLD_SIZE="2"))
    with pytest.raises(ConfigError, match="launcher"):
        detect("pbs", env={})


class FakeComm:
    """One rank's view of an MPI world whose nodes are given by `node_of` (a list: rank -> node name)."""

    def __init__(self, rank, node_of, local=False):
        self.rank, self.node_of, self.local = rank, node_of, local

    def _members(self):
        return [r for r, n in enumerate(self.node_of) if n == self.node_of[self.rank]] if self.local \
            else list(range(len(self.node_of)))

    def Get_rank(self):
        return self._members().index(self.rank)

    def Get_size(self):
        return len(self._members())

    def Split_type(self, split_type, key):
        assert split_type == "shared"
        return FakeComm(self.rank, self.node_of, local=True)

    def Free(self):
        pass

    def bcast(self, value, root):
        if self.local:
            return self._members()[root]  # only used to broadcast the global rank of the node's first member
        return ("head-node", 41000) if self.rank != root else value

    def allgather(self, value):  # what every rank contributes, computed from the layout, in call order
        self.calls = getattr(self, "calls", 0) + 1
        nodes = self.node_of
        if self.calls == 1:  # the leaders (each node's lowest global rank)
            return [min(r for r, m in enumerate(nodes) if m == n) for n in nodes]
        return [nodes.count(n) for n in nodes]  # then the local sizes


def test_mpi_ranks_from_comm_world_and_a_shared_memory_split():
    nodes = ["a", "a", "b", "b"]
    infos = [from_mpi(FakeComm(r, nodes), env={"MASTER_ADDR": "head-node", "MASTER_PORT": "41000"},
                      shared_type="shared") for r in range(4)]
    assert [(i.rank, i.local_rank, i.node_rank) for i in infos] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert {(i.world_size, i.ranks_per_node, i.num_nodes, i.master_addr, i.master_port) for i in infos} == {
        (4, 2, 2, "head-node", 41000)}
    with pytest.raises(ConfigError, match="ranks per node"):
        from_mpi(FakeComm(0, ["a", "a", "b"]), env={}, shared_type="shared")


def test_export_env_writes_the_torchrun_variables():
    env = {}
    export_env(RankInfo("slurm", 3, 1, 4, 2, 1, 2, "node1", 30000), env)
    assert env == dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                       NODE_RANK="1", MASTER_ADDR="node1", MASTER_PORT="30000")
    assert detect(env=env) == RankInfo("torchrun", 3, 1, 4, 2, 1, 2, "node1", 30000)


def _mpiexec():
    exe = Path(sys.executable).parent / "mpiexec"
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        found = None
    return found


@pytest.mark.skipif(_mpiexec() is None, reason="needs mpi4py and mpiexec (pip install mpi4py mpich)")
@pytest.mark.parametrize("ranks,via_launch", [(2, False), (4, True)])
def test_mpiexec_probe(ranks, via_launch):
    """A real MPI launch: every rank learns its place from mpi4py and a gloo all-reduce agrees."""
    module = ["-m", "moetron.launch", "moetron.launch.probe"] if via_launch else ["-m", "moetron.launch.probe"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, *module], env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    # The ranks share one stdout: find each flat `probe {...}` object even if two lines ran together.
    reports = sorted((json.loads(m) for m in re.findall(r"probe (\{[^{}]*\})", out.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(ranks))
    assert [r["local_rank"] for r in reports] == list(range(ranks))  # one host: one shared-memory node
    # via moetron.launch, the probe re-reads the exported torchrun variables
    assert {r["launcher"] for r in reports} == {"torchrun" if via_launch else "mpi"}
    assert all(r["ok"] and r["world_size"] == ranks and r["allreduce"] == ranks * (ranks + 1) / 2 for r in reports)
