"""How much memory do the distributed trainer's arXiv 2412.19437 §3.2 switches save? `parallel.recompute` and `parallel.ema`.

1. Selective recompute (`parallel.recompute=true`, `moetron.model.stages.apply_selective_recompute`, the very
   function the distributed trainer calls): every RMSNorm, and each MLA up-projection with the norm of its
   latent, runs under non-reentrant activation checkpointing. The model (default: the `tiny` preset's layout
   scaled to hidden 512, 4 layers, MTP on) is split into `--pp` pipeline stages with `split_stages`, as the
   trainer does; each stage runs one micro-batch forward (the last stage through its losses, lm + 0.3 * MTP,
   as the trainer's loss function; an inner stage backward from a fixed random output gradient) once plain
   and once with recompute. The activation memory is the bytes autograd saves for backward, counted with
   `torch.autograd.graph.saved_tensors_hooks`: every saved tensor's storage, once per storage (views of one
   storage count once), parameters and buffers of the stage left out. Inside a checkpointed region the
   checkpoint's own hooks take over, so what is counted there is what the checkpoint keeps (its inputs), which
   is what recompute leaves in memory. Both runs then backward, and the losses and every gradient (parameters,
   and the stage input's for inner stages) must be bitwise equal, so the saving is that of a correct run.
   With `--rss` each variant's forward is also run in a fresh subprocess, and the growth of its resident set
   (VmRSS after the forward minus before, the saved activations alive) is reported; it is only indicative
   (the allocator's caching and page granularity blur it).
   The planner's estimate (`moetron.plan.memory.stage_activation_per_token`, the per-token activation model
   behind `python -m moetron.plan`) is evaluated for the same stage contents, precision, recompute = none /
   selective, attention fused (torch's CPU SDPA runs a flash kernel: it saves the log-sum-exp, not the
   probabilities; the planner would assume unfused on `cpu_local`) and cross-entropy not fused (the eager
   model materializes the logits); predicted and measured bytes and ratios are reported side by side. Both
   drop q, k, v of the attention core: the model's recompute region runs from the latents through the
   attention core (MLA.latent_attention), so neither the up-projections' outputs nor q, k, v are kept.
2. EMA of the weights (`parallel.ema=true`): the distributed trainer's own code is run, not a copy of it:
   `DistributedTrainer.build_optimizer`, `after_update` and `ema_wait` are called on a stand-in holding what
   they read (config, one single-rank ZeRO shard group with the stage's parameters, the optimizer), so the
   EMA is exactly the trainer's: one copy of each parameter this rank owns under ZeRO-1 (here dp=1: the whole
   stage) in CPU memory, updated by `lerp_` on a background thread after each applied step. Reported: the
   bytes it holds, their device(s), the accelerator bytes it adds (0: it lives in CPU memory), the time of one
   update (submit to completion, median over `--ema-steps`), and the time the training step itself waits
   for at submission (the update overlaps the next step's forward/backward).

Writes benchmarks/results/memory_savings.json (a JSON object; keys below):
  config: hidden, layers, heads, experts, experts_per_token, vocab, seq, micro_batch, pp, precision, threads,
          seed, params, torch_version
  stages: one object per pipeline stage:
      stage, layers (full-model layer ids), mtp_modules, embedding, head, params, regions_recomputed,
      saved_bytes_plain, saved_bytes_recompute, saved_tensors_plain, saved_tensors_recompute,
      saved_bytes_saved (plain - recompute), ratio (recompute / plain), grads_equal, losses_equal,
      max_abs_grad_diff, predicted_bytes_plain, predicted_bytes_recompute, predicted_ratio,
      (with --rss) rss_delta_plain, rss_delta_recompute
  activations: the same bytes summed over the stages (one micro-batch through the whole pipeline):
      saved_bytes_plain, saved_bytes_recompute, ratio, saving_fraction (1 - ratio), grads_equal,
      predicted_bytes_plain, predicted_bytes_recompute, predicted_ratio
  ema: stage, params, bytes, dtype, devices, accelerator_bytes, decay, update_ms_median, update_ms_min,
       submit_ms_median, steps, matches_reference (one parameter's EMA redone here with lerp_ agrees),
       reused (where the EMA code came from)
The headline `activation_ratio_recompute = 0.xx` is the last line printed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moetron.config import ModelConfig
from moetron.model import DeepSeekV3
from moetron.model.stages import PipelineStage, apply_selective_recompute, split_stages
from moetron.plan.memory import Precision, stage_activation_per_token
from moetron.plan.stages import Stage

RESULTS = Path(__file__).resolve().parent / "results"
MTP_LAMBDA = 0.3


def model_config(hidden: int = 512, layers: int = 4, heads: int = 8, experts: int = 8, experts_per_token: int = 2,
                 vocab: int = 1024, seq: int = 256) -> ModelConfig:
    """The tiny preset's layout (query compression, decoupled RoPE, 1 dense layer then MoE, 1 shared expert,
    MTP on) with its sizes scaled from `hidden`."""
    head_dim = max(8, hidden // heads)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        first_k_dense_replace=1, num_attention_heads=heads, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
        qk_nope_head_dim=head_dim, qk_rope_head_dim=max(4, head_dim // 2), v_head_dim=head_dim,
        n_routed_experts=experts, n_shared_experts=1, moe_intermediate_size=max(8, hidden // 2),
        num_experts_per_tok=experts_per_token, n_group=2 if experts % 2 == 0 else 1, topk_group=1,
        num_nextn_predict_layers=1, max_position_embeddings=max(4096, seq + 1),
    )
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------- activations
class SavedTensors:
    """Storages autograd saves for backward (pack hook) that are still held when the forward ends (a branch of
    the graph dropped during the forward frees its saved tensors), each once, minus those of `exclude`."""

    def __init__(self, exclude):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.packed: list[weakref.ref] = []
        self.storages: dict[int, int] = {}  # data_ptr -> nbytes, filled when the `hooks` block ends

    def pack(self, t: torch.Tensor):
        self.packed.append(weakref.ref(t))
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self
        for ref in self.packed:
            t = ref()
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.skip and storage.nbytes() > 0:
                self.storages[storage.data_ptr()] = storage.nbytes()
        self.packed.clear()


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def stage_inputs(cfg: ModelConfig, stage: PipelineStage, seq: int, micro_batch: int, seed: int):
    """(input, tokens of the micro-batch [B, S+1], gradient for an inner stage's output), all fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), generator=gen)
    if stage.first:
        x = tokens[:, :-1]
    else:  # what the previous stage sends: a hidden state the size of the residual stream
        x = (torch.randn(micro_batch, seq, cfg.hidden_size, generator=gen) * 0.5).requires_grad_()
    grad_out = None if stage.last else torch.randn(micro_batch, seq, cfg.hidden_size, generator=gen) * 1e-3
    return x, tokens, grad_out


def run_stage(stage: PipelineStage, x, tokens, grad_out, precision: str, backward: bool = True):
    """One micro-batch through the stage, as the pipeline executor runs it. Returns (saved-tensor counter,
    losses or None, input gradient or None)."""
    x = x.detach().requires_grad_() if x.is_floating_point() else x
    counter = SavedTensors(list(stage.parameters()) + list(stage.buffers()))
    with counter.hooks(), _autocast(precision):
        out = stage(x)
        if stage.last:
            lm, mtp = out.stage.losses(out.hidden, tokens[:, :-1], tokens[:, 1:], MTP_LAMBDA)
            loss = lm + mtp if mtp is not None else lm
            losses = torch.stack([lm.detach(), (mtp if mtp is not None else lm * 0).detach()])
    if not backward:
        return counter, None, None
    if stage.last:
        loss.backward()
    else:
        out.backward(grad_out)
        losses = None
    return counter, losses, x.grad if x.is_floating_point() else None


def planner_stage(cfg: ModelConfig, stage: PipelineStage) -> Stage:
    """The planner's description (moetron.plan.stages.Stage) of what a model stage holds."""
    dense = sum(1 for i in stage.layer_ids if i < cfg.first_k_dense_replace)
    return Stage(stage.stage, dense_layers=dense, moe_layers=len(stage.layer_ids) - dense,
                 mtp_modules=len(stage.mtp) if stage.last else 0, embedding=stage.first, head=stage.last)


def predicted_bytes(cfg: ModelConfig, stage: PipelineStage, seq: int, micro_batch: int, precision: str,
                    recompute: str) -> float:
    per_token = stage_activation_per_token(cfg, planner_stage(cfg, stage), seq, 1, Precision.of(precision, False),
                                           recompute, fused_attention=True, fused_ce=False)
    return micro_batch * seq * per_token


def build_stages(cfg: ModelConfig, pp: int, seed: int) -> dict[int, PipelineStage]:
    torch.manual_seed(seed)
    return split_stages(DeepSeekV3(cfg), pp, list(range(pp)))


def measure_stage(cfg: ModelConfig, pp: int, index: int, seq: int, micro_batch: int, precision: str = "fp32",
                  seed: int = 0) -> dict:
    """Saved-for-backward bytes of stage `index` of `pp`, plain and with selective recompute, and whether
    both runs give the same losses and gradients (bitwise)."""
    plain = build_stages(cfg, pp, seed)[index]
    recomputed = build_stages(cfg, pp, seed)[index]
    regions = apply_selective_recompute(recomputed)
    x, tokens, grad_out = stage_inputs(cfg, plain, seq, micro_batch, seed + 1 + index)
    a, loss_a, gx_a = run_stage(plain, x, tokens, grad_out, precision)
    b, loss_b, gx_b = run_stage(recomputed, x, tokens, grad_out, precision)
    grads_a = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in recomputed.named_parameters() if p.grad is not None}
    if gx_a is not None:
        grads_a["<stage input>"], grads_b["<stage input>"] = gx_a, gx_b
    equal = grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    diff = max((float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a if n in grads_b), default=0.0)
    pred_plain = predicted_bytes(cfg, plain, seq, micro_batch, precision, "none")
    pred_rec = predicted_bytes(cfg, plain, seq, micro_batch, precision, "selective")
    return {
        "stage": index, "layers": plain.layer_ids, "mtp_modules": len(plain.mtp) if plain.last else 0,
        "embedding": plain.first, "head": plain.last,
        "params": sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values()),
        "regions_recomputed": regions,
        "saved_bytes_plain": a.bytes, "saved_bytes_recompute": b.bytes,
        "saved_tensors_plain": len(a.storages), "saved_tensors_recompute": len(b.storages),
        "saved_bytes_saved": a.bytes - b.bytes, "ratio": b.bytes / a.bytes,
        "grads_equal": bool(equal), "losses_equal": loss_a is None or bool(torch.equal(loss_a, loss_b)),
        "max_abs_grad_diff": diff,
        "predicted_bytes_plain": pred_plain, "predicted_bytes_recompute": pred_rec,
        "predicted_ratio": pred_rec / pred_plain,
    }


