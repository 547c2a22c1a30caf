"""Does moetron's CUDA path work, and how fast are its kernels? One script for a lent H100/H200 (< 8 minutes).

    python benchmarks/gpu_check.py              # on a GPU machine
    python benchmarks/gpu_check.py --dry-run    # toy sizes on the CPU (make test runs this)

Checks, each a key group of benchmarks/results/gpu_check.json (a flat JSON object):
  train_*        the tiny model trained by the real CLI (`python -m moetron.train`) for --train-steps steps in
                 BF16 on the device and on the CPU, same seed and data: max relative loss difference per step
                 (BF16 rounding differs between the CPU and the GPU kernels: expect ~1e-2, not 0)
  fp8_*          FP8 GEMMs at DeepSeek-V3 shapes (arXiv 2412.19437 §3.3: 1x128 activation tiles, 128x128
                 weight blocks): the `torch` backend (torch._scaled_mm) against the exact emulation (relative
                 error, calc_diff), and FP8 vs BF16 TFLOP/s of the same GEMM
  grouped_*      the routed experts' grouped GEMM (BF16) at V3 expert shapes, TFLOP/s
  moe_*          one V3-width MoE layer (router, shared expert, routed experts) forward + backward in BF16:
                 time and MFU against --peak-tflops (H100/H200 dense BF16: 989)
  overlap_*      overlapped F&B (comm/overlap.py) on ONE device: a MoE block with expert parallelism over a
                 world of one, each transfer's modelled link time (as if every row crossed nodes, scaled so a
                 pair communicates 2/3 of its compute) spent by a sleep kernel on a side stream that the
                 consumer's stream waits for (GPU; CPU: the link model sleeps on the host). The sequential and
                 the overlapped pair timed with CUDA events, with the stream model's prediction of the same
                 pair (comm/stream_model.py); and a DualPipeV step (one rank, two stages: 5 F&B pairs at 4
                 micro-batches) with sequential vs overlapped F&B
A check that cannot run here (no CUDA, no FP8 tensor cores) records why in `<group>_skipped` instead.
The headline line printed last is `gpu_check: ...` with the main figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from moetron.comm import LinkModel, Transport, world_ep_group
from moetron.comm.compute_model import ComputeModel
from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap, sequential_forward_backward
from moetron.comm.stream_model import StreamRecorder, crossings, replay

from moetron.config import ModelConfig
from moetron.device import choose_device, is_gpu, start, synchronize
from moetron.fp8.gemm import calc_diff, fp8_gemm
from moetron.fp8.quant import quantize_1x128, quantize_128x128
from moetron.model.grouped_gemm import grouped_linear
from moetron.model.moe import MoE

RESULTS = Path(__file__).resolve().parent / "results"
# (name, M tokens, K in, N out) of DeepSeek-V3's FP8 GEMMs (hidden 7168, q_lora 1536, 128 heads, moe_inter 2048)
V3_GEMMS = [("q_b_proj", 4096, 1536, 24576), ("o_proj", 4096, 16384, 7168), ("expert_gate_up", 4096, 7168, 4096),
            ("expert_down", 4096, 2048, 7168)]
TOY_GEMMS = [("toy", 64, 256, 384)]


def timed(fn, device, repeat: int) -> float:
    """Median seconds of fn() after one warm-up call, synchronizing the device around each call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------------------------- training
