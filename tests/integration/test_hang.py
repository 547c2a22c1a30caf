"""A hung rank: SIGSTOP one rank of a 4-rank run (DualPipe pp 2 x dp 2, EP 2). The other ranks' watchdogs
notice within parallel.comm_timeout, write their flight records and exit 124; `python -m moetron.monitor.hang`
names the stopped rank; after it is killed, the rerun resumes from the newest checkpoint and logs the same
losses as an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from moetron.config import DataConfig
from moetron.data import build_data
from moetron.monitor.watchdog import EXIT_HANG

# Three 4-rank launches (two at once): about 2 minutes on a quiet 2-core machine, far more on a loaded one.
pytestmark = pytest.mark.timeout(1200)

TIMEOUT = 20  # parallel.comm_timeout of the hung run, seconds
STOPPED = 2  # the rank that is stopped
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir, corpus, cwd) -> list[subprocess.Popen]:
    """Four ranks as torchrun starts them (the environment names the world), 2 simulated nodes x 2."""
    args = [f"run.dir={run_dir}", "parallel=cpu_2x2", f"parallel.comm_timeout={TIMEOUT}",
            f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null",
            "train.seq_len=16", "train.micro_batch_size=1", "train.global_batch_size=8", "train.batch_ramp_start=8",
            f"train.steps={STEPS}", "train.eval_every=0", "run.save_every=2", "run.log_every=1", "run.progress=false", "run.threads=1",
            "monitor.wandb=false", "monitor.report=false"]
    port = free_port()
    procs = []
    for rank in range(4):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "4", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "4"}
        procs.append(subprocess.Popen([sys.executable, "-m", "moetron.train", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs, timeout: float) -> list[tuple[int, str]]:
    """(return code, stderr) of each; a rank still running after `timeout` fails the test (killed first)."""
    deadline = time.time() + timeout
    out = []
    for rank, proc in enumerate(procs):
        try:
            _, stderr = proc.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} still running {timeout:.0f} s later: the hang was not noticed") from None
        out.append((proc.returncode, stderr))
    return out


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_stopped_rank_is_named_and_the_rerun_resumes_exactly(corpus, tmp_path):
    # Prepared once here, not by eight ranks at once.
    build_data(DataConfig(train_files=[corpus["train"]], val_files=[corpus["val"]], tokenizer=None), 16, 0)
    reference = launch(tmp_path / "straight", corpus, tmp_path)  # uninterrupted, alongside the hung run
    run_dir = tmp_path / "hung"
    procs = launch(run_dir, corpus, tmp_path)
    deadline = time.time() + 400
    while not ((run_dir / "events.jsonl").exists()
               and any(e["event"] == "checkpoint" for e in read(run_dir / "events.jsonl"))):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs + reference:
                p.kill()
            raise AssertionError(f"no checkpoint: {[p.communicate()[1][-2000:] for p in procs]}")
        time.sleep(0.05)
    procs[STOPPED].send_signal(signal.SIGSTOP)  # the first checkpoint is published: stop one rank mid-run
    stopped_at = time.time()
    try:
        others = wait_all([p for r, p in enumerate(procs) if r != STOPPED], TIMEOUT + 90)
        waited = time.time() - stopped_at
        for rc, stderr in others:
            assert rc == EXIT_HANG, stderr[-3000:]
            assert "moetron: hang: rank" in stderr and "Traceback" not in stderr, stderr[-3000:]
        records = {p.name for p in (run_dir / "hang").iterdir()}
        assert records == {"rank_0.json", "rank_1.json", "rank_3.json"}, records

        report = subprocess.run([sys.executable, "-m", "moetron.monitor.hang", str(run_dir)], capture_output=True,
                                text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        assert f"stalled: rank {STOPPED} (wrote no flight record" in report.stdout, report.stdout
        print(f"the others exited {waited:.1f} s after the stop (comm_timeout {TIMEOUT} s)\n{report.stdout}")
    finally:
        procs[STOPPED].kill()
        procs[STOPPED].communicate()
    assert all(rc == 0 for rc, _ in wait_all(reference, 600))

    rerun = wait_all(launch(run_dir, corpus, tmp_path), 600)
    assert all(rc == 0 for rc, _ in rerun), rerun[0][1][-3000:]
    resumed = [e for e in read(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 2
    straight, after = read(tmp_path / "straight" / "metrics.jsonl"), read(run_dir / "metrics.jsonl")
    assert [m["step"] for m in after] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in after] == [m["loss"] for m in straight]
