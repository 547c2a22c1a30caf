"""How long does a training step take under each pipeline schedule, against the formula and the peers?

Spawns `--pp` gloo ranks on this machine. Every stage's forward, backward-for-input and
backward-for-weights *sleep* for the configured times, so 4-8 ranks share 2 cores without the
timings depending much on the CPU. For each of our schedules (1F1B, ZB1P, DualPipe, DualPipeV) it
measures the real step time, gives the DeepSeek-V3 report's formula (section 3.2.1, Table 2: step =
work + bubble) and simulates the same schedule with the measured costs and the executor's measured
per-transfer time; then it runs torch.distributed.pipelining's Schedule1F1B, ScheduleZBVZeroBubble and
ScheduleDualPipeV, and, given `--dualpipe-repo` (a checkout of github.com/deepseek-ai/DualPipe kept
outside this project), DeepSeek's own DualPipe, on the same sleeping stages. All schedules are timed
in turns (one step of each, `--steps` times over), so the load of other jobs falls on all alike.

Work per rank is the same everywhere: `--chunks` micro-batches x (f + b). 1F1B, ZB1P and DualPipe
cut the model into PP stages of cost (f, b, w); the V-shaped schedules (our DualPipeV, torch's ZBV
and DualPipeV) cut it into 2 PP stages of half that cost, two per rank.

    python benchmarks/pipeline_schedules.py                        # PP 4, 8 micro-batches
    python benchmarks/pipeline_schedules.py --pp 8 --chunks 20     # -> pipeline_schedules_pp8_c20.json

Writes benchmarks/results/pipeline_schedules.json (other sizes: pipeline_schedules_pp<P>_c<C>.json),
a flat JSON object:
  pp, chunks, f_ms, b_ms, w_ms, steps          the configuration (b is the FULL backward)
  work_per_rank_s                               chunks x (f + b): compute time each rank must do
  measured_f_ms, measured_b_input_ms, measured_w_ms, measured_b_ms
                                                what one PP-stage chunk's F, B, W and BW really take
                                                (sleep plus our autograd code), measured alone on rank 0
  measured_hop_ms                               one-way time of an activation between two ranks, sent
                                                as the executor sends it (one batch, no header)
  <who>_<s>_formula_step_s                      work + the report's bubble for that schedule
  <who>_<s>_real_step_s, <who>_<s>_vs_formula   measured: the best of `steps` steps (the one the other
                                                jobs on this shared machine disturbed least); real / formula - 1
  <who>_<s>_formula_at_measured_s, <who>_<s>_vs_formula_at_measured
                                                the same formula with the stage's measured F and B (sleep
                                                plus the stage's own autograd code, which runs slower right
                                                after a sleep): what is left above it is the executor's cost
                                                (transfers, waits, bookkeeping) and the cores' sharing
  <who>_<s>_median_step_s                       the median of those steps
  <who>_<s>_cpu_ms_per_step                     CPU time of one step, all threads of a rank's process
                                                (median over steps, mean over ranks): what the schedule's
                                                code itself costs, which the load of other jobs hardly changes
  ours_<s>_sim_step_s, ours_<s>_real_vs_sim_error
                                                simulated step; |median - sim| / sim. The simulation's
                                                costs: what the sleeps really took in that run (the
                                                machine is shared: they oversleep) plus our code's own
                                                time per chunk, and measured_hop per transfer
  <who>_<s>_error                               why a peer's schedule could not run (only then)
  max_real_vs_sim_error                          the largest ours_<s>_real_vs_sim_error
with <who>_<s> in ours_{1f1b,zb1p,dualpipe,dualpipev}, torch_{1f1b,zbv,dualpipev}, deepseek_dualpipe;
and the same name with .png (step times: real, simulated, formula, per schedule).
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
# The report's bubble formula behind each schedule (ZBV has none there).
FORMULA = {"ours_1f1b": "1f1b", "ours_zb1p": "zb1p", "ours_dualpipe": "dualpipe", "ours_dualpipev": "dualpipev",
           "torch_1f1b": "1f1b", "torch_dualpipev": "dualpipev", "deepseek_dualpipe": "dualpipe"}


SPIN_S = 0.001  # the end of each sleep is spun, not slept


def _sleep(seconds: float, log: list[float]) -> None:
    """Take `seconds`, as exactly as this machine allows: the OS wakes a sleeper late (~0.2 ms here, more
    under load) and with cold caches, so the last millisecond is spent spinning on the clock."""
    t0 = time.perf_counter()
    deadline = t0 + seconds
    if seconds > SPIN_S:
        time.sleep(seconds - SPIN_S)
    while time.perf_counter() < deadline:
        pass
    log.append(time.perf_counter() - t0)  # what the sleep really took on this loaded machine


class _SleepInput(torch.autograd.Function):
    """Forward sleeps f; backward (the input-gradient work) sleeps b - w."""

    @staticmethod
    def forward(ctx, x, f, b_input, log):
        ctx.b_input, ctx.log = b_input, log
        _sleep(f, log["f"])
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.b_input, ctx.log["b_input"])
        return grad, None, None, None


class _SleepWeight(torch.autograd.Function):
    """Contributes zero to the output; its backward (the weight-gradient work) sleeps w."""

    @staticmethod
    def forward(ctx, weight, w, log):
        ctx.w, ctx.log = w, log
        return weight.detach() * 0

    @staticmethod
    def backward(ctx, grad):
        _sleep(ctx.w, ctx.log["w"])
        return grad, None, None


class SleepStage(nn.Module):
    def __init__(self, f: float, b: float, w: float):
        super().__init__()
        self.f, self.b_input, self.w = f, b - w, w
        self.log: dict[str, list[float]] = {"f": [], "b_input": [], "w": []}
        # Two parameters ahead of the input-gradient sleep keep it on the activation path even on
        # the first stage, whose input (data) needs no gradient.
        self.scale = nn.Parameter(torch.ones(DIM))
        self.shift = nn.Parameter(torch.zeros(DIM))
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _SleepInput.apply(x * self.scale + self.shift, self.f, self.b_input, self.log)
        return h + _SleepWeight.apply(self.weight, self.w, self.log)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def stage_costs(args, v_shaped: bool) -> tuple[float, float, float]:
    scale = 0.5 if v_shaped else 1.0
    return tuple(scale * t / 1000 for t in (args.f, args.b, args.w))


def timed_in_turns(runs: dict, steps: int) -> dict[str, tuple[float, float]]:
    """(best, median) step time of each run, measured in turns (one step of each, `steps` times over), so
    that the load of other jobs on this shared machine falls on every schedule alike."""
    for run in runs.values():
        run()  # warm-up (torch's schedules infer shapes, ours learns them, on the first step)
    times: dict[str, list[float]] = {who: [] for who in runs}
    cpu: dict[str, list[float]] = {who: [] for who in runs}
    for _ in range(steps):
        for who, run in runs.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            c1 = time.process_time()
            dist.barrier()
            times[who].append(time.perf_counter() - t0)
            cpu[who].append(c1 - c0)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, {who: statistics.median(c) for who, c in cpu.items()})
    return {who: (min(t), statistics.median(t), statistics.mean(r[who] for r in every)) for who, t in times.items()}


def ours(name: str, args):
    """A step of our schedule `name` on sleeping stages, and the stages (their sleep logs)."""
    rank = dist.get_rank()
    schedule = build_schedule(name, args.pp, args.chunks)
    f, b, w = stage_costs(args, v_shaped=schedule.num_stages > args.pp)
    stages = {sid: SleepStage(f, b, w) for sid in schedule.stages_of(rank)}
    executor = PipelineExecutor(schedule, stages, loss_fn)
    x = torch.randn(args.chunks * ROWS, DIM)
    y = torch.randn(args.chunks * ROWS, DIM)
    return lambda: executor.step(x, y), stages.values()


def slept(stages) -> dict[str, float]:
    """Mean time each sleep really took in the run, over all ranks (the loaded machine oversleeps)."""
    mine = {k: [sum(t for m in stages for t in m.log[k]), sum(len(m.log[k]) for m in stages)] for k in ("f", "b_input", "w")}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {k: sum(r[k][0] for r in every) / max(1, sum(r[k][1] for r in every)) for k in mine}


def theirs(name: str, args):
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

    return run


def measure_costs(f: float, b: float, w: float, repeats: int = 10) -> dict:
    """What F, B, W and BW of a sleeping stage really take through our backward code (s, medians after a
    first call that warms autograd up), and ("slept") how long its sleeps took meanwhile: the difference
    is our code's own time per chunk."""
    stage = SleepStage(f, b, w)
    x = torch.randn(ROWS, DIM, requires_grad=True)
    grad = torch.ones(ROWS, DIM)
    times: dict[str, list[float]] = {"f": [], "b_input": [], "w": [], "b": []}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = stage(x)
        t1 = time.perf_counter()
        split = ChunkBackward(get_gradient_edge(out), grad, [x])
        split.inputs_only()
        t2 = time.perf_counter()
        split.weights()
        t3 = time.perf_counter()
        times["f"].append(t1 - t0)
        times["b_input"].append(t2 - t1)
        times["w"].append(t3 - t2)
    slept = {k: statistics.median(v[-repeats:]) for k, v in stage.log.items()}
    for _ in range(repeats + 1):
        out = stage(x)
        t0 = time.perf_counter()
        ChunkBackward(get_gradient_edge(out), grad, [x]).full()
        times["b"].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()} | {"slept": slept}


