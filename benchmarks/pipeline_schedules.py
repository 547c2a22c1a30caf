"""How long does a training step take under each pipeline schedule, and does the simulator know?

Spawns `--pp` gloo ranks on this machine. Every stage's forward, backward-for-input and
backward-for-weights *sleep* for the configured times, so 4-8 ranks share 2 cores without the
timings depending on the CPU. For each of our schedules (1F1B, ZB1P, DualPipe, DualPipeV) it
measures the real step time, and simulates the same schedule with the same costs; then it runs
torch.distributed.pipelining's Schedule1F1B, ScheduleZBVZeroBubble and ScheduleDualPipeV on the
same sleeping stages, for a side-by-side step time.

Work per rank is the same everywhere: `--chunks` micro-batches x (f + b). 1F1B, ZB1P and DualPipe
cut the model into PP stages of cost (f, b, w); the V-shaped schedules (our DualPipeV, torch's ZBV
and DualPipeV) cut it into 2 PP stages of half that cost, two per rank.

Writes benchmarks/results/pipeline_schedules.json, a flat JSON object:
  pp, chunks, f_ms, b_ms, w_ms, steps          the configuration (b is the FULL backward)
  work_per_rank_s                               chunks x (f + b): compute time each rank must do
  measured_f_ms, measured_b_input_ms, measured_w_ms, measured_b_ms
                                                what one PP-stage chunk's F, B, W and BW really take
                                                (sleep plus our autograd code), measured on rank 0
  measured_hop_ms                               one-way time of an activation between two ranks
  ours_<s>_real_step_s, ours_<s>_sim_step_s      measured (median of `steps`) and simulated step time;
                                                the simulation uses the measured chunk costs and hop
  ours_<s>_real_bubble_s, ours_<s>_sim_bubble_s  step time minus work_per_rank_s (max over ranks for sim)
  ours_<s>_real_vs_sim_error                     |real - sim| / sim for the step time
  torch_<s>_real_step_s, torch_<s>_real_bubble_s torch.distributed.pipelining, measured
  torch_<s>_error                                why a torch schedule could not run (only then)
  max_real_vs_sim_error                          the largest ours_<s>_real_vs_sim_error
with <s> in 1f1b, zb1p, dualpipe, dualpipev (ours) and 1f1b, zbv, dualpipev (torch);
and benchmarks/results/pipeline_schedules.png (step times, real and simulated, per schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moetron.parallel import ChunkBackward, Costs, PipelineExecutor, build_schedule, simulate
from torch import nn
from torch.autograd.graph import get_gradient_edge

RESULTS = Path(__file__).resolve().parent / "results"
ROWS, DIM = 4, 16
OURS = ("1f1b", "zb1p", "dualpipe", "dualpipev")
TORCH = {"1f1b": "Schedule1F1B", "zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}


class _SleepInput(torch.autograd.Function):
    """Forward sleeps f; backward (the input-gradient work) sleeps b - w."""

    @staticmethod
    def forward(ctx, x, f, b_input):
        ctx.b_input = b_input
        time.sleep(f)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.b_input)
        return grad, None, None


class _SleepWeight(torch.autograd.Function):
    """Contributes zero to the output; its backward (the weight-gradient work) sleeps w."""

    @staticmethod
    def forward(ctx, weight, w):
        ctx.w = w
        return weight.detach() * 0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.w)
        return grad, None


class SleepStage(nn.Module):
    def __init__(self, f: float, b: float, w: float):
        super().__init__()
        self.f, self.b_input, self.w = f, b - w, w
        # Two parameters ahead of the input-gradient sleep keep it on the activation path even on
        # the first stage, whose input (data) needs no gradient.
        self.scale = nn.Parameter(torch.ones(DIM))
        self.shift = nn.Parameter(torch.zeros(DIM))
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _SleepInput.apply(x * self.scale + self.shift, self.f, self.b_input)
        return h + _SleepWeight.apply(self.weight, self.w)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def stage_costs(args, v_shaped: bool) -> tuple[float, float, float]:
    scale = 0.5 if v_shaped else 1.0
    return tuple(scale * t / 1000 for t in (args.f, args.b, args.w))


def timed(run, steps: int) -> float:
    run()  # warm-up (torch's schedules infer shapes on their first step)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        run()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(name: str, args) -> float:
    rank = dist.get_rank()
    schedule = build_schedule(name, args.pp, args.chunks)
    f, b, w = stage_costs(args, v_shaped=schedule.num_stages > args.pp)
    stages = {sid: SleepStage(f, b, w) for sid in schedule.stages_of(rank)}
    executor = PipelineExecutor(schedule, stages, loss_fn)
    x = torch.randn(args.chunks * ROWS, DIM)
    y = torch.randn(args.chunks * ROWS, DIM)
    return timed(lambda: executor.step(x, y), args.steps)


def theirs(name: str, args) -> float:
    import torch.distributed.pipelining as pipelining

    rank, pp = dist.get_rank(), args.pp
    v_shaped = name != "1f1b"
    num_stages = 2 * pp if v_shaped else pp
    indices = [rank, num_stages - 1 - rank] if v_shaped else [rank]
    f, b, w = stage_costs(args, v_shaped)
    stages = [pipelining.PipelineStage(SleepStage(f, b, w), i, num_stages, torch.device("cpu")) for i in indices]
    cls = getattr(pipelining, TORCH[name])
    schedule = cls(stages if v_shaped else stages[0], args.chunks, loss_fn=loss_fn)
    x = torch.randn(args.chunks * ROWS, DIM)
    y = torch.randn(args.chunks * ROWS, DIM)
    first, last = 0 in indices, num_stages - 1 in indices

    def run():
        kwargs = {"target": y, "losses": []} if last else {}
        schedule.step(*([x] if first else []), **kwargs)

    return timed(run, args.steps)


def measure_costs(f: float, b: float, w: float, repeats: int = 5) -> dict[str, float]:
    """What F, B, W and BW of a sleeping stage really take through our backward code (s)."""
    stage = SleepStage(f, b, w)
    x = torch.randn(ROWS, DIM, requires_grad=True)
    grad = torch.ones(ROWS, DIM)
    times: dict[str, list[float]] = {"f": [], "b_input": [], "w": [], "b": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = stage(x)
        t1 = time.perf_counter()
        split = ChunkBackward(get_gradient_edge(out), grad, [x])
        split.inputs_only()
        t2 = time.perf_counter()
        split.weights()
        t3 = time.perf_counter()
        ChunkBackward(get_gradient_edge(stage(x)), grad, [x]).full()
        t4 = time.perf_counter()
        times["f"].append(t1 - t0)
        times["b_input"].append(t2 - t1)
        times["w"].append(t3 - t2)
        times["b"].append(t4 - t3 - (t1 - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_hop(repeats: int = 20) -> float:
    """One-way time of an activation between ranks 0 and 1 (header + payload, as our P2P sends)."""
    rank = dist.get_rank()
    header, payload = torch.zeros(10, dtype=torch.int64), torch.randn(ROWS, DIM)

    def send(to: int) -> None:
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, header, to, tag=1),
                                         dist.P2POp(dist.isend, payload, to, tag=2)]):
            w.wait()

    def recv(frm: int) -> None:
        for tag, t in ((1, header), (2, payload)):
            for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, t, frm, tag=tag)]):
                w.wait()

    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:
            send(1)
            recv(1)
        elif rank == 1:
            recv(0)
            send(0)
    hop = (time.perf_counter() - t0) / (2 * repeats)
    dist.barrier()
    return hop


def worker(rank: int, args, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.pp)
    results = {"hop": measure_hop()}
    if rank == 0:  # the other ranks wait in the barrier meanwhile
        for v_shaped in (False, True):
            results[f"costs_v{int(v_shaped)}"] = measure_costs(*stage_costs(args, v_shaped))
    dist.barrier()
    for name in OURS:
        results[f"ours_{name}"] = ours(name, args)
    for name in TORCH:
        try:
            results[f"torch_{name}"] = theirs(name, args)
        except Exception as err:  # a schedule torch cannot run here is reported, not fatal
            results[f"torch_{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            break  # a failed torch schedule can leave messages in flight; stop comparing
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4, help="pipeline ranks (processes)")
    parser.add_argument("--chunks", type=int, default=8, help="micro-batches per step (>= 2 pp)")
    parser.add_argument("--f", type=float, default=30.0, help="forward of one stage, ms")
    parser.add_argument("--b", type=float, default=60.0, help="full backward of one stage, ms")
    parser.add_argument("--w", type=float, default=20.0, help="weight-gradient part of b, ms")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per schedule (after one warm-up)")
    parser.add_argument("--out", default=str(RESULTS / "pipeline_schedules.json"))
    args = parser.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    raw_path = Path(args.out).with_suffix(".raw.json")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(args, port, str(raw_path)), nprocs=args.pp)
    raw = json.loads(raw_path.read_text())
    raw_path.unlink()

    work = args.chunks * (args.f + args.b) / 1000
    out: dict = {"pp": args.pp, "chunks": args.chunks, "f_ms": args.f, "b_ms": args.b, "w_ms": args.w,
                 "steps": args.steps, "work_per_rank_s": work, "measured_hop_ms": 1000 * raw["hop"]}
    for key, v in raw["costs_v0"].items():
        out[f"measured_{key}_ms"] = 1000 * v
    errors = []
    for name in OURS:
        schedule = build_schedule(name, args.pp, args.chunks)
        measured = raw[f"costs_v{int(schedule.num_stages > args.pp)}"]
        costs = Costs(f=measured["f"], b=measured["b_input"] + measured["w"], w=measured["w"], p2p=raw["hop"])
        sim = simulate(schedule, costs)
        real = raw[f"ours_{name}"]
        error = abs(real - sim.makespan) / sim.makespan
        errors.append(error)
        out |= {f"ours_{name}_real_step_s": real, f"ours_{name}_sim_step_s": sim.makespan,
                f"ours_{name}_real_bubble_s": real - work, f"ours_{name}_sim_bubble_s": sim.max_bubble,
                f"ours_{name}_real_vs_sim_error": error}
    for name in TORCH:
        if f"torch_{name}" in raw:
            out |= {f"torch_{name}_real_step_s": raw[f"torch_{name}"],
                    f"torch_{name}_real_bubble_s": raw[f"torch_{name}"] - work}
        else:
            out[f"torch_{name}_error"] = raw.get(f"torch_{name}_error", "not run (an earlier torch schedule failed)")
    out["max_real_vs_sim_error"] = max(errors)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(args.out).with_suffix(".png"))

    print(f"pipeline schedules: PP={args.pp}, {args.chunks} micro-batches, f={args.f} b={args.b} w={args.w} ms "
          f"(work per rank {work:.3f} s)")
    print(f"{'schedule':<18}{'real step s':>12}{'sim step s':>12}{'real bubble s':>15}{'error':>8}")
    for name in OURS:
        print(f"{'ours ' + name:<18}{out[f'ours_{name}_real_step_s']:>12.3f}{out[f'ours_{name}_sim_step_s']:>12.3f}"
              f"{out[f'ours_{name}_real_bubble_s']:>15.3f}{out[f'ours_{name}_real_vs_sim_error']:>8.1%}")
    for name in TORCH:
        if f"torch_{name}_real_step_s" in out:
            print(f"{'torch ' + name:<18}{out[f'torch_{name}_real_step_s']:>12.3f}{'':>12}"
                  f"{out[f'torch_{name}_real_bubble_s']:>15.3f}")
        else:
            print(f"{'torch ' + name:<18}  unavailable: {out[f'torch_{name}_error']}")
    print(f"max_real_vs_sim_error {out['max_real_vs_sim_error']:.1%}  -> {args.out}")
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, real, sim = [], [], []
    for name in OURS:
        labels.append(f"ours\n{name}")
        real.append(out[f"ours_{name}_real_step_s"])
        sim.append(out[f"ours_{name}_sim_step_s"])
    for name in TORCH:
        if f"torch_{name}_real_step_s" in out:
            labels.append(f"torch\n{name}")
            real.append(out[f"torch_{name}_real_step_s"])
            sim.append(0.0)
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([x - 0.2 for x in xs], real, 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], sim, 0.4, label="simulated")
    ax.axhline(out["work_per_rank_s"], color="black", linestyle="--", linewidth=1, label="work per rank (no bubble)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("step time (s)")
    ax.set_title(f"PP={out['pp']}, {out['chunks']} micro-batches, f/b/w = {out['f_ms']}/{out['b_ms']}/{out['w_ms']} ms; "
                 f"max real vs sim error {out['max_real_vs_sim_error']:.1%}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
