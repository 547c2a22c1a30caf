"""Run the experts a rank holds on the rows it received: sort the (row, slot) pairs by local expert, run
each expert on its rows, weight by the gates and sum a row's slots in slot order (FP32). Works with a grouped expert
module called as experts(x_sorted, counts) or with a plain list of nn.Modules (one per local expert)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _call(experts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if isinstance(experts, (nn.ModuleList, list, tuple)):
        outs = [expert(rows) for expert, rows in zip(experts, x_sorted.split(counts.tolist())) if rows.shape[0]]
        if not outs:  # keep the graph connected to x even when nothing arrived
            return x_sorted[:0] @ torch.zeros(x_sorted.shape[1], x_sorted.shape[1], dtype=x_sorted.dtype)
        return torch.cat(outs)
    return experts(x_sorted, counts)


def run_local_experts(experts: nn.Module | Sequence[nn.Module], x: torch.Tensor, expert_ids: torch.Tensor,
                      gates: torch.Tensor, num_local: int | None = None) -> torch.Tensor:
    """x [N, H] received rows; expert_ids [N, K] local ids (-1: not here); gates [N, K].
    Returns [N, H_out]: sum over the row's local choices of gate * expert(x), in x's dtype."""
    if num_local is None:
        num_local = len(experts) if isinstance(experts, (nn.ModuleList, list, tuple)) else int(expert_ids.max()) + 1
    rows, slots = (expert_ids >= 0).nonzero(as_tuple=True)  # row-major: by row, then slot
    ids = expert_ids[rows, slots]
    order = ids.argsort(stable=True)
    rows, slots, ids = rows[order], slots[order], ids[order]
    counts = torch.bincount(ids, minlength=num_local)
    y = _call(experts, x[rows], counts)
    weighted = y * gates[rows, slots].unsqueeze(-1)
    # Sum each row's slots in slot order over [N, K, H] (other ranks' slots are zeros): the same reduction
    # as a single-process top-K sum, so a token whose experts all live on this rank gets identical bits.
    per_slot = torch.zeros(x.shape[0], expert_ids.shape[1], y.shape[1], dtype=weighted.dtype, device=x.device)
    return per_slot.index_put((rows, slots), weighted).sum(1).to(x.dtype)