def train_losses(device: str, steps: int, run_dir: Path) -> list[float]:
    """The tiny model trained by the CLI on `device` in BF16; the per-step losses it logs."""
    cmd = [sys.executable, "-m", "moetron.train", f"run.dir={run_dir}", f"run.device={device}", "model=tiny",
           f"train.steps={steps}", "train.precision=bf16", "train.eval_every=0", "run.log_every=1",
           "run.progress=false", "monitor.wandb=false", "monitor.report=false", "fp8=disabled"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def check_training(device: torch.device, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        here = train_losses("cuda" if is_gpu(device) else "cpu", steps, Path(tmp) / "device")
        host = train_losses("cpu", steps, Path(tmp) / "host")
    diffs = [abs(a - b) / abs(b) for a, b in zip(here, host)]
    return {"train_steps": steps, "train_first_loss_device": here[0], "train_first_loss_cpu": host[0],
            "train_last_loss_device": here[-1], "train_last_loss_cpu": host[-1],
            "train_max_rel_loss_diff": max(diffs), "train_first_rel_loss_diff": diffs[0]}


# --------------------------------------------------------------------------------------------- FP8 GEMMs
def check_fp8(device: torch.device, shapes, repeat: int) -> dict:
    out: dict = {}
    kernel = None
    if is_gpu(device):
        try:
            from moetron.fp8.backends import gemm_kernel

            kernel = gemm_kernel("torch", device)
        except Exception as err:  # no FP8 tensor cores, or an old torch
            out["fp8_torch_skipped"] = f"{type(err).__name__}: {err}"
    else:
        out["fp8_torch_skipped"] = "no CUDA device: only the emulation ran"
    errors, ratios = [], []
    for name, m, k, n in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, device=device, generator=gen)
        w = torch.randn(n, k, device=device, generator=gen) / k**0.5
        qa, sa = quantize_1x128(a)
        qw, sw = quantize_128x128(w)
        emulated = fp8_gemm(qa, sa, qw, sw, b_block=True)
        out[f"fp8_{name}_emulated_vs_fp32_diff"] = calc_diff(emulated, a @ w.T)
        if kernel is None:
            continue
        fast = kernel(qa, sa, qw, sw, b_block=True, out_dtype=torch.bfloat16)
        errors.append(calc_diff(fast.float(), emulated))
        out[f"fp8_{name}_torch_vs_emulated_diff"] = errors[-1]
        flops = 2 * m * k * n
        t_fp8 = timed(lambda qa=qa, sa=sa, qw=qw, sw=sw: kernel(qa, sa, qw, sw, b_block=True,
                                                                out_dtype=torch.bfloat16), device, repeat)
        a16, w16 = a.bfloat16(), w.bfloat16()
        t_bf16 = timed(lambda a16=a16, w16=w16: a16 @ w16.T, device, repeat)
        out[f"fp8_{name}_tflops"] = flops / t_fp8 / 1e12
        out[f"fp8_{name}_bf16_tflops"] = flops / t_bf16 / 1e12
        ratios.append(t_bf16 / t_fp8)
    if errors:
        out["fp8_max_torch_vs_emulated_diff"] = max(errors)
        out["fp8_speedup_vs_bf16_min"] = min(ratios)
    return out


# ------------------------------------------------------------------------------------------ grouped GEMM
def check_grouped(device: torch.device, experts: int, rows: int, hidden: int, inter: int, repeat: int) -> dict:
    dtype = torch.bfloat16 if is_gpu(device) else torch.float32
    x = torch.randn(experts * rows, hidden, device=device, dtype=dtype)
    w = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) / hidden**0.5
    counts = torch.full((experts,), rows, device=device, dtype=torch.long)
    seconds = timed(lambda: grouped_linear(x, w, counts), device, repeat)
    return {"grouped_experts": experts, "grouped_rows_per_expert": rows, "grouped_hidden": hidden,
            "grouped_out": 2 * inter, "grouped_dtype": str(dtype).removeprefix("torch."),
            "grouped_tflops": 2 * experts * rows * hidden * 2 * inter / seconds / 1e12}


