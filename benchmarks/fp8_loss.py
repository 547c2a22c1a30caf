"""Does FP8 training (emulated, fine-grained scaling) track BF16 (or FP32), measured against a noise floor?
DeepSeek-V3 (arXiv 2412.19437, §3.3) reports a relative loss error of FP8 vs BF16 below 0.25%.

The same model (default: the `tiny` preset), data (hydra_conf/data/default.yaml: the corpus and tokenizer
`make corpus` builds) and schedule (hydra_conf/train/tiny.yaml: warm-up, constant, cosine, floor, final LR,
batch ramp, MTP switch, every stage in token counts, compressed into `--steps` steps: at the tiny schedule's
micro-batch of 8 sequences each run ends where the cosine decay reaches its floor, min_lr) are trained with
moetron's Trainer in the baseline precision and in FP8 (the same, plus fp8.enabled with the `emulated` backend:
E4M3 1x128 / 128x128 quantization numerics, GEMMs in FP32), once per seed. A seed sets the initialization
only: every run reads the same batches in the same order (data.seed=0), so a baseline and an FP8 run of one
seed differ only by the numerics. Each seed also trains a baseline twin
at another thread count: a change that should not matter, which still changes the rounding of reductions.
A small MoE amplifies any such difference (a token routed to another expert, a balancing bias stepped the
other way), so two runs that differ in the last bit drift apart by tenths of a percent: the twins measure
that drift, the floor below which no precision difference can be seen. Two defaults shrink that drift
(exploratory runs, 2 seeds each, last-50 loss): the tiny schedule's peak LR 3e-3 makes early loss spikes whose
outcome moves a run's loss by about 1% for good (FP8 vs baseline of one seed +1.0%, two baseline seeds 0.9%
apart), so the study trains at `--lr 1e-3`; and the aux-loss-free balancing's sign step (bias += gamma *
sign(mean load - load), arXiv 2412.19437 §2.1.2) turns a last-bit difference in an expert's load into a full
gamma step of its bias near balance, so biases of two runs random-walk apart (at 1e-3 with it: pairs -0.2%
and +1.0%; without it, one pair -0.02%): `--bias-update-rate 0`. What remains sets the run length and the
number of seeds: the twins' drift grows with the steps (RMS over 4 seeds 0.47% after the full 300-step
schedule; 0.28% over 8 seeds of the schedule compressed into 150 steps), and the floor shrinks with
sqrt(seeds), so the default is more seeds of shorter runs (8 x 3 runs of 150 steps in about the time of 4 x 3 of
300). FP8 moves a seed's loss more than a thread count does (RMS 0.37% vs 0.28% in the committed run), in both
directions: `relative_loss_difference_ci95` is the paired test of a systematic difference.
`--lr` and `--bias-update-rate` are options; the sequence-wise balance loss stays on. Spike policy `warn` in
every run, so every update is applied and no rollback changes the batches.

The baseline (`--baseline`) is BF16 (train.precision=bf16, autocast), the report's, where this CPU computes
BF16 GEMMs natively (oneDNN's BF16 path). A CPU without it (AVX2 only) runs BF16 GEMMs in torch's scalar
fallback, 5-20x slower than FP32, and the study would not fit in its time: there the baseline is FP32, still
the high-precision reference FP8 is judged against. `baseline_precision` in the JSON says which.

Per run, L = the mean training loss (LM + lambda * MTP + balance) over the last `--last` steps. Reported:
  relative_loss_error     |mean_s L_fp8(s) - mean_s L_base(s)| / mean_s L_base(s)  (seed-averaged, a fraction)
  relative_loss_difference and its ci95: the mean over seeds of (L_fp8(s) - L_base(s)) / L_base(s), a
                          paired difference, with Student's t 95% interval over the seeds
  baseline_thread_difference_per_seed
                          (L_twin(s) - L_base(s)) / L_base(s): the null pair of each seed
  noise_floor             t95(seeds) * RMS_s(null pair) / sqrt(seeds): how far the seed-averaged difference
                          of two baseline arms that should not differ lands, at 95% (t with as many degrees
                          of freedom as seeds: the null mean is known, zero)
  baseline_seed_spread    std over seeds of L_base(s) / its mean (how much the initialization moves L;
                          it cancels in the paired differences), and baseline_seed_sem = it / sqrt(seeds)
  fp8_within_noise        relative_loss_error <= noise_floor
  passed                  relative_loss_error < 0.0025 (the report's bar)
plus per-seed losses, step times and the sizes. Writes benchmarks/results/fp8_loss.json and fp8_loss.png
(every run's loss curve, and each seed's FP8 - baseline difference).

The runs are independent processes, `--jobs` at a time with `--threads` threads each (default 2 x 1: both
cores of a 2-core machine busy), then the twins, as many at a time as fit in as many threads (default one at a
time with its 2 threads), so their step times share the machine (`study_*_step_s_median`). `wall_s` is the
whole invocation's time (runs kept from an earlier one with `--keep` are not trained again). The step
times that count (`baseline_step_s`, `fp8_step_s`, `fp8_step_time_ratio`) come from short runs afterwards, each
alone on the machine with `--time-threads` threads (default 2), baseline and FP8 in turns, twice: the median
of `--time-steps` steps at the full global batch.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetron.config import DataConfig, ModelConfig, MoetronConfig, MonitorConfig, RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONF = ROOT / "hydra_conf"
THRESHOLD = 0.0025  # DeepSeek-V3 §3.3: FP8 vs BF16 relative loss error below 0.25%


def native_bf16_gemms() -> bool:
    """Does this CPU run BF16 GEMMs in oneDNN's BF16 path (AVX512 / AMX), rather than torch's scalar fallback?"""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
# Student's t, two-sided 95%, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}
TINY_STEPS = 300  # the steps hydra_conf/train/tiny.yaml's token counts are laid out for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="seeds, each trained in the baseline and in FP8")
    p.add_argument("--baseline", choices=("auto", "bf16", "fp32"), default="auto",
                   help="precision FP8 is compared with (auto: bf16 where this CPU has BF16 GEMMs, else fp32)")
    p.add_argument("--steps", type=int, default=150,
                   help=f"optimizer steps per run, the tiny schedule ({TINY_STEPS} steps) compressed into them")
    p.add_argument("--last", type=int, default=25, help="final steps over which each run's loss is averaged")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out micro-batches of the final validation")
    p.add_argument("--model", default="tiny", help="a preset of hydra_conf/model/")
    p.add_argument("--hidden", type=int, default=None, help="override model.hidden_size")
    p.add_argument("--layers", type=int, default=None, help="override model.num_hidden_layers")
    p.add_argument("--experts", type=int, default=None, help="override model.n_routed_experts")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (the tiny schedule's is 3e-3); its min and final LR scale with it")
    p.add_argument("--bias-update-rate", type=float, default=0.0,
                   help="aux-loss-free balancing's bias update speed (the tiny schedule's is 1e-3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--other-threads", type=int, default=None,
                   help="threads of each seed's baseline twin (default: 2 if --threads is 1, else 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one process each)")
    p.add_argument("--time-threads", type=int, default=2,
                   help="threads of the step-time runs (each alone on the machine, baseline and FP8 in turns)")
    p.add_argument("--time-steps", type=int, default=20, help="timed steps per step-time run (after 3 warm-up)")
    p.add_argument("--keep", default=None, help="keep the run directories under this path (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS), help="where fp8_loss.json and fp8_loss.png go")
    args = p.parse_args(argv)
    if not 2 <= args.seeds <= max(T95):
        p.error(f"--seeds ({args.seeds}) must be in 2..{max(T95)}: the spread over seeds needs two, and the "
                f"t table ends there")
    if not 0 < args.last <= args.steps:
        p.error(f"--last ({args.last}) must be in 1..--steps ({args.steps})")
    if args.threads < 1 or args.jobs < 1:
        p.error("--threads and --jobs must be at least 1")
    if args.baseline == "auto":
        args.baseline = "bf16" if native_bf16_gemms() else "fp32"
    if args.other_threads is None:
        args.other_threads = 2 if args.threads == 1 else 1
    if args.other_threads == args.threads or args.other_threads < 1:
        p.error(f"--other-threads ({args.other_threads}) must be at least 1 and differ from --threads ({args.threads})")
    return args


def preset(dataclass, group: str, name: str):
    base = OmegaConf.structured(dataclass)
    return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load(CONF / group / f"{name}.yaml")))


def data_config() -> DataConfig:
    """hydra_conf/data/default.yaml (the corpus and tokenizer `make corpus` builds), paths from the repo root."""
    data = preset(DataConfig, "data", "default")
    data.train_files = [str(ROOT / f) for f in data.train_files]
    data.val_files = [str(ROOT / f) for f in data.val_files]
    data.tokenizer = str(ROOT / data.tokenizer) if data.tokenizer else None
    return data


def compress_schedule(train: TrainConfig, steps: int) -> None:
    """The tiny schedule's stages (token counts laid out for TINY_STEPS steps, and the warm-up) in `steps`."""
    ratio = steps / TINY_STEPS
    for owner, name in ((train, "batch_ramp_tokens"), (train, "mtp_lambda_switch_tokens"),
                        (train, "bias_update_stop_tokens"), (train.optim, "decay_start_tokens"),
                        (train.optim, "decay_tokens"), (train.optim, "final_lr_start_tokens")):
        setattr(owner, name, getattr(owner, name) * ratio)
    train.optim.warmup_steps = max(1, round(train.optim.warmup_steps * ratio))
    train.steps = steps