def measure_hop(repeats: int = 40) -> float:
    """One-way time of an activation between ranks 0 and 1, as the executor sends it: the payload in
    one batch, its receive already posted."""
    rank = dist.get_rank()
    payload = torch.randn(ROWS, DIM)

    def transfer(op, peer: int) -> None:
        for w in dist.batch_isend_irecv([dist.P2POp(op, payload, peer, tag=2)]):
            w.wait()

    dist.barrier()
    trips = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if rank == 0:
            transfer(dist.isend, 1)
            transfer(dist.irecv, 1)
        elif rank == 1:
            transfer(dist.irecv, 0)
            transfer(dist.isend, 0)
        trips.append(time.perf_counter() - t0)
    dist.barrier()
    return statistics.median(trips) / 2  # the median: a round trip now and then waits for a busy core


def deepseek(args):
    """DeepSeek's own DualPipe (github.com/deepseek-ai/DualPipe, at `--dualpipe-repo`) on CPU: its CUDA
    device checks and receive buffers pointed at the CPU, nothing else changed."""
    sys.path.insert(0, args.dualpipe_repo)
    import dualpipe
    import dualpipe.comm as ds_comm

    torch.cuda.current_device = lambda: "cpu"  # its stage-device check; this process only
    ds_comm.build_from_tensor_shapes = lambda: [
        torch.empty(shape, dtype=ds_comm.TENSOR_DTYPE, requires_grad=True) for shape in ds_comm.TENSOR_SHAPES]
    dualpipe.set_p2p_tensor_shapes([(ROWS, DIM)])
    dualpipe.set_p2p_tensor_dtype(torch.float32)
    rank = dist.get_rank()
    f, b, w = stage_costs(args, v_shaped=False)
    model = dualpipe.DualPipe((SleepStage(f, b, w), SleepStage(f, b, w)))
    x = torch.randn(args.chunks // 2 * ROWS, DIM)
    y = torch.randn(args.chunks // 2 * ROWS, DIM)
    end = rank in (0, args.pp - 1)

    def run():
        model.step(*([x] if end else []), num_chunks=args.chunks, criterion=loss_fn if end else None,
                   labels=[y] if end else [])

    return run


def formula_step(name: str, p: int, chunks: int, f: float, b: float, w: float) -> float:
    """Work per rank plus the report's bubble (section 3.2.1, Table 2; B is the full backward, an F&B
    pair of sleeping stages overlaps nothing, so F&B = F + B), for stage costs f, b, w (s). DualPipeV is
    DualPipe over its 2 PP half-size stages (p: pipeline ranks)."""
    bubble = {"1f1b": (p - 1) * (f + b), "zb1p": (p - 1) * (f + b - 2 * w),
              "dualpipe": (p / 2 - 1) * ((f + b) + b - 3 * w),
              "dualpipev": (p - 1) * ((f + b) + b - 3 * w) / 2}[name]
    return chunks * (f + b) + bubble


def measured_stage_costs(raw: dict, args, v_shaped: bool) -> tuple[float, float, float]:
    """F, B, W of one PP stage as measured alone (sleep plus the stage's autograd code); a V-shaped
    schedule's two half stages count as one. W only where the schedules split it (--w > 0)."""
    alone, scale = raw[f"costs_v{int(v_shaped)}"], 2 if v_shaped else 1
    return scale * alone["f"], scale * alone["b"], scale * alone["w"] if args.w > 0 else 0.0


def worker(rank: int, args, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.pp)
    results = {"hop": measure_hop()}
    if rank == 0:  # the other ranks wait in the barrier meanwhile
        for v_shaped in (False, True):
            results[f"costs_v{int(v_shaped)}"] = measure_costs(*stage_costs(args, v_shaped))
    dist.barrier()
    runs, logs = {}, {}
    for name in OURS:
        runs[f"ours_{name}"], logs[name] = ours(name, args)
    peers = [(f"torch_{name}", lambda name=name: theirs(name, args)) for name in TORCH]
    if args.dualpipe_repo and args.pp % 2 == 0:
        peers.append(("deepseek_dualpipe", lambda: deepseek(args)))
    for who, build in peers:
        try:
            run = build()
            run()  # a peer that cannot run here fails now, not in the measured turns
            runs[who] = run
        except Exception as err:  # reported, not fatal
            results[f"{who}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            if who.startswith("torch"):
                break  # a failed torch schedule can leave messages in flight; stop comparing
    results |= timed_in_turns(runs, args.steps)
    for name, stages in logs.items():
        results[f"slept_{name}"] = slept(stages)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4, help="pipeline ranks (processes)")
    parser.add_argument("--chunks", type=int, default=8, help="micro-batches per step (>= 2 pp)")
    parser.add_argument("--f", type=float, default=20.0, help="forward of one stage, ms")
    parser.add_argument("--b", type=float, default=40.0, help="full backward of one stage, ms")
    parser.add_argument("--w", type=float, default=0.0, help="weight-gradient part of b, ms (0: no W split)")
    parser.add_argument("--steps", type=int, default=7, help="measured steps per schedule (after one warm-up)")
    parser.add_argument("--dualpipe-repo", default=None,
                        help="a checkout of github.com/deepseek-ai/DualPipe (outside this project) to compare with")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/pipeline_schedules[_pp<P>_c<C>].json")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "pipeline_schedules" + ("" if (args.pp, args.chunks) == (4, 8) else f"_pp{args.pp}_c{args.chunks}")
        args.out = str(RESULTS / f"{name}.json")

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
        if key != "slept":
            out[f"measured_{key}_ms"] = 1000 * v
    errors = []
    for name in OURS:
        schedule = build_schedule(name, args.pp, args.chunks)
        # What the sleeps really took in this run, plus our code's own time per chunk (measured alone).
        alone = raw[f"costs_v{int(schedule.num_stages > args.pp)}"]
        cost = {k: raw[f"slept_{name}"][k] + max(0.0, alone[k] - alone["slept"][k]) for k in ("f", "b_input", "w")}
        costs = Costs(f=cost["f"], b=cost["b_input"] + cost["w"], w=cost["w"], p2p=raw["hop"])
        sim = simulate(schedule, costs)
        real = raw[f"ours_{name}"][1]  # the median step: the simulation's costs are the run's mean ones
        error = abs(real - sim.makespan) / sim.makespan
        errors.append(error)
        out |= {f"ours_{name}_sim_step_s": sim.makespan, f"ours_{name}_real_vs_sim_error": error}
    names = [f"ours_{n}" for n in OURS] + [f"torch_{n}" for n in TORCH] + ["deepseek_dualpipe"]
    for who in names:
        if who in raw:
            out[f"{who}_real_step_s"], out[f"{who}_median_step_s"], cpu = raw[who]
            out[f"{who}_cpu_ms_per_step"] = 1000 * cpu
            if who in FORMULA:
                name = FORMULA[who]
                nominal = formula_step(name, args.pp, args.chunks, *(t / 1000 for t in (args.f, args.b, args.w)))
                at_measured = formula_step(name, args.pp, args.chunks,
                                           *measured_stage_costs(raw, args, name == "dualpipev"))
                out |= {f"{who}_formula_step_s": nominal, f"{who}_vs_formula": raw[who][0] / nominal - 1,
                        f"{who}_formula_at_measured_s": at_measured,
                        f"{who}_vs_formula_at_measured": raw[who][0] / at_measured - 1}
        elif who.startswith("torch") or args.dualpipe_repo:
            out[f"{who}_error"] = raw.get(f"{who}_error", "not run (an earlier torch schedule failed)")
    out["max_real_vs_sim_error"] = max(errors)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(out, names, Path(args.out).with_suffix(".png"))

    print(f"pipeline schedules: PP={args.pp}, {args.chunks} micro-batches, f={args.f} b={args.b} w={args.w} ms "
          f"(work per rank {work:.3f} s, one transfer {out['measured_hop_ms']:.2f} ms)")
    print(f"{'schedule':<20}{'formula s':>10}{'best s':>8}{'vs formula':>11}{'vs measured':>12}{'median s':>10}"
          f"{'cpu ms':>8}{'sim s':>8}{'median vs sim':>15}")
    for who in names:
        if f"{who}_real_step_s" not in out:
            if f"{who}_error" in out:
                print(f"{who:<20}  unavailable: {out[f'{who}_error']}")
            continue
        formula = f"{out[f'{who}_formula_step_s']:>10.3f}" if f"{who}_formula_step_s" in out else f"{'-':>10}"
        versus = (f"{out[f'{who}_vs_formula']:>+11.1%}{out[f'{who}_vs_formula_at_measured']:>+12.1%}"
                  if f"{who}_vs_formula" in out else " " * 23)
        sim = f"{out[f'{who}_sim_step_s']:>8.3f}{out[f'{who}_real_vs_sim_error']:>15.1%}" if who.startswith("ours") else ""
        print(f"{who:<20}{formula}{out[f'{who}_real_step_s']:>8.3f}{versus}{out[f'{who}_median_step_s']:>10.3f}"
              f"{out[f'{who}_cpu_ms_per_step']:>8.1f}{sim}")
    print(f"max_real_vs_sim_error {out['max_real_vs_sim_error']:.1%}  -> {args.out}")
    return out


def plot(out: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [who for who in names if f"{who}_real_step_s" in out]
    series = {"measured": "real_step_s", "simulated": "sim_step_s", "formula": "formula_step_s"}
    xs = range(len(shown))
    fig, ax = plt.subplots(figsize=(10, 4))
    for k, (label, key) in enumerate(series.items()):
        ax.bar([x + 0.27 * (k - 1) for x in xs], [out.get(f"{who}_{key}", 0.0) for who in shown], 0.27, label=label)
    ax.axhline(out["work_per_rank_s"], color="black", linestyle="--", linewidth=1, label="work per rank (no bubble)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([who.replace("_", "\n", 1) for who in shown], fontsize=8)
    ax.set_ylabel("step time (s)")
    ax.set_title(f"PP={out['pp']}, {out['chunks']} micro-batches, f/b/w = {out['f_ms']}/{out['b_ms']}/{out['w_ms']} ms; "
                 f"max real vs sim error {out['max_real_vs_sim_error']:.1%}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
