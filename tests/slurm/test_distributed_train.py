"""The trainer on the local Slurm cluster: 2 nodes x 2 ranks (DualPipe pp=2 x dp=2, EP=2 across
the nodes with node-limited routing), and the same run under mpiexec giving the same losses."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

STEPS = 20


def common(corpus, run_dir):
    return ["parallel=cpu_2x2", f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]", "data.tokenizer=null",
            "train.seq_len=32", "train.eval_every=0", "train.micro_batch_size=1", "run.progress=false",
            f"train.steps={STEPS}", "monitor.wandb=false", "monitor.report=false", f"run.dir={run_dir}"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_two_nodes_by_two_ranks_training_and_mpiexec_agree(slurm, tmp_path, corpus):
    job = slurm.submit(tmp_path, *common(corpus, tmp_path / "slurm-run"), "cluster.job_name=train2x2")
    script = (tmp_path / "slurm-logs" / "train2x2.sbatch").read_text()
    assert "EP groups span 2 node(s); model.n_group=2 topk_group=1" in script  # routing groups = the 2 nodes
    info = slurm.wait(job, timeout=600)
    logs = tmp_path / "slurm-logs" / job / "restart-0"
    batch_log = (tmp_path / "slurm-logs" / f"train2x2-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", batch_log + "".join(p.read_text()[-2000:] for p in logs.glob("*.out"))
    assert f"job {job} restart 0 on node[1-2]" in batch_log
    assert sorted(p.name for p in logs.glob("rank-*.out")) == [f"rank-{r}.out" for r in range(4)]
    assert f"done: step {STEPS}" in (logs / "rank-0.out").read_text()
    preflight = json.loads((tmp_path / "slurm-run" / "preflight.json").read_text())  # the job's first step
    assert preflight["ok"] and [r["node"] for r in preflight["ranks"]] == ["node1", "node1", "node2", "node2"]
    on_slurm = losses(tmp_path / "slurm-run")
    assert max(on_slurm) == STEPS and on_slurm[STEPS] < 0.6 * on_slurm[1], on_slurm  # the loss falls

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists() and shutil.which("mpiexec") is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpiexec / mpi4py not installed: the Slurm half passed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([str(mpiexec if mpiexec.exists() else shutil.which("mpiexec")), "-n", "4", sys.executable,
                          "-m", "moetron.launch", "moetron.train", *common(corpus, tmp_path / "mpi-run")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert losses(tmp_path / "mpi-run") == on_slurm  # same layout, same data: the same losses, bitwise