def build_config(args, fp8: bool, seed: int, threads: int, run_dir: Path) -> MoetronConfig:
    config = MoetronConfig(
        model=preset(ModelConfig, "model", args.model),
        train=preset(TrainConfig, "train", "tiny"),
        data=data_config(),
        run=RunConfig(dir=str(run_dir), progress=False, log_every=1, save_every=args.steps, seed=seed,
                      threads=threads),
        monitor=MonitorConfig(wandb=False, report=False),
    )
    compress_schedule(config.train, args.steps)
    config.train.seq_len, config.train.eval_every = args.seq_len, args.steps
    config.train.eval_batches = args.eval_batches
    for flag, key in (("hidden", "hidden_size"), ("layers", "num_hidden_layers"), ("experts", "n_routed_experts")):
        if getattr(args, flag):
            setattr(config.model, key, getattr(args, flag))
    config.train.bias_update_rate = args.bias_update_rate
    optim, ratio = config.train.optim, args.lr / config.train.optim.lr
    optim.lr, optim.min_lr, optim.final_lr = args.lr, optim.min_lr * ratio, optim.final_lr * ratio
    config.model.max_position_embeddings = max(config.model.max_position_embeddings, args.seq_len)
    config.data.seed = 0  # every run sees the same batches: a seed changes only the initialization
    config.monitor.spike.policy = "warn"
    config.train.precision = args.baseline  # FP8 runs compute the rest of the model in it too
    config.fp8.enabled = fp8
    config.fp8.backend = "emulated"
    return config.validate()


