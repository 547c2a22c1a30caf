"""Tests on a real Slurm cluster (slurm/local-cluster.sh start). Skipped unless node1 and node2 are up."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONF = "/tmp/moetron-slurm/slurm.conf"


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the local Slurm cluster (make slurm-test); skipped without it")


def _cluster_env():
    conf = os.environ.get("SLURM_CONF") or DEFAULT_CONF
    if not Path(conf).exists():
        return None
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
    if out.returncode or not all(states.get(n, "").rstrip("*") in ("idle", "mix", "alloc") for n in ("node1", "node2")):
        return None
    return env


class Cluster:
    def __init__(self, env):
        self.env = env

    def run(self, *cmd, check=True, **kw):
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=120, **kw)
        if check and out.returncode:
            raise AssertionError(f"{cmd} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def submit(self, cwd, *overrides, launcher=None):
        """`python -m moetron.slurm submit` from cwd (the job's working directory); returns the job id."""
        extra = ["--launcher", launcher] if launcher else []
        out = self.run(sys.executable, "-m", "moetron.slurm", "submit", *extra, "cluster=local",
                       f"cluster.python={sys.executable}", *overrides, cwd=cwd)
        return out.stdout.strip()

    def job(self, job_id) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout=300, poll=1.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(poll)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout}s: {info}")


@pytest.fixture(scope="session")
def slurm(request):
    # Opt-in (make slurm-test, `-m slurm` or MOETRON_SLURM_TESTS=1): a cluster left running must not add
    # minutes of jobs to everyone's `make test`.
    wanted = "slurm" in (request.config.getoption("markexpr") or "") or os.environ.get("MOETRON_SLURM_TESTS") == "1"
    if not wanted and os.environ.get("MOETRON_REQUIRE_SLURM") != "1":
        pytest.skip("Slurm tests run with `make slurm-test` (or pytest -m slurm with the local cluster up)")
    env = _cluster_env()
    if env is None:
        why = "the local Slurm cluster is not up (slurm/local-cluster.sh start, or make slurm-test)"
        if os.environ.get("MOETRON_REQUIRE_SLURM") == "1":  # make slurm-test: a missing cluster is a failure
            pytest.fail(why)
        pytest.skip(why)
    return Cluster(env)
