"""On the local two-node Slurm cluster: rendered templates run, preemption requeues and resumes exactly,
and a bad layout never reaches sbatch."""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def probe_reports(text: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"probe (\{.*\})", text)]


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_two_nodes_by_two_ranks_probe(slurm, tmp_path, launcher):
    job = slurm.submit(tmp_path, "parallel.dp=4", "train.micro_batch_size=1", "cluster.module=moetron.launch.probe",
                       f"cluster.job_name=probe-{launcher}", launcher=launcher)
    info = slurm.wait(job, timeout=240)
    logs = tmp_path / "slurm-logs" / job / "restart-0"
    batch_log = (tmp_path / "slurm-logs" / f"probe-{launcher}-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch_log
    text = "".join(p.read_text() for p in sorted(logs.rglob("*.out")) + sorted(logs.rglob("stdout.log")))
    reports = {r["rank"]: r for r in probe_reports(text)}  # torchrun --tee writes each line twice
    assert sorted(reports) == [0, 1, 2, 3], text
    nodes = [reports[r]["node"] for r in range(4)]
    if launcher == "srun":  # block distribution: ranks 0-1 on the first node
        assert nodes == ["node1", "node1", "node2", "node2"]
    else:  # c10d rendezvous numbers the nodes in arrival order
        assert nodes[0] == nodes[1] != nodes[2] == nodes[3] and set(nodes) == {"node1", "node2"}
    assert [reports[r]["local_rank"] for r in range(4)] == [0, 1, 0, 1]
    assert [reports[r]["node_rank"] for r in range(4)] == [0, 0, 1, 1]
    for r in reports.values():
        assert r["ok"] and r["world_size"] == 4 and r["num_nodes"] == 2 and r["ranks_per_node"] == 2
        assert r["nodes_seen"] == ["node1", "node2"] and r["allreduce"] == 10.0
    if launcher == "srun":
        assert sorted(p.name for p in logs.glob("rank-*.out")) == [f"rank-{i}.out" for i in range(4)]
    # The preflight ran first, on both nodes: its table in the batch log, its report in run.dir.
    assert "moetron preflight: 4 ranks on 2 node(s), 2 per node" in batch_log
    assert "moetron preflight: ok, every check passed" in batch_log
    assert batch_log.index("every check passed") < batch_log.index("job step exited")
    report = json.loads((tmp_path / "runs" / "default" / "preflight.json").read_text())
    assert report["ok"] and sorted(r["node"] for r in report["ranks"]) == ["node1", "node1", "node2", "node2"]
    scopes = {(r["op"], r["scope"]) for r in report["collectives"]}
    assert scopes == {(op, s) for op in ("all_reduce", "all_to_all") for s in ("within a node", "across nodes", "whole job")}
    assert all(r["busbw_gbs"] > 0 for r in report["collectives"])


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_a_failed_preflight_stops_the_job_before_training(slurm, tmp_path, launcher):
    job = slurm.submit(tmp_path, "parallel.dp=4", "train.micro_batch_size=1", "cluster.preflight_min_free_gb=1e9",
                       f"cluster.job_name=nodisk-{launcher}", launcher=launcher)
    info = slurm.wait(job, timeout=240)
    batch_log = (tmp_path / "slurm-logs" / f"nodisk-{launcher}-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("1:"), (info, batch_log)
    assert re.search(r"moetron preflight: failed on 4 of 4 ranks, nothing was trained\. rank 0 \(node[12], local "
                     r"rank 0\): free disk at run\.dir runs/default is [0-9.]+ GB, below the minimum", batch_log), batch_log
    assert "moetron: preflight failed (step exit" in batch_log and "job step exited" not in batch_log
    assert not (tmp_path / "runs" / "default" / "metrics.jsonl").exists()


def test_usr1_requeues_and_the_job_resumes_exactly(slurm, tmp_path, corpus):
    common = [f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null", "train.seq_len=32",
              "train.eval_every=0", "run.progress=false", "run.save_every=1000", "train.steps=150",
              "monitor.wandb=false", "monitor.report=false"]
    run_dir = tmp_path / "slurm-run"
    job = slurm.submit(tmp_path, "cluster.nodes=1", "cluster.ranks_per_node=1", "cluster.job_name=preempt",
                       f"run.dir={run_dir}", *common)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    assert metrics.exists(), slurm.job(job)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@SECS does before the limit

    # Uninterrupted reference, on this machine, while the job is requeued and resumed.
    straight = subprocess.run([sys.executable, "-m", "moetron.train", f"run.dir={tmp_path / 'straight'}", *common],
                              cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr

    # The batch script forwards USR1, the trainer checkpoints and exits 75, the script requeues the job, and
    # Slurm starts it again (after AuthInfo=cred_expire, 10 s on the local cluster).
    info = slurm.wait(job, timeout=300)
    batch_log = (tmp_path / "slurm-logs" / f"preempt-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, batch_log)
    assert "requeueing job" in batch_log and f"job {job} restart 1 on node1" in batch_log

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    stop = next(e for e in events if e["event"] == "preempted")
    assert stop["signal"] == "SIGUSR1" and stop["slurm_restart_count"] == 0 and 0 < stop["step"] < 150
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == stop["step"] and resume["checkpoint"].endswith(f"step_{stop['step']:08d}")
    if "slurm_restart_count" in resume:
        assert resume["slurm_restart_count"] == 1
    first = (tmp_path / "slurm-logs" / job / "restart-0" / "rank-0.out").read_text()
    assert f"stopped by SIGUSR1 after step {stop['step']}" in first
    assert "done: step 150" in (tmp_path / "slurm-logs" / job / "restart-1" / "rank-0.out").read_text()

    a = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    b = [json.loads(line) for line in open(metrics)]
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no step repeated or lost
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # and bitwise the same losses


def test_bad_layout_is_refused_before_sbatch(slurm, tmp_path):
    name = f"refused-{uuid.uuid4().hex[:8]}"
    out = subprocess.run([sys.executable, "-m", "moetron.slurm", "submit", "cluster=local", "parallel.dp=3",
                          f"cluster.job_name={name}"], cwd=tmp_path, env=slurm.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "cluster.nodes (2)" in out.stderr and "parallel.dp" in out.stderr
    assert not (tmp_path / "slurm-logs").exists()
    queued = slurm.run("squeue", "-h", "-a", "-n", name, "-o", "%i").stdout.strip()
    known = slurm.run("scontrol", "show", "jobs", "-o", check=False).stdout
    assert queued == "" and name not in known
