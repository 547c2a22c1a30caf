"""Expert-parallel dispatch/combine over gloo: 4 processes as 2 nodes x 2 ranks (and 8 as 4 x 2).

Every rank builds every rank's inputs from a seed, so it knows exactly which rows it must receive. Rows
are rank-tagged (column 0 = source rank, column 1 = source row, the rest small integers), so each
received row proves where it came from. Checked for flat and two-hop: received rows, their order, gates,
local ids and per-expert counts; the hops' splits; the byte counters (intra / inter node) against counts
made from the routing; dispatch -> combine with gates 1/K is the identity (bitwise); outputs and gradients
of a plain nn.Linear expert list equal a single-process computation; async handles; FP8 payloads; BF16
combine; no token crosses more than M nodes; zero tokens on a rank; all tokens on one expert; heavily
uneven loads. No moetron.model import: the dispatcher works on plain modules.
"""

from __future__ import annotations

import sys

import torch
from moetron.comm import (
    CommStats,
    Dispatcher,
    DispatchFormat,
    new_ep_groups,
    run_local_experts,
    world_ep_group,
)
from moetron.parallel.local import run_local
from torch import nn

from moetron.fp8.quant import dequantize_1x128, quantize_1x128

HIDDEN, TOP_K = 8, 4


# ---- inputs every rank can rebuild ----------------------------------------------------------------------
def routing_for(scores: torch.Tensor, num_nodes: int, max_nodes: int, top_k: int):
    """Node-limited top-k on [T, E] scores: keep the max_nodes nodes with the best top-(K/M) sums."""
    tokens, experts = scores.shape
    if max_nodes < num_nodes:
        grouped = scores.view(tokens, num_nodes, experts // num_nodes)
        best = grouped.topk(top_k // max_nodes, -1).values.sum(-1).topk(max_nodes, -1).indices
        keep = torch.zeros(tokens, num_nodes, dtype=torch.bool).scatter_(1, best, True)
        scores = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)
    return scores.topk(top_k, -1).indices


def make_inputs(case: dict, src: int, num_nodes: int):
    g = torch.Generator().manual_seed(1000 * case["seed"] + src)
    tokens = case["tokens"](src)
    x = torch.randint(-40, 40, (tokens, HIDDEN), generator=g).float()
    x[:, 0], x[:, 1] = src, torch.arange(tokens)
    scores = torch.rand(tokens, case["experts"], generator=g) + case.get("skew", 0.0) * torch.linspace(
        1, 0, case["experts"])
    if "boost" in case:  # every token picks this expert
        scores[:, case["boost"]] += 10.0
    ids = routing_for(scores, num_nodes, case["max_nodes"], case["top_k"])
    gates = torch.rand(tokens, case["top_k"], generator=g) + 0.1
    return x, ids, gates


def all_inputs(case, world, num_nodes):
    return [make_inputs(case, s, num_nodes) for s in range(world)]


# ---- checks -----------------------------------------------------------------------------------------------
def check_layout(ep, case, mode, fp8=False):
    world, rank = ep.size, ep.rank
    per_rank = case["experts"] // world
    inputs = all_inputs(case, world, ep.num_nodes)
    x, ids, gates = inputs[rank]
    stats = CommStats()
    disp = Dispatcher(ep, case["experts"], mode, fp8=fp8, stats=stats)
    d = disp.dispatch(x, ids, gates)
    where = f"{case['name']} {mode} fp8={fp8} rank {rank}"

    # Expected rows: every (source, row) with an expert on this rank, by source rank then row.
    exp_x, exp_g, exp_ids, exp_src = [], [], [], []
    for src, (xs, is_, gs) in enumerate(inputs):
        mine = (is_ // per_rank) == rank
        rows = mine.any(1).nonzero().flatten()
        xs_sent = dequantize_1x128(*quantize_1x128(xs)) if fp8 else xs
        exp_x.append(xs_sent[rows])
        exp_g.append(torch.where(mine[rows], gs[rows], 0.0))
        exp_ids.append(torch.where(mine[rows], is_[rows] - rank * per_rank, -1))
        exp_src.append(torch.stack([torch.full_like(rows, src), rows], 1))
    exp_x, exp_g, exp_ids, exp_src = map(torch.cat, (exp_x, exp_g, exp_ids, exp_src))
    assert torch.equal(d.source, exp_src), f"{where}: received rows {d.source.tolist()} != {exp_src.tolist()}"
    if not fp8:  # the tags themselves prove the origin of every row
        assert torch.equal(d.x[:, :2].long(), exp_src), f"{where}: row tags differ from the sources"
    assert torch.equal(d.x, exp_x), f"{where}: received payload differs"
    assert torch.equal(d.gates, exp_g), f"{where}: gates differ"
    assert torch.equal(d.expert_ids, exp_ids), f"{where}: local expert ids differ"
    counts = torch.bincount(exp_ids[exp_ids >= 0], minlength=per_rank)
    assert torch.equal(d.tokens_per_expert, counts), f"{where}: counts {d.tokens_per_expert} != {counts}"

    # Hop splits and byte counters, from the routing alone.
    width = disp_row_bytes(case, fp8)
    dest_rank = ids // per_rank
    if mode == "flat":
        per_rank_tokens = [int((dest_rank == p).any(1).sum()) for p in range(world)]
        assert d.route.hops[0].send_splits == per_rank_tokens, f"{where}: flat splits"
        inter = sum(n for p, n in enumerate(per_rank_tokens) if ep.node_of(p) != ep.node) * width
        intra = sum(n for p, n in enumerate(per_rank_tokens) if p != rank and ep.node_of(p) == ep.node) * width
    else:
        dest_node = dest_rank // ep.local_size
        per_node = [int((dest_node == n).any(1).sum()) for n in range(ep.num_nodes)]
        assert d.route.hops[0].send_splits == per_node, f"{where}: rail splits {d.route.hops[0].send_splits}"
        inter = sum(n for node, n in enumerate(per_node) if node != ep.node) * width
        # second hop: rows the rail delivered here, forwarded to the other local ranks holding their experts
        intra = 0
        for src, (_, is_, _) in enumerate(inputs):
            if src % ep.local_size != ep.local:
                continue
            for p in ep.intra_ranks():
                if p != rank:
                    intra += int(((is_ // per_rank) == p).any(1).sum()) * width
        nodes_per_token = torch.bincount(d.route.hops[0].send_index, minlength=x.shape[0])
        most = int(nodes_per_token.max()) if nodes_per_token.numel() else 0
        assert most <= case["max_nodes"], f"{where}: a token crossed {most} > M = {case['max_nodes']} nodes"
    assert (stats.dispatch_inter_bytes, stats.dispatch_intra_bytes) == (inter, intra), (
        f"{where}: bytes inter/intra {stats.dispatch_inter_bytes}/{stats.dispatch_intra_bytes} != {inter}/{intra}")

    # Dispatch -> combine with gates 1/K and identity experts is the identity, bitwise.
    ones = torch.full_like(gates, 1.0 / case["top_k"])
    d1 = disp.dispatch(x, ids, ones)
    back = disp.combine(run_local_experts(nn.ModuleList([nn.Identity()] * per_rank), d1.x, d1.expert_ids,
                                          d1.gates), d1)
    sent = dequantize_1x128(*quantize_1x128(x)) if fp8 else x
    assert torch.equal(back, sent), f"{where}: dispatch -> combine is not the identity"
    return stats


def disp_row_bytes(case, fp8):
    return DispatchFormat(HIDDEN, case["top_k"], torch.float32, fp8).row_bytes


def make_experts(num, seed=5):
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(num)])


def reference(case, inputs, experts_all, fp8=False):
    """Single process: out = sum_k g_k expert_{e_k}(x) over the concatenated batch, with gradients.
    With fp8 the experts see the quantized rows and the gradient passes straight through to x."""
    x = torch.cat([i[0] for i in inputs])
    x = (dequantize_1x128(*quantize_1x128(x)) if fp8 else x).requires_grad_()
    ids = torch.cat([i[1] for i in inputs])
    gates = torch.cat([i[2] for i in inputs]).requires_grad_()
    out = torch.zeros_like(x)
    for k in range(ids.shape[1]):
        ys = torch.stack([experts_all[int(e)](x[t]) for t, e in enumerate(ids[:, k])]) if x.shape[0] else x
        out = out + gates[:, k : k + 1] * ys
    loss_w = torch.linspace(-1, 1, HIDDEN)
    (out * loss_w).sum().backward()
    return out.detach(), x.grad, gates.grad, [e.weight.grad for e in experts_all]


def check_gradients(ep, case, mode, use_async=False, fp8=False, combine_dtype=None):
    world, rank = ep.size, ep.rank
    per_rank = case["experts"] // world
    inputs = all_inputs(case, world, ep.num_nodes)
    all_experts = make_experts(case["experts"])
    ref_out, ref_gx, ref_gg, ref_gw = reference(case, inputs, all_experts, fp8)
    mine = make_experts(case["experts"])[rank * per_rank:(rank + 1) * per_rank]
    x, ids, gates = inputs[rank]
    x, gates = x.clone().requires_grad_(), gates.clone().requires_grad_()
    disp = Dispatcher(ep, case["experts"], mode, fp8=fp8, combine_dtype=combine_dtype)
    if use_async:
        pending = disp.dispatch_async(x, ids, gates)
        busy = torch.randn(64, 64) @ torch.randn(64, 64)  # overlapped compute
        d = pending.wait()
        y = run_local_experts(mine, d.x, d.expert_ids, d.gates)
        pending_c = disp.combine_async(y, d)
        busy = busy @ busy
        out = pending_c.wait()
    else:
        d = disp.dispatch(x, ids, gates)
        out = disp.combine(run_local_experts(mine, d.x, d.expert_ids, d.gates), d)
    (out * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    lo = sum(inputs[s][0].shape[0] for s in range(rank))
    hi = lo + x.shape[0]
    where = f"{case['name']} {mode} async={use_async} fp8={fp8} rank {rank}"
    tol = dict(rtol=1e-2, atol=1.0) if combine_dtype is torch.bfloat16 else dict(rtol=1e-6, atol=1e-5)
    assert torch.allclose(out, ref_out[lo:hi], **tol), f"{where}: output differs by {(out - ref_out[lo:hi]).abs().max()}"
    assert torch.allclose(x.grad, ref_gx[lo:hi], rtol=1e-6, atol=1e-5), f"{where}: input gradient differs"
    gtol = dict(rtol=1e-6, atol=1e-4)
    assert torch.allclose(gates.grad, ref_gg[lo:hi], **gtol), f"{where}: gate gradient differs"
    for j, expert in enumerate(mine):
        ref, got = ref_gw[rank * per_rank + j], expert.weight.grad
        ref = torch.zeros_like(expert.weight) if ref is None else ref  # an expert nobody picked
        got = torch.zeros_like(expert.weight) if got is None else got
        assert torch.allclose(got, ref, **gtol), f"{where}: expert {j} weight gradient differs"


def check_two_in_flight(ep, mode):
    """Two micro-batches' dispatches and combines in flight at once (as F&B overlap does) give the same
    rows and outputs as one at a time."""
    case_a, case_b = CASES["two_nodes_per_token"], CASES["uneven"]
    world, rank = ep.size, ep.rank
    per_rank = case_a["experts"] // world
    experts = make_experts(per_rank)
    (xa, ia, ga), (xb, ib, gb) = make_inputs(case_a, rank, ep.num_nodes), make_inputs(case_b, rank, ep.num_nodes)
    disp = Dispatcher(ep, case_a["experts"], mode)
    want_a = disp.combine(run_local_experts(experts, *_fields(disp.dispatch(xa, ia, ga))), disp.dispatch(xa, ia, ga))
    da_ref, db_ref = disp.dispatch(xa, ia, ga), disp.dispatch(xb, ib, gb)
    want_b = disp.combine(run_local_experts(experts, *_fields(db_ref)), db_ref)
    pa, pb = disp.dispatch_async(xa, ia, ga), disp.dispatch_async(xb, ib, gb)
    da, db = pa.wait(), pb.wait()
    assert torch.equal(da.x, da_ref.x) and torch.equal(db.x, db_ref.x), f"{mode} rank {rank}: rows differ in flight"
    ca = disp.combine_async(run_local_experts(experts, *_fields(da)), da)
    cb = disp.combine_async(run_local_experts(experts, *_fields(db)), db)
    got_b, got_a = cb.wait(), ca.wait()
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b), f"{mode} rank {rank}: outputs differ in flight"


def _fields(d):
    return d.x, d.expert_ids, d.gates


# ---- cases ----------------------------------------------------------------------------------------------
BASE = dict(seed=1, experts=8, top_k=TOP_K, max_nodes=1, tokens=lambda src: 6 + 3 * src, name="base")
CASES = {
    "base": BASE,
    "two_nodes_per_token": dict(BASE, seed=2, max_nodes=2, name="M=2"),
    "empty_rank": dict(BASE, seed=3, max_nodes=2, tokens=lambda src: 0 if src == 1 else 5, name="empty rank 1"),
    "uneven": dict(BASE, seed=4, max_nodes=2, skew=4.0, tokens=lambda src: 40 if src == 0 else 1 + src % 2,
                   name="uneven"),
    "one_expert": dict(BASE, seed=5, max_nodes=2, boost=0, tokens=lambda src: 7, name="all pick expert 0"),
    "top1_one_expert": dict(BASE, seed=6, top_k=1, boost=5, tokens=lambda src: 5, name="top-1, all on expert 5"),
}


def run_four(ep):
    for case in CASES.values():
        for mode in ("flat", "two_hop"):
            check_layout(ep, case, mode)
        check_gradients(ep, case, "two_hop")
    check_layout(ep, CASES["two_nodes_per_token"], "two_hop", fp8=True)
    check_layout(ep, CASES["uneven"], "flat", fp8=True)
    check_gradients(ep, CASES["base"], "flat")
    check_gradients(ep, CASES["two_nodes_per_token"], "flat", use_async=True)
    check_gradients(ep, CASES["two_nodes_per_token"], "two_hop", use_async=True)
    check_gradients(ep, CASES["two_nodes_per_token"], "two_hop", fp8=True)
    check_gradients(ep, CASES["base"], "two_hop", combine_dtype=torch.bfloat16)
    for mode in ("flat", "two_hop"):
        check_two_in_flight(ep, mode)


def run_eight(ep):
    case = dict(BASE, seed=7, experts=16, max_nodes=2, tokens=lambda src: 4 + src, name="8 ranks")
    for mode in ("flat", "two_hop"):
        check_layout(ep, case, mode)
    check_gradients(ep, case, "two_hop")
    check_layout(ep, dict(case, tokens=lambda src: 0 if src % 3 == 0 else 9, name="8 ranks, empty"), "two_hop")
    # the same 8 ranks as 8 nodes of one rank: two-hop degenerates to the rail hop alone
    one_per_node = new_ep_groups([list(range(8))], ranks_per_node=1)
    assert (one_per_node.num_nodes, one_per_node.intra) == (8, None)
    for mode in ("flat", "two_hop"):
        check_layout(one_per_node, dict(case, max_nodes=2, name="8 nodes x 1"), mode)


# ---- spawning ---------------------------------------------------------------------------------------------
def run_job(rank: int, world: int, ranks_per_node: int, job: str) -> None:
    assert "moetron.model" not in sys.modules, "the dispatcher must not need moetron.model"
    ep = world_ep_group(ranks_per_node)
    {"four": run_four, "eight": run_eight}[job](ep)


def spawn(world: int, ranks_per_node: int, job: str, timeout: float) -> None:
    run_local(run_job, world, args=(ranks_per_node, job), timeout=timeout)


def test_dispatch_two_nodes_of_two():
    spawn(4, 2, "four", timeout=120)


def test_dispatch_four_nodes_of_two():
    spawn(8, 2, "eight", timeout=120)
