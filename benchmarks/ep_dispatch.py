"""How many bytes cross nodes per token in expert-parallel dispatch, and what does two-hop save?

V3 routing (arXiv 2412.19437 §2.1.2, §3.2): experts in G groups = nodes, each token keeps the M nodes with the best
top-(K/M) score sums and takes its top-K experts there. Three ways to move a token:
  naive    one copy per selected expert (K rows, minus those on the home node)
  flat     one copy per destination RANK (per-rank dedup, one all-to-all)
  two_hop  one copy per destination NODE across nodes (to the rail peer), then inside the node
Spawns nodes x ranks_per_node gloo processes on this machine (simulated nodes), runs the real
Dispatcher in both modes on a synthetic batch, reads its byte counters, and times dispatch + combine.
The same routing is also counted at the full V3 layout (8 nodes x 8 ranks, 256 experts, H = 7168,
FP8 payload) without processes.

Writes benchmarks/results/ep_dispatch.json, a flat JSON object:
  nodes, ranks_per_node, experts, top_k, max_nodes, tokens_per_rank, hidden, fp8, iters   the configuration
  row_bytes                                   bytes of one dispatched row (payload + gates, ids, origin)
  <m>_internode_bytes_per_token               dispatch bytes across nodes / tokens, m in naive, flat, two_hop
  <m>_intranode_bytes_per_token               dispatch bytes inside nodes / tokens (flat, two_hop)
  two_hop_internode_vs_naive                  two_hop / naive inter-node bytes (near M/K or below: a token reaches <= M
                                              nodes and takes K/M experts per node on average)
  flat_internode_vs_naive                     flat / naive
  bound_m_over_k                              M / K
  nodes_per_token_mean, experts_per_remote_node_mean    routing statistics
  <m>_dispatch_ms, <m>_combine_ms             median wall time per call on gloo (max over ranks), flat and two_hop
  v3_<m>_internode_bytes_per_token            the same counts at the full V3 layout (naive, flat, two_hop)
  v3_two_hop_internode_vs_naive
and benchmarks/results/ep_dispatch.png (inter-node bytes per token per mode, both layouts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from moetron.comm import CommStats, Dispatcher, DispatchFormat, run_local_experts, world_ep_group
from moetron.parallel.local import run_local

RESULTS = Path(__file__).resolve().parent / "results"


def v3_routing(tokens: int, experts: int, groups: int, max_groups: int, top_k: int, seed: int) -> torch.Tensor:
    """Sigmoid affinities of random tokens against random centroids, group-limited top-K (as the Router)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.sigmoid(torch.randn(tokens, 64, generator=g) @ torch.randn(64, experts, generator=g) / 8)
    grouped = scores.view(tokens, groups, experts // groups)
    kept = grouped.topk(top_k // max_groups, -1).values.sum(-1).topk(max_groups, -1).indices
    mask = torch.zeros(tokens, groups, dtype=torch.bool).scatter_(1, kept, True)
    return grouped.masked_fill(~mask[..., None], float("-inf")).view(tokens, experts).topk(top_k, -1).indices


def count_rows(ids: torch.Tensor, home_rank: int, experts: int, nodes: int, ranks_per_node: int) -> dict:
    """Rows that leave the home node, per mode, and routing statistics, for one rank's tokens."""
    per_rank = experts // (nodes * ranks_per_node)
    rank = ids // per_rank
    node = rank // ranks_per_node
    home = home_rank // ranks_per_node

    def distinct(t, size):
        return torch.zeros(t.shape[0], size, dtype=torch.bool).scatter_(1, t, True)

    nodes_hit, ranks_hit = distinct(node, nodes), distinct(rank, nodes * ranks_per_node)
    remote_ranks = ranks_hit.clone().view(-1, nodes, ranks_per_node)
    remote_ranks[:, home] = False
    remote_nodes = nodes_hit.clone()
    remote_nodes[:, home] = False
    return dict(naive=int((node != home).sum()), flat=int(remote_ranks.sum()), two_hop=int(remote_nodes.sum()),
                nodes=int(nodes_hit.sum()), remote_experts=int((node != home).sum()))


def worker(rank: int, world: int, args, out_path: str) -> None:
    ep = world_ep_group(args.ranks_per_node)
    ids = v3_routing(args.tokens, args.experts, args.nodes, args.max_nodes, args.top_k, seed=rank)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(100 + rank))
    gates = torch.full(ids.shape, 1.0 / args.top_k)
    per_rank = args.experts // world
    experts = torch.nn.ModuleList([torch.nn.Identity()] * per_rank)
    result: dict = {}
    for mode in ("flat", "two_hop"):
        stats = CommStats()
        disp = Dispatcher(ep, args.experts, mode, fp8=args.fp8, stats=stats)
        times_d, times_c = [], []
        for it in range(args.iters + 1):  # the first call is a warm-up
            dist.barrier()
            t0 = time.perf_counter()
            d = disp.dispatch(x, ids, gates)
            t1 = time.perf_counter()
            y = run_local_experts(experts, d.x, d.expert_ids, d.gates, per_rank)
            dist.barrier()
            t2 = time.perf_counter()
            disp.combine(y, d)
            t3 = time.perf_counter()
            if it == 0:
                counters = torch.tensor([stats.dispatch_inter_bytes, stats.dispatch_intra_bytes], dtype=torch.float64)
                dist.all_reduce(counters)
                result[f"{mode}_bytes"] = counters.tolist()
            spent = torch.tensor([t1 - t0, t3 - t2], dtype=torch.float64)
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
            if it:
                times_d.append(spent[0].item())
                times_c.append(spent[1].item())
        result[f"{mode}_dispatch_ms"] = 1e3 * statistics.median(times_d)
        result[f"{mode}_combine_ms"] = 1e3 * statistics.median(times_c)
    rows = count_rows(ids, rank, args.experts, args.nodes, args.ranks_per_node)
    counts = torch.tensor([rows[k] for k in ("naive", "flat", "two_hop", "nodes", "remote_experts")],
                          dtype=torch.float64)
    dist.all_reduce(counts)
    result["rows"] = counts.tolist()
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.barrier()


def v3_layout_counts(args) -> dict:
    """The same routing at the full V3 layout, counted without processes: 8 nodes x 8 ranks."""
    nodes, rpn, experts, hidden = 8, 8, 256, 7168
    width = DispatchFormat(hidden, args.top_k, torch.bfloat16, fp8=True).row_bytes
    total = dict(naive=0, flat=0, two_hop=0)
    tokens = 0
    for home in range(0, nodes * rpn, 7):  # a sample of home ranks across nodes and local indices
        ids = v3_routing(args.tokens, experts, nodes, args.max_nodes, args.top_k, seed=1000 + home)
        rows = count_rows(ids, home, experts, nodes, rpn)
        for k in total:
            total[k] += rows[k]
        tokens += args.tokens
    out = {f"v3_{k}_internode_bytes_per_token": v * width / tokens for k, v in total.items()}
    out["v3_row_bytes"] = width
    out["v3_two_hop_internode_vs_naive"] = total["two_hop"] / total["naive"]
    out["v3_flat_internode_vs_naive"] = total["flat"] / total["naive"]
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["naive", "flat", "two_hop"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, prefix, title in [
        (axes[0], "", f"gloo run: {out['nodes']} nodes x {out['ranks_per_node']}, H={out['hidden']}"),
        (axes[1], "v3_", "V3 layout: 8 nodes x 8, H=7168, FP8"),
    ]:
        values = [out[f"{prefix}{m}_internode_bytes_per_token"] for m in modes]
        bars = ax.bar(["naive\n(per expert)", "flat\n(per rank)", "two-hop\n(per node)"], values,
                      color=["#bbbbbb", "#6699cc", "#cc6633"])
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v / values[0]:.2f}x", ha="center", va="bottom")
        ax.set_ylim(0, 1.15 * max(values))
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("inter-node dispatch bytes / token")
    fig.suptitle(f"Node-limited routing, K={out['top_k']}, M={out['max_nodes']}: bound M/K = {out['bound_m_over_k']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8, help="simulated nodes = expert groups G")
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=4, help="M: nodes a token may reach")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(RESULTS / "ep_dispatch.json"))
    args = parser.parse_args(argv)
    world = args.nodes * args.ranks_per_node
    if args.experts % world or args.experts % args.nodes or args.top_k % args.max_nodes:
        parser.error("experts must divide by nodes x ranks_per_node, and top-k by max-nodes")

    raw_path = Path(args.out).with_suffix(".raw.json")
    try:
        run_local(worker, world, args=(args, str(raw_path)), timeout=args.timeout)
    except TimeoutError as err:
        sys.exit(f"ep_dispatch: {err}")
    raw = json.loads(raw_path.read_text())
    raw_path.unlink()

    width = DispatchFormat(args.hidden, args.top_k, torch.float32, args.fp8).row_bytes
    tokens = world * args.tokens
    naive, flat_rows, two_rows, nodes_hit, remote_experts = raw["rows"]
    out = dict(nodes=args.nodes, ranks_per_node=args.ranks_per_node, experts=args.experts, top_k=args.top_k,
               max_nodes=args.max_nodes, tokens_per_rank=args.tokens, hidden=args.hidden, fp8=args.fp8,
               iters=args.iters, row_bytes=width)
    out["naive_internode_bytes_per_token"] = naive * width / tokens
    for mode in ("flat", "two_hop"):
        inter, intra = raw[f"{mode}_bytes"]
        out[f"{mode}_internode_bytes_per_token"] = inter / tokens
        out[f"{mode}_intranode_bytes_per_token"] = intra / tokens
        out[f"{mode}_dispatch_ms"] = raw[f"{mode}_dispatch_ms"]
        out[f"{mode}_combine_ms"] = raw[f"{mode}_combine_ms"]
    # the counters must agree with rows counted from the routing
    assert out["flat_internode_bytes_per_token"] == flat_rows * width / tokens
    assert out["two_hop_internode_bytes_per_token"] == two_rows * width / tokens
    out["two_hop_internode_vs_naive"] = two_rows / naive
    out["flat_internode_vs_naive"] = flat_rows / naive
    out["bound_m_over_k"] = args.max_nodes / args.top_k
    out["nodes_per_token_mean"] = nodes_hit / tokens
    out["experts_per_remote_node_mean"] = remote_experts / two_rows
    out.update(v3_layout_counts(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(args.out).with_suffix(".png"))

    print(f"ep dispatch: {args.nodes} nodes x {args.ranks_per_node} ranks, {args.experts} experts, K={args.top_k}, "
          f"M={args.max_nodes}, {args.tokens} tokens/rank, H={args.hidden}, fp8={args.fp8}, row {width} B")
    print(f"{'mode':<9}{'inter B/tok':>12}{'intra B/tok':>12}{'dispatch ms':>13}{'combine ms':>12}")
    print(f"{'naive':<9}{out['naive_internode_bytes_per_token']:>12.0f}")
    for mode in ("flat", "two_hop"):
        print(f"{mode:<9}{out[f'{mode}_internode_bytes_per_token']:>12.0f}{out[f'{mode}_intranode_bytes_per_token']:>12.0f}"
              f"{out[f'{mode}_dispatch_ms']:>13.2f}{out[f'{mode}_combine_ms']:>12.2f}")
    print(f"V3 layout (8x8, H=7168, FP8): naive {out['v3_naive_internode_bytes_per_token']:.0f}, "
          f"flat {out['v3_flat_internode_bytes_per_token']:.0f}, two-hop {out['v3_two_hop_internode_bytes_per_token']:.0f} "
          f"B/token; two-hop/naive {out['v3_two_hop_internode_vs_naive']:.3f}")
    print(f"two_hop_internode_vs_naive {out['two_hop_internode_vs_naive']:.3f} (bound M/K = {out['bound_m_over_k']}) "
          f"-> {args.out}")
    return out


if __name__ == "__main__":
    main()
