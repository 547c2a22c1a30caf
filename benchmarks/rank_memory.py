"""Peak resident memory of every rank and the time to the first step of a short `make train`-like run.

Runs `torchrun --nproc-per-node=4 -m moetron.train parallel=cpu_2x2 fp8=emulated train.micro_batch_size=1 ...`
(the Makefile's `train`) with a given checkout's Python, polls each rank's VmHWM (/proc/<pid>/status: the
peak resident set) while it runs, and times the launch until the first step's metrics line is written.
`--checkout` is the repository to run (its .venv): run it once on main before issue 13 (every rank builds the
whole FP32 model, then keeps its part) and once on this branch (meta build, only this rank's part
materialized), then `--merge` the two into benchmarks/results/rank_memory.json.

    python benchmarks/rank_memory.py --checkout /path/to/main --label before --out /tmp/before.json --models tiny wide
    python benchmarks/rank_memory.py --checkout . --label after --out /tmp/after.json
    python benchmarks/rank_memory.py --merge /tmp/before.json /tmp/after.json

Two models: `tiny` (the Makefile's, 20 steps) and `wide` (tiny's shape with 64 experts of 512 and hidden
512, 2 steps), where the full model is large next to one rank's part. Besides the run's peak, the peak
until the `start` event (every rank has built its model and optimizer) isolates the set-up. The machine is shared by other jobs:
the times move with its load (memory does not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "rank_memory.json"
MODELS = {
    "tiny": ["model=tiny", "train.steps=20"],
    "wide": ["model=tiny", "model.hidden_size=512", "model.n_routed_experts=64", "model.moe_intermediate_size=512",
             "model.intermediate_size=1536", "model.num_hidden_layers=6", "train.steps=2"],
}
MODELS["wide_bf16"] = [*MODELS["wide"], "train.param_dtype=bf16"]  # after issue 13 only: BF16 parameters


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def peak_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def run(checkout: Path, model: str) -> dict:
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [str(python), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "moetron.train",
               "parallel=cpu_2x2", "fp8=emulated", "train.micro_batch_size=1", f"run.dir={run_dir}",
               "run.progress=false", "train.eval_every=0", "run.log_every=1", *MODELS[model]]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=checkout, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peaks: dict[int, int] = {}
        built: dict[int, int] = {}  # VmHWM when the run's `start` event appears: the set-up's peak
        first_step = None
        metrics, events = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "events.jsonl"
        while proc.poll() is None:
            started = not built and events.exists() and '"start"' in events.read_text()
            for pid in children(proc.pid):
                kb = peak_kb(pid)
                if kb is not None:
                    peaks[pid] = max(peaks.get(pid, 0), kb)
                    if started:
                        built[pid] = kb
            if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
                first_step = time.perf_counter() - start
            time.sleep(0.2)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{model}: the run failed:\n{proc.stderr.read()[-3000:]}")
        last = json.loads(metrics.read_text().splitlines()[-1])
    ranks = sorted(peaks)  # the ranks' pids in start order
    return {"setup_peak_rss_mb_per_rank": [round(built.get(p, 0) / 1024, 1) for p in ranks],
            "peak_rss_mb_per_rank": [round(peaks[p] / 1024, 1) for p in ranks],
            "peak_rss_mb_max": round(max(peaks.values()) / 1024, 1),
            "time_to_first_step_s": round(first_step, 2), "wall_s": round(total, 2), "final_loss": last["loss"],
            "steps": last["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--merge", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.merge:
        before, after = (json.loads(p.read_text()) for p in args.merge)
        out = {"before": before, "after": after, "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(),
               "note": "4 ranks of parallel=cpu_2x2 on a CPU shared with other jobs: times move with the load"}
        for model in before["models"]:
            b, a = before["models"][model], after["models"][model]
            out[f"{model}_peak_rss_ratio"] = round(a["peak_rss_mb_max"] / b["peak_rss_mb_max"], 3)
            out[f"{model}_setup_peak_rss_ratio"] = round(max(a["setup_peak_rss_mb_per_rank"])
                                                         / max(b["setup_peak_rss_mb_per_rank"]), 3)
            out[f"{model}_first_step_ratio"] = round(a["time_to_first_step_s"] / b["time_to_first_step_s"], 3)
            print(f"{model}: set-up peak RSS per rank {b['setup_peak_rss_mb_per_rank']} -> "
                  f"{a['setup_peak_rss_mb_per_rank']} MB, run peak {b['peak_rss_mb_per_rank']} -> "
                  f"{a['peak_rss_mb_per_rank']} MB, "
                  f"time to first step {b['time_to_first_step_s']} -> {a['time_to_first_step_s']} s")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {RESULTS}")
        return
    result = {"label": args.label, "checkout": str(args.checkout), "models": {}}
    for model in args.models:
        result["models"][model] = run(args.checkout.resolve(), model)
        print(model, result["models"][model], flush=True)
    out = args.out or Path(tempfile.gettempdir()) / f"rank_memory_{args.label}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
