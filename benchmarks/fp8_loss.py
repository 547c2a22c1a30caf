"""Does FP8 training (emulated, fine-grained scaling) track BF16? The paper's headline: < 0.25% loss error.

The same model (default: the `tiny` preset of hydra_conf/model/tiny.yaml), the same data (data/corpus, built by
`make corpus`), the same seed and the same schedule (hydra_conf/train/tiny.yaml) are trained twice with moetron's
real trainer: once in BF16 (train.precision=bf16, autocast, fp8.enabled=false) and once in FP8
(train.precision=bf16 with fp8.enabled=true, fp8.backend=emulated: E4M3 1x128 / 128x128 quantization numerics,
GEMMs in FP32). Both runs see the same batches in the same order, so their losses differ only by the numerics.
The loss-spike policy is set to `warn` in both runs, so every update is applied and a rollback cannot make the
two runs see different batches. Each run logs every step (run.log_every=1) to its metrics.jsonl.

relative_loss_error = |mean FP8 loss - mean BF16 loss| / mean BF16 loss over the same last `--last` steps
(a fraction; the paper's headline is below 0.0025). `loss` is the trained objective (LM + lambda * MTP + balance);
the same figure for the LM loss alone is `relative_lm_loss_error`.

Runs go through `moetron.train.trainer.Trainer` in this process by default, or through the command line
(`python -m moetron.train fp8=emulated train.precision=bf16 ...`, one subprocess per run) with `--cli`.
With `--keep DIR` the run directories DIR/bf16 and DIR/fp8 are kept, and a run already there is resumed by the
trainer (a finished one is not retrained: its metrics.jsonl is read as is). The two runs are sequential, so on
a shared machine the step times (and the FP8 emulation's overhead vs BF16, the ratio of median step times) are
only as steady as the machine's load.

Writes benchmarks/results/fp8_loss.json (a flat JSON object; keys below) and fp8_loss.png (both loss curves and
the per-step relative difference):
  relative_loss_error, relative_lm_loss_error, threshold, passed
  bf16_mean_loss, fp8_mean_loss, bf16_mean_lm_loss, fp8_mean_lm_loss   over the last `last` steps
  bf16_final_val_loss, fp8_final_val_loss                              validation at the last step
  bf16_step_s_median, fp8_step_s_median, bf16_step_s_mean, fp8_step_s_mean, fp8_step_time_overhead
  bf16_train_s, fp8_train_s                                             sum of the step times (no setup, eval, saves)
  bf16_non_applied_steps, fp8_non_applied_steps                         steps whose update was not applied
  steps, last, seq_len, micro_batch_size, global_batch_size, batch_ramp_start, threads, seed, params, model, route,
  hidden, layers, experts, torch_version
The headline `relative_loss_error = 0.00xx` is the last line printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetron.config import DataConfig, ModelConfig, MoetronConfig, MonitorConfig, RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONF = ROOT / "hydra_conf"
THRESHOLD = 0.0025  # DeepSeek-V3 §3.3: FP8 vs BF16 relative loss error below 0.25%
RUNS = ("bf16", "fp8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--last", type=int, default=50, help="steps at the end over which the mean losses are compared")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=None, help="default: the tiny preset's (8)")
    p.add_argument("--global-batch", type=int, default=None, help="default: the tiny preset's (16)")
    p.add_argument("--model", default="tiny", help="a preset of hydra_conf/model/")
    p.add_argument("--hidden", type=int, default=None, help="override model.hidden_size")
    p.add_argument("--layers", type=int, default=None, help="override model.num_hidden_layers")
    p.add_argument("--experts", type=int, default=None, help="override model.n_routed_experts")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (run.threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-file", default=str(ROOT / "data" / "corpus" / "train.jsonl"))
    p.add_argument("--val-file", default=str(ROOT / "data" / "corpus" / "val.jsonl"))
    p.add_argument("--cli", action="store_true", help="train through `python -m moetron.train` subprocesses")
    p.add_argument("--concurrent", action="store_true",
                   help="with --cli: train both at once (one process each), so both see the same machine load")
    p.add_argument("--keep", default=None, help="keep the two run directories under this path (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS), help="where fp8_loss.json and fp8_loss.png go")
    args = p.parse_args(argv)
    if args.concurrent and not args.cli:
        p.error("--concurrent needs --cli (each run is its own process)")
    if not 0 < args.last <= args.steps:
        p.error(f"--last ({args.last}) must be in 1..--steps ({args.steps})")
    return args


def preset(dataclass, group: str, name: str):
    base = OmegaConf.structured(dataclass)
    return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load(CONF / group / f"{name}.yaml")))


def sizes(args) -> dict:
    """Every override that makes the two runs' shapes differ from the presets (shared by both routes)."""
    out = {"train.steps": args.steps, "train.seq_len": args.seq_len, "train.eval_every": args.steps,
           "run.seed": args.seed, "run.threads": args.threads}
    if args.micro_batch:
        out["train.micro_batch_size"] = args.micro_batch
    if args.global_batch:
        out["train.global_batch_size"] = args.global_batch
    for flag, key in (("hidden", "hidden_size"), ("layers", "num_hidden_layers"), ("experts", "n_routed_experts")):
        if getattr(args, flag):
            out[f"model.{key}"] = getattr(args, flag)
    return out


