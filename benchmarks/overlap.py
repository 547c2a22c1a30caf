"""How much of the expert-parallel all-to-all does overlapped F&B hide?

One pipeline stage = one Transformer block with a DeepSeekMoE layer whose experts are sharded over every
rank (nodes x ranks_per_node processes on this machine acting as nodes; two-hop dispatch across them).
Each iteration runs the forward of micro-batch b (untimed), then times the F&B pair (forward of micro-batch
a, backward of b: B, then W) two ways: sequential (forward, then backward) and overlapped
(moetron.comm.overlap.OverlappedForwardBackward). In the sequential run every collective is recorded:
  t_comm     the time the ranks spent blocked in all-to-alls (the all-to-all alone: nothing else runs),
  t_compute  the rest of the sequential pair (the compute alone),
  t_overlap  the overlapped pair,
  efficiency (t_compute + t_comm - t_overlap) / min(t_compute, t_comm): 1 = the smaller one fully hidden.
Times are per iteration the maximum over ranks, then the median over iterations.

Three set-ups:
  gloo                    as is: on CPU gloo moves bytes with the same cores that compute, so little hides;
  link_model              comm/link_model.py (NVLink 160 GB/s and IB 50 GB/s per rank, latency, scaled by one
                          factor so the modelled communication of a pair is --comm-ratio x its measured
                          compute); the compute is this CPU's, and 4 ranks on 2 cores are bound by the cores
                          (the CPU ceiling below says how far);
  link_and_compute_model  also comm/compute_model.py: every GEMM sleeps flops / rate while its side of the pair
                          runs, and so does the attention core (rate: --compute-scale x slower than this CPU's
                          compute of the pair), so the cores no longer bound the
                          pair and what is measured is what the schedule hides, as on GPUs.
The default --comm-ratio 2/3 gives each chunk's all-to-alls the time the forward chunk computes (backward
= 2 x forward); a backward chunk's own chain (its compute, then its transfers, which wait for it) is then as
long as the pair's compute, the regime in which DualPipe hides the communication fully. With --comm-ratio 1
that chain alone exceeds the pair's compute and the efficiency cannot reach 1 whatever the schedule.
The same script runs on GPUs with NCCL (one GPU per rank) when torch.cuda.is_available().

Writes benchmarks/results/overlap.json, a flat JSON object:
  nodes, ranks_per_node, tokens, hidden, experts, top_k, moe_intermediate, mode, iters, comm_ratio, device,
  backend, compute_scale, compute_model_tflops, compute_model_link_scale
  cpu_count, load_average           the machine's cores and its 1-minute load (other processes time-slice ours)
  link_scale, link_intra_gbps, link_inter_gbps, link_latency_us        the link model used (scaled)
  <t>_compute_ms, <t>_comm_ms, <t>_sequential_ms, <t>_overlapped_ms    t in gloo, link_model,
                                                                       link_and_compute_model
  <t>_cpu_sequential_ms, <t>_cpu_overlapped_ms                         CPU time of a rank's process per pair
                                        (all its threads; equal work, so wall time beyond it is waiting or
                                        other processes holding the cores)
  <t>_cpu_bound_ms                      ranks x cpu_overlapped / cpu_count: the shortest overlapped pair the
                                        cores allow (CPU only; 0 on GPUs)
  overlap_efficiency_<t>_ceiling        the efficiency with t_overlap at max(that bound, t_compute, t_comm)
  overlap_efficiency_<t>                the headline figures
  step_ratio_<t>                        overlapped / sequential F&B time
  dualpipe_<t>_sequential_ms, dualpipe_<t>_overlapped_ms, dualpipe_step_ratio_<t>
                                        a whole DualPipe step (PP 2 x EP over the rest, --dualpipe-microbatches,
                                        one MoE block per stage) with sequential vs overlapped F&B
  overlap_efficiency_stream_model       the pair on the stream model (comm/stream_model.py): the order in which
                                        the overlapped pair's work reached one compute stream and one
                                        communication stream, replayed with the compute model's kernel costs and
                                        the link model's times (links scaled so that the pair communicates
                                        comm_ratio x its modelled compute), each transfer one communication
                                        kernel (as DeepEP's two-hop kernels); the worst rank. Independent of the
                                        machine's load: it is what a GPU's streams would do with that order
  overlap_efficiency_stream_model_hops  the same with the hops after the first issued by the consumer, after its
                                        wait, as moetron's two-hop code does (flat dispatch: one hop, the same)
  stream_model_sequential_efficiency    the sequential pair on the stream model (~0)
  stream_model_crossings                stalls in which one side's compute queued behind the other side's wait
  dualpipe_overlap_efficiency_stream_model, dualpipe_stream_model_*   the DualPipe steady state on the stream
                                        model: the F&B pairs of one overlapped step (--stream-microbatches),
                                        summed
  stream_model_*_ms                     the modelled compute, communication and overlapped time of the worst rank
With --stream-model-only only the stream-model keys are measured (minutes less, no timed runs).
and per-rank timelines of the sub-steps of one overlapped pair: benchmarks/results/overlap.png (link model)
and overlap_modelled.png (link and compute model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from moetron.comm import LinkModel, Recorder, Transport, new_ep_groups, world_ep_group
from moetron.comm.compute_model import ComputeModel
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap, sequential_forward_backward
from moetron.comm.stream_model import StreamRecorder, crossings, replay
from moetron.parallel.actions import Action, Op
from moetron.parallel.executor import BackwardJob, ForwardJob
from moetron.parallel.local import run_local
from moetron.parallel.weight_grad import ChunkBackward
from torch import nn

from moetron.config import ModelConfig
from moetron.model.attention import MLA
from moetron.model.block import Block
from moetron.model.moe_ep import apply_expert_parallel
from moetron.model.rope import rope_cos_sin

RESULTS = Path(__file__).resolve().parent / "results"
SEQ = 64


def model_config(args) -> ModelConfig:
    heads = max(1, args.hidden // 64)
    cfg = ModelConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=1,
        first_k_dense_replace=0, num_attention_heads=heads, q_lora_rank=args.hidden // 2,
        kv_lora_rank=args.hidden // 4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=args.experts, n_shared_experts=1, moe_intermediate_size=args.moe_intermediate,
        num_experts_per_tok=args.top_k, n_group=args.nodes, topk_group=args.max_nodes,
        num_nextn_predict_layers=0, max_position_embeddings=max(256, SEQ),
    )
    cfg.validate()
    return cfg


class Stage(nn.Module):
    def __init__(self, cfg: ModelConfig, ep, mode: str, device, transport: Transport):
        super().__init__()
        torch.manual_seed(0)
        self.cfg = cfg
        self.block = Block(cfg, moe=True)
        for p in self.block.parameters():
            nn.init.normal_(p, std=0.05)
        apply_expert_parallel(self, ep, mode, transport=transport)
        self.to(device)

    def forward(self, h):
        cos, sin = rope_cos_sin(torch.arange(h.shape[1], device=h.device), self.cfg.qk_rope_head_dim,
                                self.cfg.rope_theta, self.cfg.rope_scaling)
        return self.block(h, cos, sin)


def attention_core_flops(module, inputs, output) -> float:
    """A causal attention core's FLOPs (QK^T and PV over half the score matrix) inside one MLA call."""
    batch, seq = output.shape[:2]
    per_head = module.nope_dim + module.rope_dim + module.v_dim
    return 2.0 * batch * module.n_heads * seq * seq * per_head / 2


