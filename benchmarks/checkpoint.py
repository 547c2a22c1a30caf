"""How long does a checkpoint stall training? `run.async_checkpoint=false` (the step waits for DCP's write,
the manifest's checksums and the publish) against `run.async_checkpoint=true` (the step waits for a host
copy of the state; DCP's async_save writes it in a background thread, the manifest is hashed there too, and
the checkpoint is published at a later step boundary).

The trainer itself runs (`Trainer.fit`, one process, the `tiny` preset: model, train and data of
`python -m moetron.train`, validation off), once per mode, each in a fresh run.dir, with a checkpoint every
`--save-every` steps. Per mode:
  blocked_s: per save step, the seconds the training thread spent in `Trainer.save` (sync: the whole save;
          async: publishing the previous background save if still unpublished, then staging) and in
          `Trainer.poll_save`; publish_s: the same at the other steps where a finished background save was
          published (two barriers, a rename, the pruning); blocked_per_save_s: their sum over the run divided
          by the number of saves -- the direct measure of the stall;
  stall_s: the iteration time (start of a step to the start of the next) of each save step minus the
          median iteration of the steps that neither save nor publish: the brief's step-time measure, which
          on a shared machine is as noisy as the step time itself;
  total_s: the whole training loop; median_step_s: the median iteration without a save or a publish.
The last step's save is left out of the per-save figures (nothing follows it; it is in total_s). The
background write competes with training for the CPU, so steps during a write may be slower: compare total_s.

Writes benchmarks/results/checkpoint.json:
  config: overrides, steps, save_every, threads, checkpoint_mb (one published checkpoint's files), params,
          torch_version
  sync, async: total_s, median_step_s, blocked_s, blocked_mean_s, publish_s, blocked_per_save_s, stall_s,
          stall_mean_s
  speedup_stall: sync blocked_per_save_s / async blocked_per_save_s
The headline, the last line printed: `checkpoint stall per save: sync X s, async Y s (Z x less)`.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint.py [--steps 40] [--save-every 5] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from moetron.train.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str]):
    """The config `python -m moetron.train` would build with these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from moetron.config.hydra import register_schema, to_config

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_module("moetron.hydra_conf", version_base=None):
        return to_config(hydra_compose("config", overrides=overrides))


def timed_run(overrides: list[str], run_dir: Path) -> dict:
    """Train once; return each step's start time and, per step, the seconds the training thread spent in
    the save (`Trainer.save`) and in publishing a finished background save (`Trainer.poll_save`)."""
    trainer = Trainer(compose([*overrides, f"run.dir={run_dir}"]))
    starts: list[float] = []
    blocked: dict[str, dict[int, float]] = {"save": {}, "poll": {}}

    def timed(method, kind):
        def call(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                step = trainer.state.step
                blocked[kind][step] = blocked[kind].get(step, 0.0) + time.perf_counter() - begin
        return call

    train_step = trainer.train_step

    def timed_step():
        starts.append(time.perf_counter())
        return train_step()

    trainer.train_step, trainer.save, trainer.poll_save = timed_step, timed(trainer.save, "save"), \
        timed(trainer.poll_save, "poll")
    begin = time.perf_counter()
    trainer.fit()
    end = time.perf_counter()
    starts.append(end)  # the last iteration ends with the run
    params = sum(p.numel() for g in trainer.shard_groups for _, p in g.params)
    return dict(starts=starts, blocked=blocked, total_s=end - begin, params=params)


def summarize(run: dict, steps: int, save_every: int) -> dict:
    """Iteration i (step i + 1) takes starts[i + 1] - starts[i]."""
    iteration = {i + 1: run["starts"][i + 1] - run["starts"][i] for i in range(steps)}
    saves = list(range(save_every, steps, save_every))  # the last step's save ends the run: left out
    polls = run["blocked"]["poll"]
    publishes = [s for s, t in polls.items() if t > 1e-3 and s not in saves and s < steps]
    quiet = [t for s, t in iteration.items() if s not in saves and s not in publishes and 1 < s < steps]
    median = statistics.median(quiet)
    stall = [iteration[s] - median for s in saves]
    in_save = [run["blocked"]["save"][s] + polls.get(s, 0.0) for s in saves]
    out = dict(total_s=run["total_s"], median_step_s=median, stall_s=stall, stall_mean_s=statistics.mean(stall),
               blocked_s=in_save, blocked_mean_s=statistics.mean(in_save),
               publish_s=[polls[s] for s in publishes])
    out["blocked_per_save_s"] = (sum(in_save) + sum(out["publish_s"])) / len(saves)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=0, help="model.hidden_size (0: the tiny preset's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "checkpoint.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    overrides = ["model=tiny", f"train.steps={args.steps}", f"run.save_every={args.save_every}",
                 "run.keep_checkpoints=2", "run.progress=false", "train.eval_every=0", "monitor.wandb=false",
                 "monitor.report=false", f"run.threads={args.threads}",
                 f"data.train_files=[{ROOT / 'data/corpus/prepared/train'}]",
                 f"data.val_files=[{ROOT / 'data/corpus/prepared/val'}]",
                 f"data.tokenizer={ROOT / 'data/corpus/tokenizer.json'}"]
    if args.hidden:
        overrides.append(f"model.hidden_size={args.hidden}")
    results, params, checkpoint_mb = {}, 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            run_dir = Path(tmp) / mode
            run = timed_run([*overrides, f"run.async_checkpoint={mode == 'async'}"], run_dir)
            results[mode] = summarize(run, args.steps, args.save_every)
            params = run["params"]
            last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
            checkpoint_mb = sum(p.stat().st_size for p in last.rglob("*") if p.is_file()) / 2**20
            r = results[mode]
            print(f"{mode:5s}: total {r['total_s']:.2f} s, median step {r['median_step_s'] * 1e3:.0f} ms; per save: "
                  f"training thread blocked {r['blocked_per_save_s'] * 1e3:.0f} ms (save step "
                  f"{r['blocked_mean_s'] * 1e3:.0f} ms + publish {sum(r['publish_s']) / len(r['blocked_s']) * 1e3:.0f}"
                  f" ms), save step minus median step {r['stall_mean_s'] * 1e3:.0f} ms "
                  f"({', '.join(f'{s * 1e3:.0f}' for s in r['stall_s'])} ms)")
    speedup = results["sync"]["blocked_per_save_s"] / max(results["async"]["blocked_per_save_s"], 1e-9)
    out = dict(config=dict(preset="tiny", overrides=[o.replace(f"{ROOT}/", "") for o in overrides], steps=args.steps, save_every=args.save_every,
                           threads=args.threads, checkpoint_mb=checkpoint_mb, params=params,
                           torch_version=torch.__version__),
               **results, speedup_stall=speedup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"checkpoint of {checkpoint_mb:.1f} MB ({params / 1e6:.2f} M parameters), wrote {args.out}")
    print(f"checkpoint stall per save: sync {results['sync']['blocked_per_save_s']:.3f} s, "
          f"async {results['async']['blocked_per_save_s']:.3f} s ({speedup:.1f} x less)")


if __name__ == "__main__":
    main()