# -------------------------------------------------------------------------------------------- MoE layer
def check_moe(device: torch.device, cfg: ModelConfig, tokens: int, repeat: int, peak_tflops: float) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=cfg.initializer_range)
    dtype = torch.bfloat16 if is_gpu(device) else torch.float32
    moe.to(dtype).train()
    moe.gate.float()  # the router stays FP32 (§2.1.2)
    h = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def step():
        moe(h).float().square().mean().backward()

    seconds = timed(step, device, repeat)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down
    active = cfg.num_experts_per_tok + cfg.n_shared_experts
    flops = 3 * 2 * tokens * (active * per_expert + cfg.hidden_size * cfg.n_routed_experts)  # fwd + 2x bwd
    tflops = flops / seconds / 1e12
    return {"moe_tokens": tokens, "moe_experts": cfg.n_routed_experts, "moe_top_k": cfg.num_experts_per_tok,
            "moe_hidden": cfg.hidden_size, "moe_step_ms": 1e3 * seconds, "moe_tflops": tflops,
            "moe_mfu": tflops / peak_tflops, "moe_peak_tflops": peak_tflops}


# ------------------------------------------------------------------------------------- overlapped F&B
class LoopbackTransport(Transport):
    """A world of one whose transfers cost what they would if every row crossed nodes: on a GPU each collective
    is followed by a sleep kernel of the link model's time on a side stream, which the consumer's stream waits
    for (the host never waits); on the CPU the link model's handles sleep on the host."""

    def __init__(self, model: LinkModel, device: torch.device):
        super().__init__()
        self.model, self.device = model, device
        self.side = torch.cuda.Stream(device) if is_gpu(device) else None
        self.cycles_per_s = sleep_cycles_per_s(device) if is_gpu(device) else 0.0
        if self.side is None:
            self.link = model
        self.modelled_s = 0.0

    def link_bytes(self, model, group, send_splits, recv_splits, row_bytes):
        return 0, max(sum(send_splits), sum(recv_splits)) * row_bytes

    def all_to_all(self, buf, group, send_splits, recv_splits, what, async_op=False, backward=False):
        out, work = super().all_to_all(buf, group, send_splits, recv_splits, what, async_op=True, backward=backward)
        seconds = self.model.transfer_time(*self.link_bytes(self.model, group, send_splits, recv_splits,
                                                            buf[:1].numel() * buf.element_size()))
        self.modelled_s += seconds
        handle = work
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # the rows to send are ready
            with torch.cuda.stream(self.side):
                torch.cuda._sleep(int(seconds * self.cycles_per_s))
                done = torch.cuda.Event()
                done.record()
            handle = _SideStreamHandle(work, done)
        if async_op:
            return out, handle
        if handle is not None:
            handle.wait()
        return out, None


class _SideStreamHandle:
    def __init__(self, work, done):
        self.work, self.done = work, done

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
        torch.cuda.current_stream().wait_event(self.done)  # the compute stream waits, not the host
        return True


def sleep_cycles_per_s(device: torch.device) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    begin.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return 1e7 / (begin.elapsed_time(end) / 1e3)


