"""DeepSeekMoE (arXiv 2412.19437 §2.1.2): shared experts plus fine-grained routed experts, sigmoid affinities in FP32,
group-limited (node-limited) top-K routing, the selection-only balancing bias, the sequence-wise
balance loss, and no token dropping."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetron.config import ModelConfig
from moetron.model.grouped_gemm import grouped_linear
from moetron.model.mlp import SwiGLU


@dataclass
class Routing:
    scores: torch.Tensor  # [T, E] FP32 affinities s_i = sigmoid(u^T e_i)
    experts: torch.Tensor  # [T, K] selected expert ids
    gates: torch.Tensor  # [T, K] FP32 gate values g_i (normalized, times the routed scaling factor)


class Router(nn.Module):
    """The `gate` of the published checkpoint: centroids e_i and the balancing bias b_i."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scaling, self.normalize = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # b_i: steers selection only; updated outside the optimizer, saved in checkpoints (a buffer).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):  # gating stays FP32 (arXiv 2412.19437 §2.1.2, §4)
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:  # node-limited routing: keep the M groups with the best top-(K/M) sums
            grouped = biased.view(x.shape[0], self.n_group, biased.shape[1] // self.n_group)  # T may be 0
            group_score = grouped.topk(self.top_k // self.topk_group, dim=-1).values.sum(-1)
            kept = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        experts = biased.topk(self.top_k, dim=-1).indices
        gates = scores.gather(1, experts)  # the gate uses the unbiased score
        if self.normalize:
            gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        return Routing(scores, experts, gates * self.scaling)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run as contiguous per-expert GEMMs."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, H]: rows grouped by expert in expert order; counts [E]: rows per expert."""
        gate, up = grouped_linear(x_sorted, self.gate_up_proj, counts).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down_proj, counts)


def run_experts(experts: GroupedExperts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """sum_k g_k FFN_{e_k}(x) for every token, sorting the (token, expert) pairs by expert first.
    The default expert runner of `MoE`: every routed expert is here (one device, no parallelism)."""
    tokens, top_k = routing.experts.shape
    flat = routing.experts.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts.gate_up_proj.shape[0])
    y_sorted = experts(x[order // top_k], counts)
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(tokens, top_k, -1)
    return (y * routing.gates.unsqueeze(-1)).sum(1).to(x.dtype)  # fixed order over k: deterministic


def start_routed_experts(runner, experts: nn.Module, x: torch.Tensor, routing: Routing):
    """Start the routed experts; returns the call that finishes them (-> [T, H]). A runner with a `start`
    method (expert parallelism: model/moe_ep.py) has its tokens in flight in between; any other runner
    (run_experts) runs when finished."""
    start = getattr(runner, "start", None)
    if start is not None:
        return start(experts, x, routing)
    return lambda: runner(experts, x, routing)


def sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor, num_experts: int, alpha: float):
    """L_bal = alpha * sum_i f_i P_i per sequence, averaged over sequences.
    scores [B, S, E] FP32 affinities; experts [B, S, K] selected ids."""
    batch, seq, top_k = experts.shape
    selected = torch.zeros(batch, num_experts, device=scores.device).scatter_add_(
        1, experts.view(batch, -1), torch.ones(batch, seq * top_k, device=scores.device)
    )
    f = selected * num_experts / (top_k * seq)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return alpha * (f * p).sum(-1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Return h unchanged; in backward, also send d(scale * aux)/d(aux) = scale into the aux loss, so the
    balance loss trains its layer wherever the main loss is computed (another pipeline stage included)."""

    @staticmethod
    def forward(ctx, h, aux_loss, scale):
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        return grad_h, torch.full((), ctx.scale, dtype=torch.float32, device=grad_h.device), None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.alpha = cfg.n_routed_experts, cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        # How the routed experts run: run_experts(experts, x, routing) on one device. Expert parallelism
        # replaces it (and `experts` by this rank's block) from outside: model/moe_ep.py, whose runner also
        # has start(experts, x, routing) -> finish, so that its transfers are in flight between the two.
        self.expert_runner = run_experts
        self.expert_offset = 0  # global id of experts[0]
        # Weight of the balance loss's gradient per forward (1 / micro-batches per step; set by the trainer).
        self.aux_loss_scale = 1.0
        # Per-instance statistics of the training forwards since the last reset (read by the trainer).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("balance_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("forward_count", torch.zeros(()), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = h.shape
        x = h.reshape(-1, hidden)
        routing = self.gate(x)
        # The routed experts start first and finish after the shared experts: with expert parallelism the
        # tokens travel (dispatch) while the shared experts compute (arXiv 2412.19437 §3.2.1).
        routed = start_routed_experts(self.expert_runner, self.experts, x, routing)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = routed()
        if shared is not None:
            out = out + shared
        out = out.view(batch, seq, hidden)
        if self.training and torch.is_grad_enabled():
            self._record(routing)
            if self.alpha > 0 and batch > 0:  # a rank may see no tokens (expert parallelism, uneven batches)
                experts = routing.experts.view(batch, seq, -1)
                bal = sequence_balance_loss(routing.scores.view(batch, seq, -1), experts, self.num_experts, self.alpha)
                self.balance_loss_sum += bal.detach()
                out = _AttachAuxLoss.apply(out, bal, self.aux_loss_scale)
        return out

    @torch.no_grad()
    def _record(self, routing: Routing) -> None:
        self.tokens_per_expert += torch.bincount(routing.experts.flatten(), minlength=self.num_experts)
        self.forward_count += 1

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i), loads over the global batch."""
        self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load).float()

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.tokens_per_expert.zero_()
        self.balance_loss_sum.zero_()
        self.forward_count.zero_()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024)."""
    mean = load.float().mean()
    return float((load.float().max() - mean) / mean) if mean > 0 else 0.0
