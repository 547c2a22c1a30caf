"""Does the planner's prediction hold on this machine? `model=tiny` on `hardware=cpu_local`.

Runs the trainer in a subprocess (single process by default; `--layout cpu_2x2` the 4-rank layout
`parallel=cpu_2x2 train.micro_batch_size=1` under torchrun, `--layout both` the two; a single layout is
merged into an existing JSON), reads step_time from metrics.jsonl (median of
the logged steps after the first) and the peak RSS per process (resource.getrusage of the children),
then asks moetron.plan for the same layout and prints predicted / measured.

Writes benchmarks/results/plan_vs_measured.json (flat), keys per layout L in {single, cpu_2x2}:
  L_predicted_step_s, L_measured_step_s, L_step_ratio        predicted / measured step time
  L_predicted_mem_gb, L_measured_mem_gb, L_mem_ratio          predicted / measured peak memory per rank
  L_steps                                                     trainer steps run
  L_calibrated_gemm_gflops, L_calibrated_op_us                this machine's speed, measured by micro-benchmarks
                                                              (GEMMs at the model's shapes, one eager op) around the run
  L_preset_predicted_step_s, L_preset_step_ratio              the same with the cpu_local preset's constants
The box is shared, so its speed is measured around the run and handed to the planner as hardware.*
overrides; the trainer's own timings are never fed back into the plan.
The first target is every ratio within [0.5, 2].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Same batch at every step (no ramp), no validation, no checkpoint inside the timed window.
COMMON = ["model=tiny", "train=tiny", "train.batch_ramp_start=16", "train.eval_every=0"]

MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys
    proc = subprocess.run(sys.argv[2:], capture_output=True, text=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB; largest child
    json.dump({"rc": proc.returncode, "rss": rss, "err": proc.stderr[-3000:]}, open(sys.argv[1], "w"))
""")


CALIBRATE = textwrap.dedent("""
    import json, sys, time, torch
    # GEMMs at the shapes of model=tiny (1024 tokens of a micro-batch; hidden 128, FFN 384, expert 64,
    # MLA ranks 64/32, vocab 4096) and the cost of one eager op on an activation-sized tensor.
    shapes = [(1024, 128, 384), (1024, 384, 128), (256, 128, 64), (256, 64, 128), (1024, 128, 4096),
              (1024, 128, 64), (1024, 64, 192), (1024, 128, 128)]
    def gemm_rate():
        flops = secs = 0.0
        for n, k, m in shapes:
            a, b = torch.randn(n, k), torch.randn(k, m)
            a @ b
            t = time.perf_counter()
            for _ in range(20):
                a @ b
            secs += time.perf_counter() - t
            flops += 20 * 2 * n * k * m
        return flops / secs / 1e12
    # an eager op: the mix the model launches (activation-sized elementwise, small tensors, views)
    x, y = torch.randn(1024, 128), torch.randn(8, 16)
    ops = [lambda: x.add(1.0), lambda: y.mul(2.0), lambda: x[:, :64], lambda: x.view(-1)]
    def op_cost():
        t = time.perf_counter()
        for _ in range(300):
            for op in ops:
                op()
        return (time.perf_counter() - t) / (300 * len(ops)) * 1e6
    # medians of 7 repetitions: the box is shared and its speed wanders
    gemm_tflops = sorted(gemm_rate() for _ in range(7))[3]
    op_us = sorted(op_cost() for _ in range(7))[3]
    json.dump({"gemm_tflops": gemm_tflops, "op_us": op_us}, sys.stdout)
""")


