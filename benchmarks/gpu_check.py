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

from moetron.config import ModelConfig
from moetron.device import choose_device, is_gpu, synchronize
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
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"gpu_check: device={result['device_name']} train_max_rel_loss_diff={result['train_max_rel_loss_diff']:.3g} "
          f"fp8_max_torch_vs_emulated_diff={result.get('fp8_max_torch_vs_emulated_diff', 'skipped')} "
          f"grouped_tflops={result['grouped_tflops']:.1f} moe_mfu={result['moe_mfu']:.3f} "
          f"seconds={result['seconds']:.0f}")


if __name__ == "__main__":
    main()
