"""Bytes each rank sends per optimizer step for the data-parallel sync: before and after issue 13.

Four gloo ranks hold the same parameters (a DeepSeekV3 of --hidden / --layers, every tensor replicated over
DP 4) and run one step's gradient sync and parameter update two ways, measured in bytes each process writes
to its sockets (/proc/self/io `wchar`: gloo moves every byte through write(2)/writev(2); nothing else writes
during the measured region):

  before  the trainer of main before issue 13: FP32 gradients all-reduced, each parameter's owner (whole
          parameters, greedy by size) updates it and broadcasts the new FP32 values;
  after   train/zero.py: FP32 gradient buckets reduce-scattered to the shard owners (a ring of point-to-point
          sends on gloo, whose own reduce_scatter is an all-reduce), each member updates its shard, and the
          shards are all-gathered in the parameters' dtype (FP32, or BF16 with train.param_dtype=bf16).

A ring all-reduce sends 2 (n-1)/n x 4 bytes per element, a reduce-scatter (n-1)/n x 4, an all-gather (n-1)/n x
the parameter's bytes; a broadcast from the owners sends about (n-1)/n x 4 per element on average. So the
expected ratios after / before are 8/12 = 2/3 with FP32 parameters and 6/12 = 1/2 with BF16 parameters.

    .venv/bin/python benchmarks/zero_bytes.py            # writes benchmarks/results/zero_bytes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from moetron.parallel.local import run_local

from moetron.config import ModelConfig, OptimConfig
from moetron.model import DeepSeekV3
from moetron.train.zero import ShardGroup, ZeroAdamW

WORLD = 4
RESULTS = Path(__file__).resolve().parent / "results" / "zero_bytes.json"


def written() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def model_config(hidden: int, layers: int) -> ModelConfig:
    cfg = ModelConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=hidden // 2,
                      kv_lora_rank=hidden // 4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=hidden,
                      num_experts_per_tok=2, n_group=1, topk_group=1, num_nextn_predict_layers=1)
    cfg.validate()
    return cfg


def owners(params: list[torch.Tensor], members: int) -> list[int]:
    """The old partition: whole parameters, greedy by size."""
    load, owner = [0] * members, [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        r = min(range(members), key=lambda j: (load[j], j))
        owner[i], load[r] = r, load[r] + params[i].numel()
    return owner


def before(params: list[torch.nn.Parameter], rank: int) -> None:
    """All-reduce of the FP32 gradients, then each owner broadcasts its (updated) FP32 parameters."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    owner = owners(params, WORLD)
    for member in range(WORLD):
        mine = [p for p, o in zip(params, owner) if o == member]
        if mine:
            dist.broadcast(torch.cat([p.detach().reshape(-1) for p in mine]), src=member)


def after(optimizer: ZeroAdamW) -> None:
    optimizer.reduce_gradients(WORLD)
    optimizer.step()


def _rank(rank: int, world: int, cfg: ModelConfig, out: str) -> None:
    torch.manual_seed(0)
    results = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = DeepSeekV3(cfg, seed=0).to(dtype)
        params = list(model.named_parameters())
        group = ShardGroup(list(range(world)), dist.group.WORLD, params)
        optimizer = ZeroAdamW([group], OptimConfig(), rank)
        numel = sum(p.numel() for _, p in params)
        for _, p in params:
            p.grad = torch.randn_like(p, dtype=torch.float32) if dtype == torch.float32 else None
            p.main_grad.normal_()
        if dtype == torch.float32:
            dist.barrier()
            start = written()
            before([p for _, p in params], rank)
            results["before_fp32"] = written() - start
        dist.barrier()
        start = written()
        after(optimizer)
        results[f"after_{dtype_name}"] = written() - start
        results["params"] = numel
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    cfg = model_config(args.hidden, args.layers)
    tmp = RESULTS.with_suffix(".tmp")
    run_local(_rank, WORLD, (cfg, str(tmp)), timeout=600)
    per_rank = json.loads(tmp.read_text())
    tmp.unlink()
    params = per_rank[0]["params"]
    out = {"world": WORLD, "params": params, "hidden": args.hidden, "layers": args.layers, "backend": "gloo",
           "measure": "bytes written to sockets per rank (/proc/self/io wchar) for one step's sync"}
    for kind in ("before_fp32", "after_fp32", "after_bf16"):
        values = [r[kind] for r in per_rank]
        out[f"{kind}_bytes_per_rank"] = values
        out[f"{kind}_bytes_mean"] = sum(values) / len(values)
        out[f"{kind}_bytes_per_param"] = sum(values) / len(values) / params
    out["ratio_fp32_params"] = out["after_fp32_bytes_mean"] / out["before_fp32_bytes_mean"]
    out["ratio_bf16_params"] = out["after_bf16_bytes_mean"] / out["before_fp32_bytes_mean"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    for kind in ("before_fp32", "after_fp32", "after_bf16"):
        print(f"{kind:<12} {out[f'{kind}_bytes_mean'] / 1e6:9.2f} MB per rank "
              f"({out[f'{kind}_bytes_per_param']:.2f} bytes per parameter)")
    print(f"after / before: {out['ratio_fp32_params']:.3f} with FP32 parameters (expected 2/3), "
          f"{out['ratio_bf16_params']:.3f} with BF16 parameters (expected 1/2)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