def measure_activations(cfg: ModelConfig, pp: int, seq: int, micro_batch: int, precision: str = "fp32",
                        seed: int = 0) -> dict:
    """Every stage of a `pp`-stage split (see `measure_stage`) and their sum over the pipeline."""
    stages = [measure_stage(cfg, pp, i, seq, micro_batch, precision, seed) for i in range(pp)]
    total = {k: sum(s[k] for s in stages) for k in ("saved_bytes_plain", "saved_bytes_recompute",
                                                    "predicted_bytes_plain", "predicted_bytes_recompute")}
    ratio = total["saved_bytes_recompute"] / total["saved_bytes_plain"]
    return {"stages": stages, "activations": {
        "saved_bytes_plain": total["saved_bytes_plain"], "saved_bytes_recompute": total["saved_bytes_recompute"],
        "ratio": ratio, "saving_fraction": 1.0 - ratio, "grads_equal": all(s["grads_equal"] and s["losses_equal"]
                                                                            for s in stages),
        "predicted_bytes_plain": total["predicted_bytes_plain"],
        "predicted_bytes_recompute": total["predicted_bytes_recompute"],
        "predicted_ratio": total["predicted_bytes_recompute"] / total["predicted_bytes_plain"],
    }}


def _malloc_trim() -> None:
    """Hand the heap's free pages back to the OS (glibc), so that RSS growth is that of live tensors."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_child(args) -> None:
    """Subprocess entry (--rss-child VARIANT): RSS growth over one forward of the stage, as JSON on stdout."""
    cfg = model_config(args.hidden, args.layers, args.heads, args.experts, args.experts_per_token, args.vocab, args.seq)
    stage = build_stages(cfg, args.pp, args.seed)[args.rss_stage]
    if args.rss_child == "recompute":
        apply_selective_recompute(stage)
    x, tokens, grad_out = stage_inputs(cfg, stage, args.seq, args.micro_batch, args.seed + 1 + args.rss_stage)
    run_stage(stage, x, tokens, grad_out, args.precision)  # warm-up: lazy initialization, allocator pools
    stage.zero_grad(set_to_none=False)  # the gradients stay allocated, as during training
    gc.collect()
    _malloc_trim()
    before = _vm_rss()
    counter, _, _ = run_stage(stage, x, tokens, grad_out, args.precision, backward=False)
    print(json.dumps({"rss_delta": _vm_rss() - before, "saved_bytes": counter.bytes}))


def measure_rss(args, stage: int, variant: str) -> int:
    cmd = [sys.executable, __file__, "--rss-child", variant, "--rss-stage", str(stage)]
    for name in ("hidden", "layers", "heads", "experts", "experts_per_token", "vocab", "seq", "micro_batch", "pp",
                 "precision", "threads", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_delta"]


# ---------------------------------------------------------------------------------------------------- EMA
def measure_ema(stage: nn.Module, steps: int = 10, decay: float = 0.999) -> dict:
    """The trainer's weight EMA (moetron.train.ema.WeightEMA) on the parameters of `stage`, as one rank with
    dp=1 (it owns every parameter under ZeRO-1)."""
    from moetron.train.ema import WeightEMA

    params = sorted({id(p): (n, p) for n, p in stage.named_parameters()}.values(), key=lambda kp: kp[0])
    weights = WeightEMA(dict(params), decay)
    ema = weights.averages
    assert set(ema) == {n for n, _ in params}, "the EMA should hold every parameter this rank owns"
    name, first = params[0]
    reference = first.detach().clone()  # the EMA's arithmetic, redone here on one parameter
    update, submit = [], []
    with torch.no_grad():
        for _ in range(steps):
            for _, p in params:  # stand-in for an optimizer step: the weights move
                p.add_(torch.randn_like(p), alpha=1e-4)
            t0 = time.perf_counter()
            weights.update()
            t1 = time.perf_counter()
            weights.wait()
            t2 = time.perf_counter()
            submit.append(t1 - t0)
            update.append(t2 - t0)
            reference.lerp_(first.detach(), 1.0 - decay)  # avg <- avg + (1 - decay) * (w - avg)
    weights.close()
    nbytes = sum(t.numel() * t.element_size() for t in ema.values())
    devices = sorted({str(t.device) for t in ema.values()})
    return {
        "params": sum(p.numel() for _, p in params), "bytes": nbytes,
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in ema.values()}),
        "devices": devices, "accelerator_bytes": sum(t.numel() * t.element_size() for t in ema.values()
                                                     if t.device.type != "cpu"),
        "decay": decay, "update_ms_median": 1e3 * statistics.median(update), "update_ms_min": 1e3 * min(update),
        "submit_ms_median": 1e3 * statistics.median(submit), "steps": steps,
        "matches_reference": bool(torch.allclose(ema[name], reference, rtol=0, atol=1e-7)),
        "reused": "moetron.train.ema.WeightEMA (what the trainer runs)",
    }


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (the other sizes scale with it)")
    p.add_argument("--layers", type=int, default=4, help="Transformer layers (the first dense, then MoE)")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--experts", type=int, default=8, help="routed experts")
    p.add_argument("--experts-per-token", type=int, default=2, help="routed experts per token (K_r)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--seq", type=int, default=256, help="sequence length")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages the model is split into (all are measured)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: CPU autocast, as the trainer")
    p.add_argument("--ema-stage", type=int, default=0, help="the stage whose parameters the EMA covers")
    p.add_argument("--ema-steps", type=int, default=10, help="timed EMA updates")
    p.add_argument("--rss", action="store_true", help="also measure the resident-set growth (fresh subprocesses)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "memory_savings.json"))
    p.add_argument("--rss-child", choices=["plain", "recompute"], help=argparse.SUPPRESS)
    p.add_argument("--rss-stage", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    cfg = model_config(args.hidden, args.layers, args.heads, args.experts, args.experts_per_token, args.vocab, args.seq)
    params = sum(p.numel() for p in DeepSeekV3(cfg).parameters())
    print(f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP, "
          f"{cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}, "
          f"{params / 1e6:.1f} M params; micro-batch {args.micro_batch} x seq {args.seq}, {args.precision}, "
          f"pp {args.pp}")
    t0 = time.perf_counter()
    acts = measure_activations(cfg, args.pp, args.seq, args.micro_batch, args.precision, args.seed)
    print(f"activations measured in {time.perf_counter() - t0:.1f} s")
    for s in acts["stages"]:
        if args.rss:
            s["rss_delta_plain"] = measure_rss(args, s["stage"], "plain")
            s["rss_delta_recompute"] = measure_rss(args, s["stage"], "recompute")
        extra = (f"  | RSS growth {mib(s['rss_delta_plain'])} -> {mib(s['rss_delta_recompute'])}"
                 if args.rss else "")
        holds = (", embedding" if s["embedding"] else "") + (f", head + {s['mtp_modules']} MTP" if s["head"] else "")
        print(f"stage {s['stage']} (layers {s['layers']}{holds}; {s['regions_recomputed']} regions): "
              f"saved {mib(s['saved_bytes_plain'])} -> {mib(s['saved_bytes_recompute'])} "
              f"(x{s['ratio']:.3f}; planner x{s['predicted_ratio']:.3f}), "
              f"grads equal: {s['grads_equal'] and s['losses_equal']}{extra}")
    a = acts["activations"]
    print(f"pipeline, per micro-batch: saved {mib(a['saved_bytes_plain'])} -> {mib(a['saved_bytes_recompute'])}, "
          f"-{100 * a['saving_fraction']:.1f}%; planner {mib(a['predicted_bytes_plain'])} -> "
          f"{mib(a['predicted_bytes_recompute'])} (x{a['predicted_ratio']:.3f})")

    ema_stage = build_stages(cfg, args.pp, args.seed)[args.ema_stage]
    ema = measure_ema(ema_stage, args.ema_steps)
    ema["stage"] = args.ema_stage
    print(f"EMA of stage {args.ema_stage}: {ema['params'] / 1e6:.2f} M params, {mib(ema['bytes'])} "
          f"{'/'.join(ema['dtype'])} on {'/'.join(ema['devices'])}, accelerator bytes {ema['accelerator_bytes']}; "
          f"update {ema['update_ms_median']:.2f} ms (median of {ema['steps']}, on the EMA thread), "
          f"step waits {ema['submit_ms_median']:.3f} ms to submit it")

    result = {
        "config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                   "experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
                   "vocab": cfg.vocab_size, "seq": args.seq, "micro_batch": args.micro_batch, "pp": args.pp,
                   "precision": args.precision, "threads": args.threads, "seed": args.seed, "params": params,
                   "torch_version": torch.__version__},
        **acts, "ema": ema,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"grads_equal = {a['grads_equal']}, ema_bytes = {ema['bytes']} (cpu), "
          f"ema_update_ms = {ema['update_ms_median']:.2f}")
    print(f"activation_ratio_recompute = {a['ratio']:.3f}")


if __name__ == "__main__":
    main()