def loss_fn(out, target):
    return ((out.float() - target) ** 2).mean()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        ep = world_ep_group(args.ranks_per_node)
        self.transport = Transport()
        enable_overlap(self.transport, ep, [list(range(dist.get_world_size()))], args.ranks_per_node)
        self.overlapped = OverlappedForwardBackward(self.transport)
        self.stage = Stage(model_config(args), ep, args.mode, device, self.transport)
        self.batch = max(1, args.tokens // SEQ)
        self.step = 0

    def micro_batch(self):
        self.step += 1
        g = torch.Generator().manual_seed(1000 * dist.get_rank() + self.step)
        shape = (self.batch, SEQ, self.args.hidden)
        return (torch.randn(shape, generator=g).to(self.device).requires_grad_(),
                torch.randn(shape, generator=g).to(self.device))

    def pair(self, hook, recorder: Recorder):
        """One timed F&B pair; returns (seconds, seconds blocked in collectives) on this rank."""
        x_b, t_b = self.micro_batch()
        loss_b = loss_fn(self.stage(x_b), t_b)
        backward = BackwardJob(Action(Op.BW, 0, 0), self.stage, ChunkBackward(
            torch.autograd.graph.get_gradient_edge(loss_b), torch.ones_like(loss_b), [x_b]))
        x_a, t_a = self.micro_batch()
        forward = ForwardJob(Action(Op.F, 1, 0), self.stage, x_a, loss_fn, t_a)
        for job, label in ((forward, "F"), (backward, "B")):
            job.run = _marked(job.run, recorder, label)
        sync(self.device)
        dist.barrier()
        first = len(recorder.spans)
        cpu, start = time.process_time(), time.perf_counter()
        hook(forward, backward)
        sync(self.device)
        spent = time.perf_counter() - start
        self.cpu = time.process_time() - cpu
        blocked = sum(s.end - s.start for s in recorder.spans[first:] if s.kind == "wait")
        self.stage.zero_grad(set_to_none=True)
        return spent, blocked, start

    def measure(self, iters: int, recorder: Recorder) -> dict:
        """Sequential and overlapped pairs, alternating (so a change in machine load hits both alike).
        Per iteration the max over ranks; returns the medians (seconds) and the last overlapped start."""
        seq, blocked, ovl, cpu_s, cpu_o, start = [], [], [], [], [], 0.0
        for it in range(iters + 1):  # the first is a warm-up
            spent_s, waited, _ = self.pair(sequential_forward_backward, recorder)
            cpu_seq = self.cpu
            spent_o, _, start = self.pair(self.overlapped, recorder)
            both = torch.tensor([spent_s, waited, spent_o, cpu_seq, self.cpu], dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            if it:
                for values, x in zip((seq, blocked, ovl, cpu_s, cpu_o), both.tolist()):
                    values.append(x)
        med = statistics.median
        return dict(sequential=med(seq), comm=med(blocked), overlapped=med(ovl), cpu_sequential=med(cpu_s),
                    cpu_overlapped=med(cpu_o), start=start)


def dualpipe_steps(args, device, models: dict, stream: tuple | None = None) -> dict:
    """DualPipe over PP 2 (rank pairs 2i, 2i+1) x EP (ranks of one pipeline position, across nodes): median
    seconds of a step with sequential and with overlapped F&B (alternating), for each entry of `models`
    (name -> (link model or None, compute model or None)); with `stream` (flops_per_s, link model) also the
    F&B pairs of one overlapped step on the stream model ("stream_model": sums over the pairs)."""
    from moetron.parallel.executor import PipelineExecutor
    from moetron.parallel.schedules import build_schedule

    rank, world = dist.get_rank(), dist.get_world_size()
    pp_groups = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
    partition = [list(range(j, world, 2)) for j in range(2)]
    ep = new_ep_groups(partition, args.ranks_per_node)
    transport = Transport()
    enable_overlap(transport, ep, partition, args.ranks_per_node)
    cfg = model_config(args)
    schedule = build_schedule("dualpipe", 2, args.dualpipe_microbatches)
    pp_group = pp_groups[rank // 2]
    stages = {sid: Stage(cfg, ep, args.mode, device, transport)
              for sid in schedule.stages_of(dist.get_rank(pp_group))}
    batch = max(1, args.tokens // SEQ) * args.dualpipe_microbatches
    g = torch.Generator().manual_seed(rank // 2)
    inputs = torch.randn(batch, SEQ, args.hidden, generator=g).to(device)
    targets = torch.randn(batch, SEQ, args.hidden, generator=g).to(device)
    overlapped = OverlappedForwardBackward(transport)
    executors = [PipelineExecutor(schedule, stages, loss_fn, group=pp_group, forward_backward=hook)
                 for hook in (sequential_forward_backward, overlapped)]
    out = {}
    if stream is not None:  # the steady state on the stream model: the F&B pairs of one step
        flops_per_s, link = stream
        streams, detach = stream_recording(args, flops_per_s, list(stages.values()), transport)
        steady = build_schedule("dualpipe", 2, args.stream_microbatches)  # enough micro-batches for many pairs
        recording = PipelineExecutor(steady, stages, loss_fn, group=pp_group,
                                     forward_backward=_segment(overlapped, streams, "pair"))
        rows = max(1, args.tokens // SEQ)
        many = [torch.randn(rows * args.stream_microbatches, SEQ, args.hidden, generator=g).to(device) for _ in range(2)]
        for _ in range(2):
            streams.events.clear()
            recording.step(*many)
        detach()
        out["stream_model"] = replay_segments(streams, "pair", link)
        for m in stages.values():
            m.zero_grad(set_to_none=True)
    if not models:
        return out
    for name, (link, compute) in models.items():
        times: list[list[float]] = [[], []]
        transport.link = link
        charges = [h for m in stages.values() for h in compute.attach(m)] if compute is not None else []
        for it in range(args.dualpipe_steps + 1):
            spent = []
            for executor in executors:
                for m in stages.values():
                    m.zero_grad(set_to_none=True)
                sync(device)
                dist.barrier()
                start = time.perf_counter()
                executor.step(inputs, targets)
                sync(device)
                spent.append(time.perf_counter() - start)
            both = torch.tensor(spent, dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            if it:
                times[0].append(both[0].item())
                times[1].append(both[1].item())
        for handle in charges:
            handle.remove()
        out[name] = (statistics.median(times[0]), statistics.median(times[1]))
    transport.link = None
    return out


def _segment(hook, streams: StreamRecorder, name: str):
    """`hook` with its work recorded as a segment `name` of the stream model."""
    def wrapped(forward, backward):
        streams.mark(f"{name} start")
        try:
            return hook(forward, backward)
        finally:
            streams.mark(f"{name} end")
    return wrapped


def stream_recording(args, flops_per_s: float, modules: list[nn.Module], transport: Transport):
    """A StreamRecorder fed by `transport` and by a compute model (no sleeping: only the enqueue order and the
    modelled costs are wanted) attached to `modules`. Returns (streams, detach)."""
    streams = StreamRecorder(LinkModel(args.ranks_per_node, latency_s=args.latency_us * 1e-6))
    counter = ComputeModel(flops_per_s=flops_per_s, extra_flops={MLA: attention_core_flops},
                           sleep=lambda seconds: None, streams=streams)
    handles = [h for m in modules for h in counter.attach(m)]
    transport.streams = streams

    def detach():
        transport.streams = None
        for handle in handles:
            handle.remove()
    return streams, detach


def replay_segments(streams: StreamRecorder, name: str, link: LinkModel) -> dict:
    """Replay every segment `name` on the modelled streams; sums over them, and the crossings found."""
    total = dict(compute=0.0, comm=0.0, makespan=0.0, crossings=0, segments=0)
    for events in streams.segments(name):
        result = replay(events, streams, link)
        total["compute"] += result.compute
        total["comm"] += result.comm
        total["makespan"] += result.makespan
        total["crossings"] += len(crossings(events, streams, link))
        total["segments"] += 1
    return total


def stream_model(args, bench: Bench, flops_per_s: float, recorder: Recorder) -> dict:
    """The default pair on the stream model: one sequential and one overlapped pair recorded, the links
    scaled so that the pair's communication is comm_ratio x its modelled compute (as link_and_compute_model).
    Returns this rank's replays and the link scale (the same on every rank)."""
    streams, detach = stream_recording(args, flops_per_s, [bench.stage], bench.transport)
    for _ in range(2):  # the second of each is kept
        bench.pair(_segment(sequential_forward_backward, streams, "sequential"), recorder)
        bench.pair(_segment(bench.overlapped, streams, "overlapped"), recorder)
    streams.fused = False  # the hops after the first as moetron's two-hop code issues them: by the consumer
    bench.pair(_segment(bench.overlapped, streams, "overlapped_hops"), recorder)
    detach()
    probe = LinkModel(args.ranks_per_node, latency_s=0.0)
    unit = replay(streams.segment("sequential"), streams, probe)
    ratio = torch.tensor([unit.comm, unit.compute], dtype=torch.float64)
    dist.all_reduce(ratio, op=dist.ReduceOp.MAX)
    scale = ratio[0].item() / (args.comm_ratio * ratio[1].item())
    link = LinkModel(args.ranks_per_node, latency_s=args.latency_us * 1e-6, scale=scale)
    out = {"scale": scale}
    for name in ("sequential", "overlapped", "overlapped_hops"):
        result = replay(streams.segment(name), streams, link)
        out[name] = dict(compute=result.compute, comm=result.comm, makespan=result.makespan,
                         crossings=len(crossings(streams.segment(name), streams, link)), segments=1)
    return out


def gathered_stream_model(out: dict) -> list:
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, out)
    return everything


def _marked(run, recorder: Recorder, label: str):
    def wrapped():
        recorder.mark(dist.get_rank(), label, f"{label} start")
        try:
            return run()
        finally:
            recorder.mark(dist.get_rank(), label, f"{label} end")
    return wrapped


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def link_scale(bench: Bench, recorder: Recorder, compute_s: float, ratio: float, ranks_per_node: int) -> float:
    """The link model's bandwidth scale that makes a pair's modelled communication `ratio` x `compute_s`."""
    probe = LinkModel(ranks_per_node, latency_s=0.0)
    bench.transport.link = probe
    bench.pair(sequential_forward_backward, recorder)
    bench.transport.link = None
    return max_over_ranks(probe.modelled_s) / max(ratio * compute_s, 1e-6)


def gathered(recorder: Recorder, since: float) -> list:
    spans = [(s.rank, s.role, s.kind, s.start, s.end, s.what) for s in recorder.spans if s.start >= since]
    marks = [m for m in recorder.marks if m[3] >= since]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (spans, marks))
    return everything


def worker(rank: int, world: int, args, raw_path: str) -> None:
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bench = Bench(args, device)
    out: dict = {}
    timelines: dict = {}
    timed = not args.stream_model_only
    recorder = bench.transport.recorder = Recorder()
    # gloo / NCCL as is
    out["gloo"] = bench.measure(args.iters if timed else 1, recorder)
    # link model: the scale makes modelled communication ~ comm_ratio x the measured compute
    compute = out["gloo"]["sequential"] - out["gloo"]["comm"]
    scale = args.link_scale or link_scale(bench, recorder, compute, args.comm_ratio, args.ranks_per_node)
    link = LinkModel(args.ranks_per_node, latency_s=args.latency_us * 1e-6, scale=scale)
    out["link"] = dict(scale=scale, intra_gbps=link.intra_gbps * scale, inter_gbps=link.inter_gbps * scale,
                       latency_us=args.latency_us)
    if timed:
        bench.transport.link = link
        out["link_model"] = bench.measure(args.iters, recorder)
        bench.transport.link = None
        timelines["link_model"] = gathered(recorder, out["link_model"]["start"] - 1e-3)
    # link and compute model: GEMMs charged at a modelled rate (compute_scale x slower than this CPU's own
    # compute of the pair), and the links scaled to comm_ratio x that modelled compute
    core = {MLA: attention_core_flops}
    counter = ComputeModel(flops_per_s=1.0, extra_flops=core, sleep=lambda seconds: None)
    handles = counter.attach(bench.stage)
    bench.pair(sequential_forward_backward, recorder)
    for handle in handles:
        handle.remove()
    flops = max_over_ranks(counter.modelled_s)  # a pair's forward + backward FLOPs (at 1 FLOP/s)
    compute_model = ComputeModel(flops_per_s=flops / (args.compute_scale * compute), extra_flops=core)
    link_m = None
    if timed:
        handles = compute_model.attach(bench.stage)
        modelled_compute = args.compute_scale * compute
        scale_m = link_scale(bench, recorder, modelled_compute, args.comm_ratio, args.ranks_per_node)
        link_m = LinkModel(args.ranks_per_node, latency_s=args.latency_us * 1e-6, scale=scale_m)
        bench.transport.link = link_m
        out["link_and_compute_model"] = bench.measure(args.iters, recorder)
        bench.transport.link = None
        for handle in handles:
            handle.remove()
        out["compute_model"] = dict(tflops=compute_model.flops_per_s / 1e12, link_scale=scale_m,
                                    compute_scale=args.compute_scale)
        timelines["link_and_compute_model"] = gathered(recorder, out["link_and_compute_model"]["start"] - 1e-3)
    # the stream model: the enqueue order of the pair, replayed on one compute and one communication stream
    stream = stream_model(args, bench, compute_model.flops_per_s, recorder)
    stream_link = LinkModel(args.ranks_per_node, latency_s=args.latency_us * 1e-6, scale=stream["scale"])
    out["stream_model"] = gathered_stream_model(stream)
    bench.transport.recorder = None
    if args.dualpipe_steps and dist.get_world_size() % 2 == 0:
        models = {"gloo": (None, None), "link_model": (link, None),
                  "link_and_compute_model": (link_m, compute_model)} if timed else {}
        out["dualpipe"] = dualpipe_steps(args, device, models, (compute_model.flops_per_s, stream_link))
        out["dualpipe_stream_model"] = gathered_stream_model(out["dualpipe"].pop("stream_model"))
    if rank == 0:
        out["timelines"] = timelines
        out["device"] = str(device.type)
        out["backend"] = dist.get_backend()
        Path(raw_path).write_text(json.dumps(out))


NAMES = ("gloo", "link_model", "link_and_compute_model")


def stream_efficiency(t: dict) -> float:
    return (t["compute"] + t["comm"] - t["makespan"]) / max(min(t["compute"], t["comm"]), 1e-12)


def stream_model_keys(raw: dict) -> dict:
    """The stream-model keys: efficiency of the worst rank, its modelled times, crossings over all ranks."""
    out = {}
    pair_ranks = raw["stream_model"]
    for key, ranks in (("", [r["overlapped"] for r in pair_ranks]), ("dualpipe_", raw.get("dualpipe_stream_model"))):
        if not ranks:
            continue
        worst = min(ranks, key=stream_efficiency)
        out.update({f"{key}overlap_efficiency_stream_model": stream_efficiency(worst),
                    f"{key}stream_model_compute_ms": 1e3 * worst["compute"],
                    f"{key}stream_model_comm_ms": 1e3 * worst["comm"],
                    f"{key}stream_model_overlapped_ms": 1e3 * worst["makespan"],
                    f"{key}stream_model_crossings": sum(r["crossings"] for r in ranks),
                    f"{key}stream_model_pairs": worst["segments"]})
    out["stream_model_sequential_efficiency"] = min(stream_efficiency(r["sequential"]) for r in pair_ranks)
    out["overlap_efficiency_stream_model_hops"] = min(stream_efficiency(r["overlapped_hops"]) for r in pair_ranks)
    out["stream_model_hops_crossings"] = sum(r["overlapped_hops"]["crossings"] for r in pair_ranks)
    out["stream_model_link_scale"] = pair_ranks[0]["scale"]
    return out


def efficiency(t: dict) -> tuple[float, float]:
    compute = t["sequential"] - t["comm"]
    return (compute + t["comm"] - t["overlapped"]) / max(min(compute, t["comm"]), 1e-9), compute


def plot(ranks: list, title: str, path: Path) -> None:
    """Per-rank timeline of the sub-steps of one overlapped pair (`ranks`: what gathered() returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(m[3] for _, marks in ranks for m in marks if m[2].endswith("start"))
    colors = {"dispatch": "#cc6633", "combine": "#3377aa", "combine-bwd": "#ee9966", "dispatch-bwd": "#77aadd",
              "counts": "#999999", "other": "#999999"}
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.9 * len(ranks)))
    yticks, ylabels = [], []
    for r, (spans, marks) in enumerate(ranks):
        for j, role in enumerate(("F", "B")):
            y = (len(ranks) - 1 - r) * 2.4 + (1 - j) * 1.1
            yticks.append(y + 0.4)
            ylabels.append(f"rank {r} {'forward' if role == 'F' else 'backward'}")
            begin = [m[3] for m in marks if m[1] == role and m[2].endswith("start")]
            end = [m[3] for m in marks if m[1] == role and m[2].endswith("end")]
            if not begin or not end:
                continue
            waits = sorted((s[3], s[4]) for s in spans if s[1] == role and s[2] == "wait")
            cursor = begin[-1]
            for a, b in waits + [(end[-1], end[-1])]:  # compute = the thread's time outside waits
                if a > cursor:
                    ax.broken_barh([(1e3 * (cursor - t0), 1e3 * (a - cursor))], (y + 0.45, 0.4),
                                   color="#55aa55" if role == "F" else "#aa55aa")
                cursor = max(cursor, b)
            for s in spans:
                if s[1] == role and s[2] == "comm":
                    ax.broken_barh([(1e3 * (s[3] - t0), 1e3 * (s[4] - s[3]))], (y, 0.4), color=colors.get(s[5], "#999"))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#55aa55", "#aa55aa")] + \
        [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in ("dispatch", "combine", "combine-bwd", "dispatch-bwd",
                                                               "counts")]
    ax.legend(handles, ["forward compute", "backward compute", "dispatch", "combine", "combine bwd (dispatch of grads)",
                        "dispatch bwd (combine of grads)", "count exchange"], fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.22), ncol=4)
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_xlabel("ms since the pair started (upper bar: computing, not waiting for a transfer or for the other "
                  "side's turn; lower bar: all-to-all issue -> done)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-nodes", type=int, default=2, help="M: nodes a token may reach")
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--mode", choices=("flat", "two_hop"), default="two_hop")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--link-scale", type=float, default=None,
                        help="bandwidth scale of the link model (default: modelled comm = measured compute)")
    parser.add_argument("--comm-ratio", type=float, default=2 / 3,
                        help="with the automatic scale: modelled communication / measured compute of a pair "
                             "(2/3: each chunk's all-to-alls take as long as the forward chunk computes)")
    parser.add_argument("--compute-scale", type=float, default=8.0,
                        help="compute model: a pair's modelled compute / this CPU's measured compute of it")
    parser.add_argument("--latency-us", type=float, default=50.0, help="link model latency per transfer")
    parser.add_argument("--dualpipe-steps", type=int, default=3,
                        help="timed DualPipe steps (PP 2 x EP) with and without overlap; 0: skip")
    parser.add_argument("--dualpipe-microbatches", type=int, default=4)
    parser.add_argument("--stream-microbatches", type=int, default=12,
                        help="micro-batches of the DualPipe step recorded on the stream model (12: 9 F&B pairs per rank)")
    parser.add_argument("--stream-model-only", action="store_true",
                        help="only the stream model (pair and DualPipe steady state), no timed runs")
    parser.add_argument("--timeout", type=float, default=500.0)
    parser.add_argument("--out", default=str(RESULTS / "overlap.json"))
    args = parser.parse_args(argv)
    world = args.nodes * args.ranks_per_node
    if args.experts % world or args.experts % args.nodes or args.top_k % args.max_nodes:
        parser.error("experts must divide by nodes x ranks_per_node, and top-k by max-nodes")
    if args.hidden % 64:
        parser.error("hidden must be a multiple of 64")

    raw_path = Path(args.out).with_suffix(".raw.json")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world:
        parser.error(f"NCCL needs one GPU per rank: {world} ranks, {torch.cuda.device_count()} GPUs visible "
                     "(fewer --nodes / --ranks-per-node, or CUDA_VISIBLE_DEVICES= to run on CPU with gloo)")
    load_before = os.getloadavg()[0]
    run_local(worker, world, args=(args, str(raw_path)), timeout=args.timeout, backend=backend)
    raw = json.loads(raw_path.read_text())
    raw_path.unlink()

    result = dict(nodes=args.nodes, ranks_per_node=args.ranks_per_node, tokens=args.tokens, hidden=args.hidden,
                  experts=args.experts, top_k=args.top_k, moe_intermediate=args.moe_intermediate, mode=args.mode,
                  iters=args.iters, comm_ratio=args.comm_ratio, device=raw["device"], backend=raw["backend"],
                  link_scale=raw["link"]["scale"], link_intra_gbps=raw["link"]["intra_gbps"],
                  link_inter_gbps=raw["link"]["inter_gbps"], link_latency_us=raw["link"]["latency_us"],
                  cpu_count=os.cpu_count(), load_average=max(load_before, os.getloadavg()[0]))
    world = args.nodes * args.ranks_per_node
    result.update(stream_model_keys(raw))
    if "compute_model" in raw:
        result.update(compute_model_tflops=raw["compute_model"]["tflops"],
                      compute_model_link_scale=raw["compute_model"]["link_scale"], compute_scale=args.compute_scale)
    names = [name for name in NAMES if name in raw and "overlapped" in raw[name]]
    for name in names:
        t = raw[name]
        eff, compute = efficiency(t)
        # The cores bound the overlapped pair: every rank's CPU work (compute, and the bytes gloo moves) fits
        # on cpu_count cores at best. The efficiency the cores allow, with that bound for t_overlap:
        bound = world * t["cpu_overlapped"] / (os.cpu_count() or 1) if raw["device"] == "cpu" else 0.0
        best = max(bound, compute, t["comm"])
        result[f"{name}_cpu_bound_ms"] = 1e3 * bound
        result[f"overlap_efficiency_{name}_ceiling"] = (t["sequential"] - best) / max(min(compute, t["comm"]), 1e-9)
        result.update({f"{name}_compute_ms": 1e3 * compute, f"{name}_comm_ms": 1e3 * t["comm"],
                       f"{name}_sequential_ms": 1e3 * t["sequential"], f"{name}_overlapped_ms": 1e3 * t["overlapped"],
                       f"{name}_cpu_sequential_ms": 1e3 * t["cpu_sequential"],
                       f"{name}_cpu_overlapped_ms": 1e3 * t["cpu_overlapped"],
                       f"overlap_efficiency_{name}": eff, f"step_ratio_{name}": t["overlapped"] / t["sequential"]})
    for name, (seq, ovl) in raw.get("dualpipe", {}).items():
        result.update({f"dualpipe_{name}_sequential_ms": 1e3 * seq, f"dualpipe_{name}_overlapped_ms": 1e3 * ovl,
                       f"dualpipe_step_ratio_{name}": ovl / seq})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, suffix, what in (("link_model", ".png", "link model, real CPU compute"),
                               ("link_and_compute_model", "_modelled.png", "link and compute model")):
        if name not in raw["timelines"]:
            continue
        plot(raw["timelines"][name], f"Overlapped F&B of one MoE block, {args.nodes} nodes x {args.ranks_per_node} "
             f"ranks, {what}: efficiency {result[f'overlap_efficiency_{name}']:.2f}, step ratio "
             f"{result[f'step_ratio_{name}']:.2f}", Path(str(Path(args.out).with_suffix("")) + suffix))
    for name in names:
        print(f"{name:>22}: compute {result[f'{name}_compute_ms']:.1f} ms, all-to-all {result[f'{name}_comm_ms']:.1f} ms, "
              f"sequential {result[f'{name}_sequential_ms']:.1f} ms, overlapped {result[f'{name}_overlapped_ms']:.1f} ms, "
              f"efficiency {result[f'overlap_efficiency_{name}']:.3f} (CPU ceiling "
              f"{result[f'overlap_efficiency_{name}_ceiling']:.2f}), step ratio {result[f'step_ratio_{name}']:.3f}")
    if "dualpipe_step_ratio_link_model" in result:
        print(f"DualPipe step (PP 2 x EP {world // 2}, {args.dualpipe_microbatches} micro-batches), overlapped / sequential: "
              + ", ".join(f"{name} {result[f'dualpipe_step_ratio_{name}']:.3f}" for name in NAMES))
    print(f"stream model, sequential pair: efficiency {result['stream_model_sequential_efficiency']:.3f}; "
          f"overlapped pair with the later hops issued by the consumer (not one kernel): "
          f"{result['overlap_efficiency_stream_model_hops']:.3f}, crossings {result['stream_model_hops_crossings']}")
    for key in ("", "dualpipe_"):
        if f"{key}overlap_efficiency_stream_model" in result:
            print(f"stream model ({'DualPipe steady state: the F&B pairs of a step' if key else 'the pair'}): "
                  f"efficiency {result[f'{key}overlap_efficiency_stream_model']:.3f} (worst rank), crossings "
                  f"{result[f'{key}stream_model_crossings']}")
    return result


if __name__ == "__main__":
    main()
