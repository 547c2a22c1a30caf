"""DeepSeekMoE against explicit per-token references of arXiv 2412.19437 §2.1.2."""

import pytest
import torch
import torch.nn.functional as F
from helpers import small_model_config

from moetron.model import grouped_gemm
from moetron.model.moe import MoE, Router, max_violation, run_experts, sequence_balance_loss


def reference_route(scores, bias, top_k, n_group, topk_group, scaling):
    """Per token, in plain Python: group score = sum of top K/M biased scores; keep M groups; top-K."""
    tokens, experts = scores.shape
    per_group = experts // n_group
    ids, gates = [], []
    for t in range(tokens):
        biased = (scores[t] + bias).tolist()
        group_scores = []
        for g in range(n_group):
            members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
            group_scores.append(sum(members[: top_k // topk_group]))
        kept = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group]
        allowed = [e for e in range(experts) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:top_k]
        raw = [scores[t, e].item() for e in chosen]
        ids.append(sorted(chosen))
        gates.append({e: scaling * r / sum(raw) for e, r in zip(chosen, raw)})
    return ids, gates


def test_router_matches_reference_with_bias_and_groups():
    torch.manual_seed(0)
    cfg = small_model_config()
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.1)
    x = torch.randn(40, cfg.hidden_size)
    routing = router(x)
    ids, gates = reference_route(routing.scores, router.e_score_correction_bias, cfg.num_experts_per_tok,
                                 cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor)
    for t in range(x.shape[0]):
        assert sorted(routing.experts[t].tolist()) == ids[t]
        for k, e in enumerate(routing.experts[t].tolist()):
            assert routing.gates[t, k].item() == pytest.approx(gates[t][e], rel=1e-5)
    assert torch.allclose(routing.gates.sum(-1), torch.full((40,), cfg.routed_scaling_factor))


def test_node_limited_routing_reaches_at_most_m_groups():
    torch.manual_seed(1)
    cfg = small_model_config(n_routed_experts=16, n_group=8, topk_group=2, num_experts_per_tok=4)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    routing = router(torch.randn(500, cfg.hidden_size))
    groups = routing.experts // (cfg.n_routed_experts // cfg.n_group)
    groups_per_token = torch.tensor([len(set(row.tolist())) for row in groups])
    assert groups_per_token.max().item() <= cfg.topk_group
    assert (groups_per_token == cfg.topk_group).any()  # the limit is reached, not trivially satisfied


def test_bias_steers_selection_but_not_gate_values():
    torch.manual_seed(2)
    cfg = small_model_config(n_group=1, topk_group=1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(30, cfg.hidden_size)
    router.e_score_correction_bias[5] = 10.0  # expert 5 always wins selection
    routing = router(x)
    assert (routing.experts == 5).any(-1).all()
    raw = routing.scores.gather(1, routing.experts)
    assert torch.allclose(routing.gates, raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_experts_match_dense_per_token_reference_without_dropping():
    torch.manual_seed(3)
    cfg = small_model_config()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(25, cfg.hidden_size)
    routing = moe.gate(x)
    out = run_experts(moe.experts, x, routing)
    w_gate_up, w_down = moe.experts.gate_up_proj, moe.experts.down_proj
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            e = routing.experts[t, k]
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            expected[t] += routing.gates[t, k] * (w_down[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_grouped_gemm_equals_loop_fallback_forward_and_backward(monkeypatch):
    torch.manual_seed(4)
    weight = torch.randn(5, 12, 8, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 1, 0])  # empty experts included
    x = torch.randn(11, 8, requires_grad=True)
    results = []
    for supported in (True, False):
        monkeypatch.setattr(grouped_gemm, "_grouped_mm_supported", lambda _x, s=supported: s)
        y = grouped_gemm.grouped_linear(x, weight, counts)
        y.sum().backward()  # a broadcast gradient: the case the CPU kernel needs made contiguous
        results.append((y.detach(), x.grad.clone(), weight.grad.clone()))
        x.grad, weight.grad = None, None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sequence_balance_loss_matches_formula():
    torch.manual_seed(5)
    batch, seq, experts, top_k, alpha = 3, 10, 8, 2, 0.01
    scores = torch.rand(batch, seq, experts)
    chosen = torch.stack([torch.randperm(experts)[:top_k] for _ in range(batch * seq)]).view(batch, seq, top_k)
    expected = 0.0
    for b in range(batch):
        total = 0.0
        for i in range(experts):
            f_i = experts / (top_k * seq) * sum(int(i in chosen[b, t].tolist()) for t in range(seq))
            p_i = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(seq)) / seq
            total += f_i * p_i
        expected += alpha * total / batch
    assert sequence_balance_loss(scores, chosen, experts, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_balance_loss_gradient_reaches_router_through_the_attached_hook():
    torch.manual_seed(6)
    cfg = small_model_config(aux_loss_alpha=0.5)
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    h = torch.randn(2, 6, cfg.hidden_size)
    moe.aux_loss_scale = 0.25
    moe(h).sum().backward()
    hooked = moe.gate.weight.grad.clone()

    moe.zero_grad()
    moe.eval()  # no hook: add the balance loss by hand
    x = h.reshape(-1, cfg.hidden_size)
    routing = moe.gate(x)
    out = run_experts(moe.experts, x, routing) + moe.shared_experts(x)
    bal = sequence_balance_loss(routing.scores.view(2, 6, -1), routing.experts.view(2, 6, -1),
                                cfg.n_routed_experts, cfg.aux_loss_alpha)
    (out.sum() + 0.25 * bal).backward()
    torch.testing.assert_close(hooked, moe.gate.weight.grad, rtol=1e-5, atol=1e-7)


def test_loads_are_counted_and_bias_update_follows_sign_rule():
    cfg = small_model_config(n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = MoE(cfg).train()
    moe(torch.randn(2, 5, cfg.hidden_size))
    assert moe.tokens_per_expert.sum().item() == 2 * 5 * 2
    load = torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 5])  # mean 2
    moe.update_bias(load, gamma=0.01)
    expected = torch.tensor([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01])
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert max_violation(load) == pytest.approx((5 - 2) / 2)
    moe.reset_stats()
    assert moe.tokens_per_expert.sum().item() == 0