def plan_runs(args) -> list[dict]:
    """Per seed: the baseline, FP8, and the baseline's twin at another thread count (the null pair)."""
    runs = []
    for s in range(args.seeds):
        runs += [{"name": f"base_s{s}", "precision": "base", "seed": s, "threads": args.threads},
                 {"name": f"fp8_s{s}", "precision": "fp8", "seed": s, "threads": args.threads},
                 {"name": f"base_s{s}_t{args.other_threads}", "precision": "base", "seed": s,
                  "threads": args.other_threads}]
    return runs


def twins_at_once(args) -> int:
    """As many twins at --other-threads as fit in --jobs x --threads threads (at least one)."""
    return max(1, args.jobs * args.threads // args.other_threads)


def waves(args, jobs: list[tuple]) -> list[tuple[list[tuple], int]]:
    """The runs at --threads, --jobs at a time, then the twins, twins_at_once at a time: no more threads than
    cores on the machine the defaults are for (a 2-thread twin beside a 1-thread run would share 2 cores
    between 3 threads)."""
    ours = [job for job in jobs if job[0]["threads"] == args.threads]
    twins = [job for job in jobs if job[0]["threads"] != args.threads]
    return [(ours, args.jobs), (twins, twins_at_once(args))]


def _train(config: MoetronConfig) -> list[dict]:
    """Train one run with run.threads threads, in this (pool worker) process; its metrics records."""
    from moetron.train.trainer import Trainer

    torch.set_num_threads(config.run.threads)
    try:
        Trainer(config).fit()
    finally:  # the trainer's preemption handlers would keep this worker from ending on SIGTERM
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
    return _read_metrics(Path(config.run.dir) / "metrics.jsonl")


def train_one(job: tuple) -> dict:
    """One run, in its own process: train (or read a finished run's metrics) and return its records."""
    run, config = job
    metrics = Path(config.run.dir) / "metrics.jsonl"
    start = time.perf_counter()
    trained = not _finished(metrics, config.train.steps)
    records = _train(config) if trained else _read_metrics(metrics)
    # a run kept from an earlier invocation (--keep) counts its own training time
    wall = time.perf_counter() - start if trained else sum(r["step_time"] for r in records)
    return {**run, "records": records, "wall_s": wall}


def _read_metrics(path: Path) -> list[dict]:
    by_step = {}
    for line in open(path):
        record = json.loads(line)
        by_step[record["step"]] = record  # a resumed step replaces the earlier record
    return [by_step[s] for s in sorted(by_step)]


def _finished(path: Path, steps: int) -> bool:
    return path.exists() and [r["step"] for r in _read_metrics(path)] == list(range(1, steps + 1))


def final_loss(run: dict, last: int) -> float:
    return statistics.fmean(r["loss"] for r in run["records"][-last:])


def median_step_s(run: dict) -> float:
    return statistics.median(r["step_time"] for r in run["records"][min(5, len(run["records"]) - 1):])


WARM_UP = 3
TIME_ROUNDS = 2


def time_one(job: tuple) -> tuple[str, float]:
    """One step-time run, alone on the machine, in its own process: the median step time of the timed steps
    at the full global batch (the batch ramp off, no validation; the last step, which saves, not counted)."""
    precision, config = job
    return precision, statistics.median(r["step_time"] for r in _train(config)[WARM_UP:-1])


def time_steps(args, pool_context, scratch: Path) -> dict[str, float]:
    """The baseline's and FP8's step time, each run alone with --time-threads threads, in turns."""
    jobs = []
    for k in range(TIME_ROUNDS):
        for precision in ("base", "fp8"):
            config = build_config(args, precision == "fp8", 0, args.time_threads, scratch / f"time_{precision}_{k}")
            config.train.steps = config.run.save_every = WARM_UP + args.time_steps + 1
            config.train.batch_ramp_start, config.train.eval_every = config.train.global_batch_size, 0
            jobs.append((precision, config.validate()))
    times: dict[str, list[float]] = {"base": [], "fp8": []}
    with pool_context.Pool(1, maxtasksperchild=1) as pool:
        for precision, seconds in pool.imap(time_one, jobs):
            times[precision].append(seconds)
    return {p: statistics.median(t) for p, t in times.items()}


def relative_differences(arm: list[float], base: list[float]) -> list[float]:
    """(arm(s) - base(s)) / base(s) per seed: a paired difference."""
    return [(a - b) / b for a, b in zip(arm, base, strict=True)]


def relative_error(arm: list[float], base: list[float]) -> float:
    """|mean(arm) - mean(base)| / mean(base): the seed-averaged relative error."""
    return abs(statistics.fmean(arm) - statistics.fmean(base)) / statistics.fmean(base)


def noise_floor(null: list[float]) -> float:
    """How far the seed-averaged relative difference of two arms that should not differ can land, at 95%:
    Student's t (as many degrees of freedom as seeds: the null mean is known, zero) times the root mean
    square of the per-seed null differences over sqrt(seeds)."""
    n = len(null)
    return T95[n] * math.sqrt(statistics.fmean(d * d for d in null)) / math.sqrt(n)


def summarize(args, runs: dict[str, dict], alone: dict[str, float]) -> dict:
    seeds = range(args.seeds)
    base = [final_loss(runs[f"base_s{s}"], args.last) for s in seeds]
    fp8 = [final_loss(runs[f"fp8_s{s}"], args.last) for s in seeds]
    twin = [final_loss(runs[f"base_s{s}_t{args.other_threads}"], args.last) for s in seeds]
    base_mean, fp8_mean = statistics.fmean(base), statistics.fmean(fp8)
    paired, null = relative_differences(fp8, base), relative_differences(twin, base)
    diff, half = statistics.fmean(paired), T95[args.seeds - 1] * statistics.stdev(paired) / math.sqrt(args.seeds)
    rel = relative_error(fp8, base)
    seed_spread = statistics.stdev(base) / base_mean
    noise = noise_floor(null)
    step_s = {p: statistics.median(median_step_s(runs[f"{p}_s{s}"]) for s in seeds) for p in ("base", "fp8")}
    cfg = build_config(args, False, 0, args.threads, Path("unused"))
    val = {arm: [runs[f"{arm}_s{s}"]["records"][-1].get("val_loss") for s in seeds] for arm in ("base", "fp8")}
    return {
        "relative_loss_error": rel,
        "baseline_precision": args.baseline,
        "relative_loss_difference": diff,
        "relative_loss_difference_ci95": [diff - half, diff + half],
        "noise_floor": noise,
        "fp8_within_noise": rel <= noise,
        "threshold": THRESHOLD,
        "passed": rel < THRESHOLD,
        "noise_floor_below_threshold": noise < THRESHOLD,
        "baseline_thread_difference": relative_error(twin, base),
        "baseline_thread_difference_per_seed": null,
        "fp8_difference_per_seed": paired,
        "baseline_seed_spread": seed_spread,
        "baseline_seed_sem": seed_spread / math.sqrt(args.seeds),
        "baseline_mean_loss": base_mean,
        "fp8_mean_loss": fp8_mean,
        "baseline_loss_per_seed": base,
        "fp8_loss_per_seed": fp8,
        "baseline_other_threads_loss_per_seed": twin,
        "baseline_final_val_loss_per_seed": val["base"],
        "fp8_final_val_loss_per_seed": val["fp8"],
        "relative_val_loss_error": (relative_error(val["fp8"], val["base"])
                                    if None not in val["base"] + val["fp8"] else None),
        "baseline_step_s": alone["base"],
        "fp8_step_s": alone["fp8"],
        "fp8_step_time_ratio": alone["fp8"] / alone["base"],
        "time_threads": args.time_threads,
        "study_baseline_step_s_median": step_s["base"],
        "study_fp8_step_s_median": step_s["fp8"],
        "seeds": args.seeds,
        "steps": args.steps,
        "lr": cfg.train.optim.lr,
        "bias_update_rate": cfg.train.bias_update_rate,
        "last": args.last,
        "threads": args.threads,
        "other_threads": args.other_threads,
        "jobs": args.jobs,
        "seq_len": cfg.train.seq_len,
        "global_batch_size": cfg.train.global_batch_size,
        "model": args.model,
        "hidden": cfg.model.hidden_size,
        "layers": cfg.model.num_hidden_layers,
        "experts": cfg.model.n_routed_experts,
        "torch_version": torch.__version__,
        "note": f"the study ran {args.jobs} runs at a time ({args.threads} thread(s) each), then the twins "
                f"({args.other_threads} threads each) {twins_at_once(args)} at a time: its step times (study_*) "
                f"follow the machine's load, the losses do not; "
                f"fp8_step_time_ratio comes from runs alone with {args.time_threads} threads",
    }


def plot(args, runs: dict[str, dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = args.baseline.upper()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    steps = [r["step"] for r in runs["base_s0"]["records"]]
    for run in sorted(runs.values(), key=lambda r: r["name"]):
        fp8, alt = run["precision"] == "fp8", run["threads"] != args.threads
        name = "FP8" if fp8 else base
        label = f"{name} seed {run['seed']}" + (f", {run['threads']} threads" if alt else "")
        top.plot(steps, [r["loss"] for r in run["records"]], lw=0.8, alpha=0.75, ls="--" if alt else "-",
                 color=("tab:orange" if fp8 else "tab:green" if alt else "tab:blue"), label=label)
    top.axvspan(steps[-args.last] - 0.5, steps[-1] + 0.5, color="grey", alpha=0.12,
                label=f"last {args.last} steps: FP8 vs {base} {result['relative_loss_difference'] * 100:+.3f}% "
                      f"(noise floor {result['noise_floor'] * 100:.3f}%)")
    top.set_yscale("log")
    top.set_ylabel("training loss")
    top.grid(alpha=0.3, which="both")
    top.legend(fontsize=7, ncol=2)
    top.set_title(f"FP8 (emulated) vs {base}: {args.model}, {args.seeds} seeds, {args.steps} steps, seq {args.seq_len}")
    window = 10
    for s in range(args.seeds):
        b = runs[f"base_s{s}"]["records"]
        for arm, style in ((f"fp8_s{s}", "-"), (f"base_s{s}_t{args.other_threads}", ":")):
            diff = [100 * d for d in relative_differences([r["loss"] for r in runs[arm]["records"]],
                                                          [r["loss"] for r in b])]
            smooth = [statistics.fmean(diff[max(0, i - window + 1): i + 1]) for i in range(len(diff))]
            twin = style == ":"
            bottom.plot(steps, smooth, lw=0.8, ls=style, color=f"C{s}",
                        label=f"seed {s}: {base}, {args.other_threads} threads" if twin else f"seed {s}: FP8")
    for sign in (1, -1):
        bottom.axhline(sign * THRESHOLD * 100, color="tab:red", lw=0.8, ls="--")
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel(f"(run - {base}) / {base}, %\n(mean of {window} steps)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_runs(args)
    with tempfile.TemporaryDirectory(prefix="fp8_loss_") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        jobs = [(run, build_config(args, run["precision"] == "fp8", run["seed"], run["threads"], base / run["name"]))
                for run in plan]
        runs = {}
        context = multiprocessing.get_context("spawn")
        for wave, at_once in waves(args, jobs):
            print(f"fp8_loss: {len(wave)} runs of {args.steps} steps, {at_once} at a time ...", flush=True)
            pool = context.Pool(at_once, maxtasksperchild=1)  # a fresh process per run
            try:
                for run in pool.imap_unordered(train_one, wave):
                    runs[run["name"]] = run
                    print(f"fp8_loss: {run['name']}: last-{args.last} loss {final_loss(run, args.last):.4f}, median "
                          f"step {median_step_s(run) * 1e3:.0f} ms, {run['wall_s']:.0f} s", flush=True)
                pool.close()
            finally:
                pool.terminate()
                pool.join()
        print(f"fp8_loss: step times, {args.baseline} and fp8 in turns, each alone with {args.time_threads} threads ...",
              flush=True)
        alone = time_steps(args, context, Path(tmp))
    result = summarize(args, runs, alone)
    result["wall_s"] = time.perf_counter() - start
    (out / "fp8_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(args, runs, result, out / "fp8_loss.png")
    lo, hi = result["relative_loss_difference_ci95"]
    print(f"seed-averaged loss over the last {args.last} steps: {args.baseline} {result['baseline_mean_loss']:.5f}, "
          f"fp8 {result['fp8_mean_loss']:.5f}; paired difference {result['relative_loss_difference']:+.5f} "
          f"(95% CI {lo:+.5f} .. {hi:+.5f})")
    print(f"noise floor {result['noise_floor']:.5f} ({args.baseline} at {args.other_threads} vs {args.threads} threads, "
          f"per seed {', '.join(f'{d:+.5f}' for d in result['baseline_thread_difference_per_seed'])}); "
          f"fp8_within_noise = {result['fp8_within_noise']}; {args.baseline} seed spread {result['baseline_seed_spread']:.5f}")
    print(f"step time alone, {args.time_threads} threads: {args.baseline} {result['baseline_step_s'] * 1e3:.0f} ms, "
          f"fp8 {result['fp8_step_s'] * 1e3:.0f} ms (x{result['fp8_step_time_ratio']:.2f})")
    print(f"wrote {out / 'fp8_loss.json'} and {out / 'fp8_loss.png'}")
    print(f"relative_loss_error = {result['relative_loss_error']:.4f}")
    return result


if __name__ == "__main__":
    main()
