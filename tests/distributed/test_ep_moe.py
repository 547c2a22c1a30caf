"""The MoE layer with expert parallelism equals the single-process MoE (4 gloo processes, 2 nodes x 2).

Every rank runs the reference `MoE` on the concatenated batch of all ranks and its expert-parallel copy (`shard_experts`)
on its own slice. Outputs, input gradients, router / shared-expert gradients (summed over the ranks that
see different tokens) and its own experts' gradients match within 1e-6 in FP32. (Nothing is asserted
bitwise: each expert's GEMM sees other row counts than in the single-process layer, and CPU GEMM kernels
block by the row count, so the last bits may differ on some machines.) Also: the balance loss, node-limited routing
(the rows that cross nodes are one per (token, remote node reached), at most M nodes per token, checked
against the inter-node byte counter), a rank with zero tokens, uneven batches, FP8 dispatch, the bias
update from loads all-reduced over the data-parallel group, and a ProcessMesh with EP inside DP (EP 2
within a node, expert gradients all-reduced over the expert-data-parallel group).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from helpers import small_model_config
from moetron.comm import CommStats, DispatchFormat, world_ep_group
from moetron.parallel.local import run_local
from moetron.parallel.mesh import MeshLayout, ProcessMesh

from moetron.fp8.quant import dequantize_1x128, quantize_1x128
from moetron.model.moe import MoE, run_experts
from moetron.model.moe_ep import ExpertParallelRunner, apply_expert_parallel, shard_experts

SEQ = 3
TIGHT = dict(rtol=1e-6, atol=1e-6)


def build_moe(cfg, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.e_score_correction_bias.normal_(std=0.02)
    return moe


def batches(batch_sizes: list[int], hidden: int, seed: int) -> list[torch.Tensor]:
    return [torch.randn(b, SEQ, hidden, generator=torch.Generator().manual_seed(seed * 100 + r))
            for r, b in enumerate(batch_sizes)]


def sum_over(tensor: torch.Tensor | None, like: torch.Tensor, group=None) -> torch.Tensor:
    t = torch.zeros_like(like) if tensor is None else tensor.clone()
    dist.all_reduce(t, group=group)
    return t


def check_layer(ep, cfg, mode, batch_sizes, seed, dp_group=None, edp_group=None, fp8=False, name=""):
    """dp_group: every rank that sees different tokens (None: the world). edp_group: the replicas of this
    rank's expert block (None: no replicas)."""
    rank = dist.get_rank()
    dp_ranks = dist.get_process_group_ranks(dp_group) if dp_group is not None else list(range(dist.get_world_size()))
    me = dp_ranks.index(rank)
    where = f"{name} {mode} rank {rank}"
    ref = build_moe(cfg, seed).train()
    stats = CommStats()
    layer = shard_experts(copy.deepcopy(ref), ep, mode, fp8_dispatch=fp8, stats=stats).train()
    equal_batches = len(set(batch_sizes)) == 1
    if ref.alpha > 0:  # each rank's balance loss is a mean over its own sequences: DP averaging
        assert equal_batches
        layer.aux_loss_scale = 1.0 / len(dp_ranks)
    xs = batches(batch_sizes, cfg.hidden_size, seed)
    weight = torch.linspace(-1, 1, cfg.hidden_size)

    h_ref = torch.cat(xs).requires_grad_()
    out_ref = ref(h_ref)
    (out_ref * weight).sum().backward()
    h = xs[me].clone().requires_grad_()
    out = layer(h)
    (out * weight).sum().backward()

    lo, hi = sum(batch_sizes[:me]), sum(batch_sizes[: me + 1])
    if fp8:  # the routed experts see the E4M3 (1x128) rows; router and shared expert the original ones
        with torch.no_grad():
            x = xs[me].reshape(-1, cfg.hidden_size)
            want = run_experts(ref.experts, dequantize_1x128(*quantize_1x128(x)), ref.gate(x)) + ref.shared_experts(x)
        assert torch.allclose(out.reshape(-1, cfg.hidden_size), want, rtol=1e-5, atol=1e-6), f"{where}: FP8 output"
        assert torch.isfinite(h.grad).all() and torch.allclose(h.grad, h_ref.grad[lo:hi], rtol=0.1, atol=0.1)
        return
    assert torch.allclose(out, out_ref[lo:hi], **TIGHT), f"{where}: output differs by {(out - out_ref[lo:hi]).abs().max()}"
    assert torch.allclose(h.grad, h_ref.grad[lo:hi], **TIGHT), f"{where}: input gradient differs"
    for name_, p_ref in ref.named_parameters():
        if name_.startswith("experts."):
            continue
        got = sum_over(dict(layer.named_parameters())[name_].grad, p_ref, dp_group)
        assert torch.allclose(got, p_ref.grad, rtol=1e-5, atol=1e-6), (
            f"{where}: {name_} gradient differs by {(got - p_ref.grad).abs().max()}")
    block = slice(layer.expert_offset, layer.expert_offset + layer.experts.gate_up_proj.shape[0])
    for pname in ("gate_up_proj", "down_proj"):
        got = getattr(layer.experts, pname).grad
        if edp_group is not None:
            got = sum_over(got, getattr(layer.experts, pname), edp_group)
        want = getattr(ref.experts, pname).grad[block]
        assert torch.allclose(got, want, **TIGHT), f"{where}: experts.{pname} gradient differs"

    # Loads over every rank that sees different tokens = the reference's load; same bias update.
    load = sum_over(layer.tokens_per_expert, layer.tokens_per_expert, dp_group)
    assert torch.equal(load, ref.tokens_per_expert), f"{where}: load {load} != {ref.tokens_per_expert}"
    ref.update_bias(ref.tokens_per_expert, 0.001)
    layer.update_bias(load, 0.001)
    assert torch.equal(layer.gate.e_score_correction_bias, ref.gate.e_score_correction_bias)
    if ref.alpha > 0:
        bal = sum_over(layer.balance_loss_sum, layer.balance_loss_sum, dp_group) / len(dp_ranks)
        assert torch.allclose(bal, ref.balance_loss_sum, rtol=1e-6), f"{where}: balance loss differs"

    # Node-limited routing: the rows that crossed nodes are exactly one per (token, remote node reached).
    if mode == "two_hop" and ep.num_nodes > 1 and xs[me].shape[0]:
        with torch.no_grad():
            experts = ref.gate(xs[me].reshape(-1, cfg.hidden_size)).experts
        nodes = experts // (cfg.n_routed_experts // ep.num_nodes)
        reached = torch.zeros(nodes.shape[0], ep.num_nodes, dtype=torch.bool).scatter_(1, nodes, True)
        assert int(reached.sum(1).max()) <= cfg.topk_group, f"{where}: a token reaches more than M nodes"
        crossing = int(reached.sum()) - int(reached[:, ep.node].sum())
        width = DispatchFormat(cfg.hidden_size, cfg.num_experts_per_tok, torch.float32).row_bytes
        assert stats.dispatch_inter_bytes == crossing * width, f"{where}: inter-node bytes"