def fit_batch_ramp(train: TrainConfig) -> None:
    """Keep the preset's ramp valid when the batch flags shrink or grow the batch."""
    train.batch_ramp_start = min(max(train.batch_ramp_start, train.micro_batch_size), train.global_batch_size)


def build_config(args, precision_run: str, run_dir: Path) -> MoetronConfig:
    config = MoetronConfig(
        model=preset(ModelConfig, "model", args.model),
        train=preset(TrainConfig, "train", "tiny"),
        data=DataConfig(train_files=[args.train_file], val_files=[args.val_file]),
        run=RunConfig(dir=str(run_dir), progress=False, log_every=1, save_every=args.steps),
        monitor=MonitorConfig(wandb=False, report=False),
    )
    for key, value in sizes(args).items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    fit_batch_ramp(config.train)
    config.model.max_position_embeddings = max(config.model.max_position_embeddings, args.seq_len)
    config.monitor.spike.policy = "warn"
    config.train.precision = "bf16"
    config.fp8.enabled = precision_run == "fp8"
    config.fp8.backend = "emulated"
    return config.validate()


def train_in_process(config: MoetronConfig) -> int:
    from moetron.train.trainer import Trainer  # imported here: --cli never needs it

    trainer = Trainer(config)
    trainer.fit()
    return sum(p.numel() for p in trainer.model.parameters())


def cli_command(config: MoetronConfig, args) -> list[str]:
    overrides = [f"model={args.model}", "train=tiny", f"fp8={'emulated' if config.fp8.enabled else 'disabled'}",
                 "train.precision=bf16", f"run.dir={config.run.dir}", "run.progress=false", "run.log_every=1",
                 f"run.save_every={args.steps}", "monitor.wandb=false", "monitor.report=false",
                 "monitor.spike.policy=warn", f"data.train_files=[{args.train_file}]",
                 f"data.val_files=[{args.val_file}]", f"train.batch_ramp_start={config.train.batch_ramp_start}",
                 f"model.max_position_embeddings={config.model.max_position_embeddings}"]
    overrides += [f"{k}={v}" for k, v in sizes(args).items()]
    return [sys.executable, "-m", "moetron.train", *overrides]