def calibrate(env: dict, procs: int = 1) -> dict:
    """This machine's speed per rank right now, from micro-benchmarks (never from the trainer): the box is
    shared, and `procs` copies run at once, as many as the layout has ranks sharing the cores."""
    running = [subprocess.Popen([sys.executable, "-c", CALIBRATE], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    results = sorted((json.loads(p.communicate()[0]) for p in running), key=lambda r: r["gemm_tflops"])
    return results[len(results) // 2]


def measure(cmd: list[str], env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        subprocess.run([sys.executable, "-c", MEASURE, str(out), *cmd], env=env, cwd=ROOT, check=False)
        return json.loads(out.read_text())


def step_times(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step_time"] for r in rows if "step_time" in r]


def run_layout(name: str, train_overrides: list[str], plan_overrides: list[str], launcher: list[str],
               steps: int, log_every: int, ranks: int = 1) -> dict | None:
    from moetron.plan import plan

    env = dict(os.environ, OMP_NUM_THREADS="1")  # on a shared box, 2-thread barriers make timings erratic
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [*launcher, "-m", "moetron.train", f"run.dir={run_dir}", f"train.steps={steps}",
               f"run.log_every={log_every}", f"run.save_every={steps}", "run.progress=false",
               "monitor.wandb=false", *COMMON, *train_overrides]
        before = calibrate(env, ranks)
        result = measure(cmd, env)
        after = calibrate(env, ranks)
        if result["rc"] != 0:
            print(f"[{name}] trainer failed (rc {result['rc']}): {result['err'][-600:]}")
            return None
        times = step_times(run_dir)
    measured = statistics.median(times[1:] if len(times) > 1 else times)
    base = [*COMMON, "hardware=cpu_local", "plan.recompute=none", "plan.timeline=", *plan_overrides]
    preset = plan(base)
    gemm = (before["gemm_tflops"] + after["gemm_tflops"]) / 2
    op_us = (before["op_us"] + after["op_us"]) / 2
    p = plan([*base, f"hardware.fp32_tflops={gemm}", "hardware.achievable_fraction=1.0",
              f"hardware.op_overhead_us={op_us}"])
    predicted_mem = p.memory_total / 1e9
    measured_mem = result["rss"] / 1e9
    out = {
        f"{name}_steps": steps,
        f"{name}_calibrated_gemm_gflops": gemm * 1e3, f"{name}_calibrated_op_us": op_us,
        f"{name}_preset_predicted_step_s": preset.step_time, f"{name}_preset_step_ratio": preset.step_time / measured,
        f"{name}_predicted_step_s": p.step_time, f"{name}_measured_step_s": measured,
        f"{name}_step_ratio": p.step_time / measured,
        f"{name}_predicted_mem_gb": predicted_mem, f"{name}_measured_mem_gb": measured_mem,
        f"{name}_mem_ratio": predicted_mem / measured_mem,
    }
    print(f"[{name}] plan (hardware calibrated now: GEMMs at the model's shapes {gemm * 1e3:.1f} GFLOP/s, "
          f"{op_us:.1f} us per eager op; cpu_local preset alone predicts {preset.step_time:.3f} s):\n{p.report()}\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layout", choices=["single", "cpu_2x2", "both"], default="single")
    parser.add_argument("--out", default=str(RESULTS / "plan_vs_measured.json"))
    args = parser.parse_args(argv)
    out: dict = json.loads(Path(args.out).read_text()) if Path(args.out).exists() and args.layout != "both" else {}
    if args.layout in ("single", "both"):
        r = run_layout("single", [], [], [sys.executable], args.steps, log_every=1)
        out.update(r or {})
    if args.layout in ("cpu_2x2", "both"):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
        layout = ["parallel=cpu_2x2", "train.micro_batch_size=1"]  # 8 micro-batches per pipeline, as `make train`
        r = run_layout("cpu_2x2", layout, layout, torchrun, args.steps, log_every=1, ranks=4)
        out.update(r or {})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("layout    predicted step  measured step  ratio   predicted mem  measured mem  ratio")
    for name in ("single", "cpu_2x2"):
        if f"{name}_step_ratio" in out:
            print(f"{name:<9} {out[f'{name}_predicted_step_s']:>12.3f} s {out[f'{name}_measured_step_s']:>12.3f} s "
                  f"{out[f'{name}_step_ratio']:>6.2f} {out[f'{name}_predicted_mem_gb']:>12.3f} GB "
                  f"{out[f'{name}_measured_mem_gb']:>10.3f} GB {out[f'{name}_mem_ratio']:>6.2f}")
    return out


if __name__ == "__main__":
    main()