def run_world(ep):
    two_groups = small_model_config(n_group=2, topk_group=1)  # one node per token
    four_groups = small_model_config(n_group=4, topk_group=2, aux_loss_alpha=0.0)
    check_layer(ep, two_groups, "two_hop", [2, 2, 2, 2], seed=1, name="M=1")
    check_layer(ep, two_groups, "flat", [2, 2, 2, 2], seed=2, name="M=1")
    check_layer(ep, four_groups, "two_hop", [3, 0, 1, 5], seed=3, name="uneven, empty rank 1")
    check_layer(ep, four_groups, "flat", [1, 4, 0, 2], seed=4, name="uneven, empty rank 2")
    check_layer(ep, two_groups, "two_hop", [2, 2, 2, 2], seed=5, fp8=True, name="fp8")
    one_rank = small_model_config(n_group=4, topk_group=1, num_experts_per_tok=2, aux_loss_alpha=0.0)  # groups = ranks
    for mode in ("flat", "two_hop"):
        check_layer(ep, one_rank, mode, [2, 1, 3, 2], seed=7, name="one rank per token")


def run_mesh(_ep):
    """EP 2 inside each node, DP 4: the EP groups are {0,1} and {2,3}; experts replicated across them."""
    mesh = ProcessMesh(MeshLayout(dist.get_world_size(), 2, ep=2))
    assert mesh.ep.num_nodes == 1 and mesh.edp_ranks == [mesh.rank % 2, mesh.rank % 2 + 2]
    cfg = small_model_config(n_group=2, topk_group=1, aux_loss_alpha=0.0)
    check_layer(mesh.ep, cfg, "two_hop", [2, 3, 1, 2], seed=6, dp_group=mesh.dp_group,
                edp_group=mesh.edp_group, name="mesh ep=2")
    # apply_expert_parallel swaps every MoE of a model for its EP version
    model = torch.nn.Sequential(build_moe(cfg))
    apply_expert_parallel(model, mesh.ep)
    assert isinstance(model[0].expert_runner, ExpertParallelRunner) and model[0].experts.gate_up_proj.shape[0] == 4


def run_jobs(rank: int, world: int, jobs: list[str]) -> None:
    ep = world_ep_group(ranks_per_node=2)
    for job in jobs:
        {"world": run_world, "mesh": run_mesh}[job](ep)


def spawn(world: int, jobs: list[str], timeout: float) -> None:
    run_local(run_jobs, world, args=(jobs,), timeout=timeout)


def test_ep_moe_matches_single_process():
    spawn(4, ["world", "mesh"], timeout=120)
