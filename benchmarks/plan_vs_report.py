"""Does the planner reproduce the DeepSeek-V3 report? model=v3_671b on the report's layout:
2,048 H800 (8 per node), PP 16 with DualPipe, EP 64 over 8 nodes, ZeRO-1 DP 128, FP8, sequence 4K,
batch 15,360. Targets: fits in 80 GB per rank; GPU-hours per trillion tokens within 30% of 180K.

Prints the plan, then the sensitivity of the headline to the assumptions (achievable fraction of peak
TFLOP/s; inter-node bandwidth; recompute) and writes benchmarks/results/plan_vs_report.json (flat):
  memory_gb, fits, gpu_hours_per_trillion_tokens, report_gpu_hours_per_trillion_tokens (180000),
  ratio_to_report, within_30pct, step_time_s, tokens_per_s_per_gpu, mfu, comm_hidden_share, bubble_share,
  achievable_fraction, mem_<item>_gb (per item), sens_fraction_<f>_gpu_hours (per fraction f),
  sens_ib_<gbps>_gpu_hours, sens_recompute_<mode>_memory_gb
and benchmarks/results/plan_vs_report.png (the simulated timeline of one step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from moetron.parallel.timeline import plot_timeline

from moetron.plan import load_plan_config, make_plan

ROOT = Path(__file__).resolve().parents[1]
REPORT_GPU_HOURS = 180e3
LAYOUT = ["model=v3_671b", "train=v3", "fp8=emulated", "hardware=h800", "parallel.pp=16", "parallel.dp=128",
          "parallel.ep=64", "parallel.tp=1", "parallel.schedule=dualpipe", "parallel.ranks_per_node=8",
          "train.seq_len=4096", "train.global_batch_size=15360", "train.micro_batch_size=1", "plan.timeline="]


def with_hardware(cfg, **changes):
    return dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, **changes))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0.25,0.3,0.35,0.4,0.45,0.5,0.6")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/plan_vs_report.json"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the plan")
    args = parser.parse_args(argv)
    cfg = load_plan_config([*LAYOUT, *args.overrides])
    plan = make_plan(cfg)
    print(plan.report())
    png = plot_timeline(plan.sim, Path(args.out).with_suffix(".png"),
                        title=f"v3_671b on 2048 x H800, DualPipe PP16, 120 micro-batches: step {plan.step_time:.1f} s")
    out = {k: v for k, v in plan.as_dict().items() if isinstance(v, (int, float, bool, str))}
    out["report_gpu_hours_per_trillion_tokens"] = REPORT_GPU_HOURS
    out["ratio_to_report"] = plan.gpu_hours_per_trillion / REPORT_GPU_HOURS
    out["within_30pct"] = abs(out["ratio_to_report"] - 1) <= 0.30

    print("\nsensitivity to the achievable fraction of peak TFLOP/s:")
    print(" fraction  step s  tok/s/GPU   MFU   GPU-h/T   vs 180K")
    for f in (float(x) for x in args.fractions.split(",")):
        p = make_plan(with_hardware(cfg, achievable_fraction=f))
        out[f"sens_fraction_{f:g}_gpu_hours"] = p.gpu_hours_per_trillion
        mark = " <- assumed" if abs(f - cfg.hardware.achievable_fraction) < 1e-9 else ""
        print(f"  {f:>6.2f} {p.step_time:>7.1f} {p.tokens_per_s_per_gpu:>10,.0f} {100 * p.mfu:>5.1f}% "
              f"{p.gpu_hours_per_trillion / 1e3:>7.0f}K {p.gpu_hours_per_trillion / REPORT_GPU_HOURS - 1:>+8.0%}{mark}")
    print("sensitivity to the inter-node bandwidth per GPU (all-to-all, DP sync, P2P):")
    for gbps in (25.0, 40.0, 50.0):
        p = make_plan(with_hardware(cfg, internode_gbps=gbps))
        out[f"sens_ib_{gbps:g}_gpu_hours"] = p.gpu_hours_per_trillion
        print(f"  {gbps:>4g} GB/s: {p.gpu_hours_per_trillion / 1e3:.0f}K GPU-h/T, {100 * p.comm_hidden:.0f}% of communication hidden")
    print("memory per rank by recompute option:")
    for mode in ("none", "selective", "full"):
        p = make_plan(dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, recompute=mode)))
        out[f"sens_recompute_{mode}_memory_gb"] = p.memory_total / 1e9
        print(f"  {mode:<9}: {p.memory_total / 1e9:6.1f} GB ({'fits' if p.fits else 'does NOT fit'}), "
              f"{p.gpu_hours_per_trillion / 1e3:.0f}K GPU-h/T")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\ntimeline: {png}")
    print(f"report check: {plan.memory_total / 1e9:.1f} GB per rank of 80 ({'fits' if plan.fits else 'does NOT fit'}); "
          f"{plan.gpu_hours_per_trillion / 1e3:.0f}K GPU-hours per trillion tokens vs the report's 180K "
          f"({out['ratio_to_report'] - 1:+.0%}, {'within' if out['within_30pct'] else 'OUTSIDE'} 30%) "
          f"at {cfg.hardware.achievable_fraction:.0%} of peak TFLOP/s")
    return out


if __name__ == "__main__":
    main()