def train_cli(configs: list[MoetronConfig], args) -> None:
    """One `python -m moetron.train` per config: one after the other, or all at once with --concurrent."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    batches = [configs] if args.concurrent else [[c] for c in configs]
    for batch in batches:
        procs = [subprocess.Popen(cli_command(c, args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in batch]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"fp8_loss: `python -m moetron.train` failed ({proc.returncode}):\n{err[-4000:]}")


def read_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    by_step = {r["step"]: r for r in records}  # a resumed step replaces the earlier record
    return [by_step[s] for s in sorted(by_step)]


def collect(args, config: MoetronConfig, params: int | None) -> dict:
    run_dir = Path(config.run.dir)
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    if steps != list(range(1, args.steps + 1)):
        sys.exit(f"fp8_loss: {run_dir}/metrics.jsonl has steps {steps[:3]}..{steps[-3:]}, not 1..{args.steps}")
    times = [r["step_time"] for r in records[min(5, len(records) - 1):]]  # the first steps warm up allocators
    return {"records": records, "train_s": sum(r["step_time"] for r in records), "params": params, "config": config,
            "step_median": statistics.median(times), "step_mean": statistics.fmean(times)}


def tail_mean(records: list[dict], key: str, last: int) -> float:
    return statistics.fmean(r[key] for r in records[-last:])


def plot(runs: dict, args, rel: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    steps = [r["step"] for r in runs["bf16"]["records"]]
    labels = {"bf16": "BF16 (autocast)", "fp8": "FP8 emulated (E4M3, 1x128 / 128x128 scales)"}
    colors = {"bf16": "tab:blue", "fp8": "tab:orange"}
    for name in RUNS:
        top.plot(steps, [r["loss"] for r in runs[name]["records"]], color=colors[name], lw=1.0, alpha=0.85,
                 label=labels[name])
    top.axvspan(steps[-args.last] - 0.5, steps[-1] + 0.5, color="grey", alpha=0.12,
                label=f"last {args.last} steps: relative error {rel * 100:.3f}%")
    top.set_ylabel("training loss")
    top.set_yscale("log")
    top.legend()
    top.grid(alpha=0.3, which="both")
    top.set_title(f"FP8 vs BF16, same model/data/seed: {args.model} preset, {args.steps} steps, seq {args.seq_len}")
    diff = [(f["loss"] - b["loss"]) / b["loss"] * 100 for f, b in zip(runs["fp8"]["records"], runs["bf16"]["records"])]
    bottom.plot(steps, diff, color="tab:green", lw=0.8)
    bottom.axhline(0, color="black", lw=0.6)
    for sign in (1, -1):
        bottom.axhline(sign * THRESHOLD * 100, color="tab:red", lw=0.8, ls="--")
    bottom.set_ylabel("(FP8 - BF16) / BF16, %")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fp8_loss_") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        configs = {name: build_config(args, name, base / name) for name in RUNS}
        runs = {}
        if args.cli:
            how = "at once" if args.concurrent else "one after the other"
            print(f"fp8_loss: training {' and '.join(RUNS)} ({args.steps} steps, `python -m moetron.train`, {how}) ...",
                  flush=True)
            train_cli(list(configs.values()), args)
        for name in RUNS:
            params = None
            if not args.cli:
                print(f"fp8_loss: training {name} ({args.steps} steps, Trainer) ...", flush=True)
                torch.set_num_threads(args.threads)
                params = train_in_process(configs[name])
            runs[name] = r = collect(args, configs[name], params)
            print(f"fp8_loss: {name}: final loss {r['records'][-1]['loss']:.4f}, median step "
                  f"{r['step_median'] * 1e3:.0f} ms, {r['train_s']:.0f} s of steps", flush=True)

    bf16, fp8 = runs["bf16"], runs["fp8"]
    means = {f"{n}_mean_{k}": tail_mean(runs[n]["records"], k, args.last) for n in RUNS for k in ("loss", "lm_loss")}
    rel = abs(means["fp8_mean_loss"] - means["bf16_mean_loss"]) / means["bf16_mean_loss"]
    rel_lm = abs(means["fp8_mean_lm_loss"] - means["bf16_mean_lm_loss"]) / means["bf16_mean_lm_loss"]
    cfg = bf16["config"]
    params = bf16["params"]
    if params is None:
        from moetron.model import DeepSeekV3

        params = sum(p.numel() for p in DeepSeekV3(cfg.model).parameters())
    result = {
        "relative_loss_error": rel,
        "relative_lm_loss_error": rel_lm,
        "threshold": THRESHOLD,
        "passed": rel < THRESHOLD,
        **means,
        "bf16_final_val_loss": bf16["records"][-1].get("val_loss"),
        "fp8_final_val_loss": fp8["records"][-1].get("val_loss"),
        "bf16_step_s_median": bf16["step_median"],
        "fp8_step_s_median": fp8["step_median"],
        "bf16_step_s_mean": bf16["step_mean"],
        "fp8_step_s_mean": fp8["step_mean"],
        "fp8_step_time_overhead": fp8["step_median"] / bf16["step_median"],
        "bf16_train_s": bf16["train_s"],
        "fp8_train_s": fp8["train_s"],
        "bf16_non_applied_steps": sum(r.get("action", "apply") != "apply" for r in bf16["records"]),
        "fp8_non_applied_steps": sum(r.get("action", "apply") != "apply" for r in fp8["records"]),
        "steps": args.steps,
        "last": args.last,
        "seq_len": cfg.train.seq_len,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "batch_ramp_start": cfg.train.batch_ramp_start,
        "threads": args.threads,
        "seed": args.seed,
        "params": params,
        "model": args.model,
        "hidden": cfg.model.hidden_size,
        "layers": cfg.model.num_hidden_layers,
        "experts": cfg.model.n_routed_experts,
        "route": ("cli-concurrent" if args.concurrent else "cli") if args.cli else "trainer",
        "torch_version": torch.__version__,
        "note": ("both runs at once, one process each" if args.concurrent else "runs one after the other")
        + " on a shared CPU; step times and the overhead ratio follow the machine's load",
    }
    (out / "fp8_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, args, rel, out / "fp8_loss.png")
    print(f"mean loss over the last {args.last} steps: bf16 {means['bf16_mean_loss']:.5f}, "
          f"fp8 {means['fp8_mean_loss']:.5f} (lm: {means['bf16_mean_lm_loss']:.5f} vs {means['fp8_mean_lm_loss']:.5f}, "
          f"relative {rel_lm:.4f})")
    print(f"median step time: bf16 {bf16['step_median'] * 1e3:.0f} ms, fp8 emulated {fp8['step_median'] * 1e3:.0f} ms "
          f"(overhead x{result['fp8_step_time_overhead']:.2f})")
    print(f"wrote {out / 'fp8_loss.json'} and {out / 'fp8_loss.png'}")
    print(f"relative_loss_error = {rel:.4f}")
    return result


if __name__ == "__main__":
    main()
