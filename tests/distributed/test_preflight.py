"""The preflight on 4 gloo processes acting as 2 nodes x 2 ranks: the bandwidth table (all-reduce and
all-to-all within a node, across nodes and over the job), preflight.json, and failures that name the rank."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moetron.parallel.local import free_port, run_local

from moetron.launch.bootstrap import RankInfo
from moetron.launch.preflight import Options, code_version, run

TIMEOUT = 180.0


def two_by_two(rank: int) -> RankInfo:
    return RankInfo("torchrun", rank, rank % 2, 4, 2, rank // 2, 2, "127.0.0.1", 0)


def _preflight(rank, world, run_dir, min_free_gb, odd_rank, expected_rc):
    def version():
        v = code_version()
        return dict(v, tree="0badc0de0badc0de") if rank == odd_rank else v  # an old copy of the code on one rank

    out = io.StringIO()
    rc = run(Options(run_dir=run_dir, device="cpu", min_free_gb=min_free_gb, mb=0.25, iters=2), two_by_two(rank),
             version, out)
    assert rc == expected_rc, (rank, rc, out.getvalue())  # every rank reaches the same verdict
    if rank == 0:
        (Path(run_dir) / "stdout.txt").write_text(out.getvalue())


def test_two_nodes_by_two_ranks_pass_with_a_bandwidth_table(tmp_path):
    run_local(_preflight, 4, (str(tmp_path), 0.0, -1, 0), timeout=TIMEOUT)
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["ok"] and report["message"] == "" and report["failures"] == {}
    assert [r["rank"] for r in report["ranks"]] == [0, 1, 2, 3] and report["num_nodes"] == 2
    groups = {(r["op"], r["scope"]): sorted(tuple(x["ranks"]) for x in report["collectives"]
                                             if (x["op"], x["scope"]) == (r["op"], r["scope"]))
              for r in report["collectives"]}
    for op in ("all_reduce", "all_to_all"):  # the process mesh's node and rail groups, and the world
        assert groups[(op, "within a node")] == [(0, 1), (2, 3)]
        assert groups[(op, "across nodes")] == [(0, 2), (1, 3)]
        assert groups[(op, "whole job")] == [(0, 1, 2, 3)]
    for row in report["collectives"]:
        assert row["ms"] > 0 and row["busbw_gbs"] > 0
        n = len(row["ranks"])  # bus bandwidth = bytes x share / time (nccl-tests' convention)
        share = 2 * (n - 1) / n if row["op"] == "all_reduce" else (n - 1) / n
        assert row["busbw_gbs"] == pytest.approx(  # to the JSON's rounding (3 decimals)
            row["mb"] * 2**20 * share / (row["ms"] / 1e3) / 1e9, rel=0.02, abs=1e-3)
    table = (tmp_path / "stdout.txt").read_text()
    assert "bus GB/s" in table and "all_to_all  across nodes" in table and table.endswith("every check passed\n")


def test_a_code_version_mismatch_fails_naming_the_rank(tmp_path):
    run_local(_preflight, 4, (str(tmp_path), 0.0, 2, 1), timeout=TIMEOUT)
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert not report["ok"] and list(report["failures"]) == ["2"]
    message = report["message"]
    assert "\n" not in message and "rank 2 (" in message and "local rank 0" in message
    assert "tree 0badc0de0badc0de (rank 0: " in message and "1 of 4 ranks" in message
    assert report["collectives"] == []  # nothing timed once a rank is known to be wrong


def test_too_little_disk_fails_on_every_rank(tmp_path):
    run_local(_preflight, 4, (str(tmp_path), 1e9, -1, 1), timeout=TIMEOUT)  # a billion GB free: nowhere
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert sorted(report["failures"]) == ["0", "1", "2", "3"]
    assert "free disk at run.dir" in report["message"] and "cluster.preflight_min_free_gb" in report["message"]


def test_cli_alone_and_with_a_bad_option(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(MOETRON_LAUNCHER="single", MASTER_PORT=str(free_port()))
    ok = subprocess.run([sys.executable, "-m", "moetron.launch.preflight", f"--run-dir={tmp_path}", "--device=cpu",
                         "--min-free-gb=0"], env=env, capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert "moetron preflight: 1 ranks on 1 node(s)" in ok.stdout and ok.stdout.endswith("every check passed\n")
    assert json.loads((tmp_path / "preflight.json").read_text())["ok"]
    bad = subprocess.run([sys.executable, "-m", "moetron.launch.preflight", "--mb=0"], env=env, capture_output=True,
                         text=True, timeout=180)
    assert bad.returncode == 2 and "--mb 0.0" in bad.stderr and "Traceback" not in bad.stderr