def device_seconds(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn(): CUDA events on a GPU, the host clock on the CPU (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        if is_gpu(device):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return sorted(times)[len(times) // 2]


def overlap_stage(cfg: ModelConfig, ep, transport: Transport, device: torch.device, seed: int):
    from overlap import Stage  # benchmarks/overlap.py: one MoE block as a pipeline stage

    torch.manual_seed(seed)
    return Stage(cfg, ep, "flat", device, transport)


def stream_efficiency(streams: StreamRecorder, name: str, link: LinkModel) -> tuple[float, int]:
    """Efficiency of the recorded segments `name` replayed on the stream model (summed), and the crossings."""
    compute = comm = makespan = 0.0
    crossed = 0
    for events in streams.segments(name):
        result = replay(events, streams, link)
        compute, comm, makespan = compute + result.compute, comm + result.comm, makespan + result.makespan
        crossed += len(crossings(events, streams, link))
    return (compute + comm - makespan) / max(min(compute, comm), 1e-12), crossed


def check_overlap(device: torch.device, dry_run: bool, repeat: int, comm_ratio: float = 2 / 3) -> dict:
    from types import SimpleNamespace

    from moetron.parallel.actions import Action, Op
    from moetron.parallel.executor import BackwardJob, ForwardJob, PipelineExecutor
    from moetron.parallel.schedules import build_schedule
    from moetron.parallel.weight_grad import ChunkBackward
    from overlap import attention_core_flops, loss_fn, model_config

    from moetron.model.attention import MLA

    start("cuda" if is_gpu(device) else "cpu")  # a world of one (NCCL on a GPU, gloo on the CPU)
    shape = SimpleNamespace(hidden=128, experts=8, moe_intermediate=128, top_k=2, nodes=1, max_nodes=1) if dry_run \
        else SimpleNamespace(hidden=2048, experts=16, moe_intermediate=1024, top_k=4, nodes=1, max_nodes=1)
    tokens, seq = (128, 64) if dry_run else (8192, 1024)
    cfg = model_config(shape)
    ep = world_ep_group(ranks_per_node=1)
    link_model = LinkModel(ranks_per_node=1, latency_s=0.0, scale=1e9)  # free links until scaled below
    transport = LoopbackTransport(link_model, device)
    enable_overlap(transport, ep, [[0]], 1)
    stage = overlap_stage(cfg, ep, transport, device, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = (tokens // seq, seq, cfg.hidden_size)

    def pair(hook):
        """Forward micro-batch b now; returns the call that runs the pair (forward of a, backward of b)."""
        x_b = torch.randn(batch, device=device, generator=gen, requires_grad=True)
        loss_b = loss_fn(stage(x_b), torch.randn(batch, device=device, generator=gen))
        backward = BackwardJob(Action(Op.BW, 0, 0), stage, ChunkBackward(
            torch.autograd.graph.get_gradient_edge(loss_b), torch.ones_like(loss_b), [x_b]))
        x_a = torch.randn(batch, device=device, generator=gen, requires_grad=True)
        forward = ForwardJob(Action(Op.F, 1, 0), stage, x_a, loss_fn, torch.randn(batch, device=device, generator=gen))
        return lambda: (hook(forward, backward), stage.zero_grad(set_to_none=True))

    def timed_pair(hook) -> float:
        calls = [pair(hook) for _ in range(repeat + 1)]  # the chunks' first forwards are not timed
        return device_seconds(lambda: calls.pop(0)(), device, repeat)

    # The compute of a pair (free links); its FLOPs and bytes; links scaled so that a pair communicates
    # comm_ratio x its compute (as benchmarks/overlap.py does).
    compute_s = timed_pair(sequential_forward_backward)
    run = pair(sequential_forward_backward)
    counter = ComputeModel(flops_per_s=1.0, extra_flops={MLA: attention_core_flops}, sleep=lambda s: None)
    handles = counter.attach(stage)  # after b's forward: counts a's forward and (as much) b's backward
    link_model.scale, transport.modelled_s = 1.0, 0.0
    run()
    for h in handles:
        h.remove()
    unit_comm_s = transport.modelled_s  # the pair's transfers at scale 1, no latency
    link_model.scale = unit_comm_s / (comm_ratio * compute_s)
    link_model.latency_s = 0.0 if dry_run else 5e-6
    flops_per_s = counter.modelled_s / compute_s  # the achieved rate: the stream model's kernel costs
    out = {"overlap_tokens": tokens, "overlap_hidden": cfg.hidden_size, "overlap_experts": cfg.n_routed_experts,
           "overlap_pair_compute_ms": 1e3 * compute_s, "overlap_link_scale": link_model.scale}
    sequential_s = timed_pair(sequential_forward_backward)
    comm_s = unit_comm_s / link_model.scale  # comm_ratio x compute_s (latency aside)
    overlapped_s = timed_pair(OverlappedForwardBackward(transport))
    out |= {"overlap_pair_comm_ms": 1e3 * comm_s, "overlap_pair_sequential_ms": 1e3 * sequential_s,
            "overlap_pair_overlapped_ms": 1e3 * overlapped_s,
            "overlap_pair_efficiency": (sequential_s - overlapped_s) / max(min(compute_s, comm_s), 1e-12)}
    # The same pair on the stream model, at the achieved compute rate and the same links.
    streams = StreamRecorder(link_model)
    counter = ComputeModel(flops_per_s=flops_per_s, extra_flops={MLA: attention_core_flops}, sleep=lambda s: None,
                           streams=streams)
    handles = counter.attach(stage)  # before b's forward: its backward's kernels are charged too
    transport.streams = streams
    run = pair(OverlappedForwardBackward(transport))
    streams.mark("pair start")
    run()
    streams.mark("pair end")
    transport.streams = None
    for h in handles:
        h.remove()
    out["overlap_pair_efficiency_stream_model"], out["overlap_pair_stream_model_crossings"] = \
        stream_efficiency(streams, "pair", link_model)

    # DualPipeV on one rank: two stages (one MoE block each), sequential vs overlapped F&B.
    schedule = build_schedule("dualpipev", 1, 4)
    stages = {sid: overlap_stage(cfg, ep, transport, device, seed=sid.stage) for sid in schedule.stages_of(0)}
    inputs = torch.randn((4 * batch[0],) + batch[1:], device=device, generator=gen)
    targets = torch.randn((4 * batch[0],) + batch[1:], device=device, generator=gen)
    steps = {}
    for name, hook in (("sequential", sequential_forward_backward), ("overlapped", OverlappedForwardBackward(transport))):
        executor = PipelineExecutor(schedule, stages, loss_fn, forward_backward=hook, device=device)
        steps[name] = device_seconds(lambda executor=executor: executor.step(inputs, targets), device, repeat)
    out |= {"overlap_dualpipev_sequential_ms": 1e3 * steps["sequential"],
            "overlap_dualpipev_overlapped_ms": 1e3 * steps["overlapped"],
            "overlap_dualpipev_step_ratio": steps["overlapped"] / steps["sequential"]}
    return out


def moe_config(dry_run: bool) -> ModelConfig:
    if dry_run:
        return ModelConfig(hidden_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                           n_shared_experts=1, n_group=1, topk_group=1)
    # DeepSeek-V3's MoE widths (§4.2) with 64 of its 256 experts: one EP-64 rank's view is 4; 64 keeps
    # the router and the per-expert GEMMs at full size while the layer fits in one GPU with its gradients.
    return ModelConfig(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=64, num_experts_per_tok=8,
                       n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, on the CPU when no GPU is visible")
    parser.add_argument("--train-steps", type=int, default=None, help="default 30 (dry run: 2)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 10, dry run 1)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak of the device")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()
    device = choose_device("auto", int(os.environ.get("LOCAL_RANK", "0")))
    repeat = args.repeat or (1 if args.dry_run else 10)
    steps = args.train_steps or (2 if args.dry_run else 30)
    result = {"dry_run": args.dry_run, "device": str(device), "torch_version": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if is_gpu(device) else "host CPU"}
    started = time.perf_counter()
    result |= check_training(device, steps)
    result |= check_fp8(device, TOY_GEMMS if args.dry_run else V3_GEMMS, repeat)
    result |= check_grouped(device, *((4, 32, 128, 64) if args.dry_run else (8, 2048, 7168, 2048)), repeat)
    result |= check_moe(device, moe_config(args.dry_run), 64 if args.dry_run else 8192, repeat, args.peak_tflops)
    result |= check_overlap(device, args.dry_run, repeat)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"gpu_check: device={result['device_name']} train_max_rel_loss_diff={result['train_max_rel_loss_diff']:.3g} "
          f"fp8_max_torch_vs_emulated_diff={result.get('fp8_max_torch_vs_emulated_diff', 'skipped')} "
          f"grouped_tflops={result['grouped_tflops']:.1f} moe_mfu={result['moe_mfu']:.3f} "
          f"overlap_pair_efficiency={result['overlap_pair_efficiency']:.2f} (stream model "
          f"{result['overlap_pair_efficiency_stream_model']:.2f}) "
          f"overlap_dualpipev_step_ratio={result['overlap_dualpipev_step_ratio']:.2f} "
          f"seconds={result['seconds']:.0f}")


if __name__ == "__main__":
    main()
