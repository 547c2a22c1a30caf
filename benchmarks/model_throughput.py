"""Is moetron's DeepSeekV3 as fast to train as transformers' DeepseekV3ForCausalLM?

Both models get the same config (default: the `tiny` preset of hydra_conf/model/tiny.yaml with MTP off; sizes
can be changed with the flags below) and the SAME weights: moetron's random init is saved as a checkpoint,
exported with `moetron.hf` and loaded by transformers' from_pretrained. Both train on the same random tokens,
in FP32, with the same number of threads, one full training step each (forward, cross-entropy, backward,
torch.optim.AdamW step, zero_grad), alternating step by step so that both see the same machine load; the first
`--warmup` steps are not timed and tokens/s is computed from the median step time. The first step's loss must agree
(checked), so the comparison is apples to apples. transformers runs with its defaults (SDPA attention, its
default experts implementation); moetron's step includes its sequence-wise balance-loss hook.

Writes benchmarks/results/model_throughput.json, a flat JSON object:
  ours_tokens_per_s, transformers_tokens_per_s    trained tokens per second (batch x seq / median step time)
  ratio_vs_transformers                           ours / transformers (>= 1.0: moetron is at least as fast)
  ours_step_ms, transformers_step_ms              median step time
  first_loss_ours, first_loss_transformers, first_loss_abs_diff
  hidden, layers, experts, seq, batch, steps, warmup, threads, clock, params
  transformers_attn_implementation, transformers_experts_implementation, torch_version, transformers_version
`--profile` also prints torch.profiler's top ops of one moetron step (and one transformers step).
The headline `ratio_vs_transformers = X.XX` is the last line printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moetron.checkpoint import CheckpointStore
from moetron.checkpoint.state import model_entries
from moetron.config import ModelConfig, MoetronConfig
from moetron.config.hydra import to_yaml
from moetron.hf import export_checkpoint
from moetron.model import DeepSeekV3

RESULTS = Path(__file__).resolve().parent / "results"


def build_config(args) -> ModelConfig:
    preset = resources.files("moetron.hydra_conf").joinpath("model", "tiny.yaml").read_text()
    cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(preset)))
    cfg.num_nextn_predict_layers = 0  # transformers' DeepseekV3ForCausalLM has no MTP
    if args.hidden:
        cfg.hidden_size = args.hidden
    if args.layers:
        cfg.num_hidden_layers = args.layers
    if args.experts:
        cfg.n_routed_experts = args.experts
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq)
    cfg.validate()
    return cfg


def load_transformers_copy(model: DeepSeekV3, cfg: ModelConfig):
    """The same weights in transformers, through moetron's exporter (checkpoint -> HF dir -> from_pretrained)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        (run / "config.yaml").write_text(to_yaml(MoetronConfig(model=cfg)))
        CheckpointStore(run / "checkpoints").save(0, model_entries(model), {"step": 0, "has_optimizer": False})
        export_checkpoint(run, Path(tmp) / "hf", dtype="fp32")
        return DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32)


def ours_loss(model, tokens, labels):
    return model(tokens, labels).loss


def transformers_loss(model, tokens, labels):
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def train_interleaved(models, batches, warmup, clock=time.perf_counter) -> tuple[list[float], list[list[float]]]:
    """One step of each model in turn, batch after batch, so that both see the same machine load (the CPU may
    be shared). Returns each model's first-step loss and its timed step times."""
    optimizers = []
    for model, _ in models:
        model.train()
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1))
    firsts, times = [None] * len(models), [[] for _ in models]
    for step, (tokens, labels) in enumerate(batches):
        for i, ((model, loss_fn), optimizer) in enumerate(zip(models, optimizers)):
            start = clock()
            loss = loss_fn(model, tokens, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = clock() - start
            if firsts[i] is None:
                firsts[i] = loss.item()
            if step >= warmup:
                times[i].append(elapsed)
    return firsts, times


def profile(name, model, loss_fn, batch) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        loss_fn(model, *batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_fn(model, *batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"--- {name}: top ops by self CPU time (one step)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hidden", type=int, default=0, help="hidden size (0: the tiny preset's 128)")
    parser.add_argument("--layers", type=int, default=0, help="layers (0: the tiny preset's 4)")
    parser.add_argument("--experts", type=int, default=0, help="routed experts (0: the tiny preset's 8)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both models")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a CPU shared with other "
                             "jobs; exact with --threads 1, counts idle-spinning threads otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step each")
    parser.add_argument("--out", default=str(RESULTS / "model_throughput.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    torch.manual_seed(args.seed)
    ours = DeepSeekV3(cfg)
    theirs = load_transformers_copy(ours, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.warmup + args.steps):
        window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        batches.append((window[:, :-1], window[:, 1:]))

    if args.profile:  # on copies, so that the timed runs start from the same weights
        import copy

        profile("moetron", copy.deepcopy(ours), ours_loss, batches[0])
        profile("transformers", copy.deepcopy(theirs), transformers_loss, batches[0])

    (loss_ours, loss_theirs), (t_ours, t_theirs) = train_interleaved(
        [(ours, ours_loss), (theirs, transformers_loss)], batches, args.warmup,
        clock=time.perf_counter if args.clock == "wall" else time.process_time)
    diff = abs(loss_ours - loss_theirs)
    if diff > 1e-4:
        raise SystemExit(f"first-step losses differ: moetron {loss_ours:.6f} vs transformers {loss_theirs:.6f}; "
                         "the comparison would not be apples to apples")

    tokens_per_step = args.batch * args.seq  # per median step: robust to other processes on a shared CPU
    ours_tps = tokens_per_step / statistics.median(t_ours)
    theirs_tps = tokens_per_step / statistics.median(t_theirs)
    import transformers

    results = {
        "ours_tokens_per_s": round(ours_tps, 1),
        "transformers_tokens_per_s": round(theirs_tps, 1),
        "ratio_vs_transformers": round(ours_tps / theirs_tps, 3),
        "ours_step_ms": round(1000 * statistics.median(t_ours), 2),
        "transformers_step_ms": round(1000 * statistics.median(t_theirs), 2),
        "first_loss_ours": loss_ours,
        "first_loss_transformers": loss_theirs,
        "first_loss_abs_diff": diff,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "experts": cfg.n_routed_experts,
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "clock": args.clock,
        "params": sum(p.numel() for p in ours.parameters()),
        "transformers_attn_implementation": theirs.config._attn_implementation,
        "transformers_experts_implementation": getattr(theirs.config, "_experts_implementation", None),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"config: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, experts {cfg.n_routed_experts}, "
          f"seq {args.seq}, batch {args.batch}, {results['params']:,} params, {args.threads} threads, FP32, "
          f"{args.clock} clock")
    print(f"first-step loss: moetron {loss_ours:.6f}, transformers {loss_theirs:.6f} (|diff| {diff:.1e})")
    print(f"moetron:      {ours_tps:10.1f} tokens/s  ({results['ours_step_ms']:.1f} ms/step)")
    print(f"transformers: {theirs_tps:10.1f} tokens/s  ({results['transformers_step_ms']:.1f} ms/step, "
          f"attn={results['transformers_attn_implementation']}, "
          f"experts={results['transformers_experts_implementation']})")
    print(f"wrote {out}")
    print(f"ratio_vs_transformers = {ours_tps / theirs_tps:.2f}")


if __name__ == "__main__":
    main()
