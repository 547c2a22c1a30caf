"""Expert-parallel dispatch and combine (arXiv 2412.19437 §3.2.2) over an EPGroup.

dispatch: every token goes from its home rank to the ranks that hold any of its top-K experts, ONCE per
rank (its row carries all K gates and ids; the receiver keeps the ones it holds).
  flat     one all-to-all over the EP group.
  two_hop  first over the rail (same local index on every node): ONCE per destination node, to the
           rank with the sender's local index there; then inside that node to the ranks holding the
           token's experts. Inter-node traffic per token is bounded by the nodes it reaches (<= M with
           node-limited routing).
combine: the adjoint. Each rank returns one row per received row (its experts' gated sum), every hop
sums the copies of a token (in FP32), and the home rank gets sum_k gate_k * expert_k(x).

Both are differentiable: the backward of dispatch is a combine of the gradients and the backward of
combine is a dispatch (on the transport's twin groups, if registered: comm/transport.py). Each is a transfer
issued asynchronously and waited for just before its consumer (comm/overlap.py hands over there). Received rows are ordered by (source EP rank, source row) in both modes, so
each expert sees its tokens in the order of the concatenated batch. FP8 dispatch quantizes once at home
(E4M3, 1x128 scales; relayed as bytes) and dequantizes at the destination; gradients travel unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moetron.comm.errors import ParameterError

from .layout import EPGroup
from .payload import DispatchFormat, from_bytes, to_bytes
from .stats import CommStats
from .transport import Hop, Pending, Route, Transport, choice_mask, make_hop
from .two_hop import intra_node_hop, rail_hop

MODES = ("flat", "two_hop")


@dataclass
class Dispatched:
    """What a rank received: rows for its local experts."""

    x: torch.Tensor  # [N, H] received token rows (in the dtype x was dispatched in)
    gates: torch.Tensor  # [N, K] FP32 gates, zero where the expert is not on this rank
    expert_ids: torch.Tensor  # [N, K] LOCAL expert ids (0 .. experts_per_rank-1), -1 where not on this rank
    tokens_per_expert: torch.Tensor  # [experts_per_rank] (row, k) pairs per local expert
    source: torch.Tensor  # [N, 2] each row's home EP rank and its row index there
    route: Route  # how the rows came; combine sends them back along it
    num_tokens: int  # rows of x at home


class _Box:
    """Carries precomputed results into an autograd Function (not as inputs, so no view aliasing)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _DispatchGrad(torch.autograd.Function):
    """Connects the received rows to (x, gates) at home; backward is a combine of the gradients."""

    @staticmethod
    def forward(ctx, x, gates, box):
        ctx.box = box
        out_x, out_gates = box.out_x, box.out_gates
        box.out_x = box.out_gates = None
        return out_x, out_gates

    @staticmethod
    def backward(ctx, grad_x, grad_gates):
        box = ctx.box
        if grad_x is None:
            grad_x = torch.zeros(box.rows, box.hidden, dtype=box.x_dtype, device=box.device)
        if grad_gates is None:
            grad_gates = torch.zeros(box.rows, box.local.shape[1], dtype=torch.float32, device=box.device)
        grad_gates = grad_gates.float() * box.local
        transport = box.route.transport
        transfer = transport.open_transfer("dispatch-bwd")
        with transport.issuing(transfer):
            inner = box.route.reverse([grad_x, grad_gates], [grad_x.dtype, torch.float32], box.stats, "backward",
                                      async_op=True, what="dispatch-bwd", backward=True)
        home_x, home_gates = Pending(None, inner.wait, transport, transfer).wait()
        return home_x.to(box.x_dtype), home_gates.to(box.gates_dtype), None


class _CombineGrad(torch.autograd.Function):
    """Connects the home rows to the expert rows; backward is a dispatch of the gradients."""

    @staticmethod
    def forward(ctx, y, box):
        ctx.box = box
        out, box.out = box.out, None
        return out

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        rows = box.route.forward_bytes(to_bytes([grad]), box.stats, "backward")
        return from_bytes(rows, [(grad.shape[1], grad.dtype)])[0].to(box.y_dtype), None


class Dispatcher:
    """Dispatch/combine for one EP group and one expert placement (expert e on EP rank e // (E / ep)).

    mode: "flat" or "two_hop"; fp8: send the dispatch payload as E4M3 with 1x128 scales;
    combine_dtype: the wire dtype of combine (None: the dtype of the expert outputs, e.g. BF16 or FP32).
    stats: a CommStats to count bytes into (one is created if omitted); transport: where the collectives go
    (comm/transport.py; share one among the dispatchers of a model so a link model, overlap twins and a
    recorder apply to all of them; one is created if omitted)."""

    def __init__(self, ep: EPGroup, num_experts: int, mode: str = "two_hop", fp8: bool = False,
                 combine_dtype: torch.dtype | None = None, stats: CommStats | None = None,
                 transport: Transport | None = None):
        if mode not in MODES:
            raise ParameterError("mode", mode, " | ".join(MODES))
        self.ep, self.num_experts, self.mode, self.fp8 = ep, num_experts, mode, fp8
        self.experts_per_rank = ep.experts_per_rank(num_experts)
        self.combine_dtype = combine_dtype
        self.stats = stats if stats is not None else CommStats()
        self.transport = transport if transport is not None else Transport()

    # ---- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> Dispatched:
        return self.dispatch_async(x, expert_ids, gates).wait()

    def dispatch_async(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> Pending:
        """Start a dispatch: the first hop's payload is in flight when this returns. wait() on the result
        finishes the remaining hop and returns a Dispatched."""
        self._check(x, expert_ids, gates)
        ep = self.ep
        fmt = DispatchFormat(x.shape[1], expert_ids.shape[1], x.dtype, self.fp8)
        self.stats.add_call("dispatch")
        transfer = self.transport.open_transfer("dispatch")
        with torch.no_grad(), self.transport.issuing(transfer):
            packed = fmt.pack(x.detach(), expert_ids, gates.detach(), ep.rank)
            dest = expert_ids.long() // self.experts_per_rank  # EP rank of every choice
            if self.mode == "flat":
                remote = [ep.node_of(p) != ep.node for p in range(ep.size)]
                first = make_hop(self.transport, ep.group, ep.rank, remote, choice_mask(dest, ep.size))
            else:
                first = rail_hop(self.transport, ep, dest)
            self.stats.add("dispatch", *first.bytes_to_peers(first.send_splits, fmt.row_bytes))
            buf, work = self.transport.all_to_all(packed[first.send_index], first.group, first.send_splits,
                                                  first.recv_splits, "dispatch", async_op=True)

        def finish() -> Dispatched:
            with torch.no_grad():
                hops: list[Hop] = [first]
                rows = buf
                if self.mode == "two_hop":
                    second = intra_node_hop(self.transport, ep, fmt.ids(rows).long() // self.experts_per_rank)
                    self.stats.add("dispatch", *second.bytes_to_peers(second.send_splits, fmt.row_bytes))
                    rows, _ = self.transport.all_to_all(rows[second.send_index], second.group, second.send_splits,
                                                        second.recv_splits, "dispatch")
                    hops.append(second)
                out_x, out_gates, ids, source = fmt.unpack(rows)
                perm = None
                if self.mode == "two_hop":
                    order = source[:, 0].argsort(stable=True)
                    if not torch.equal(order, torch.arange(order.numel(), device=order.device)):
                        perm = order
                        out_x, out_gates, ids, source = out_x[perm], out_gates[perm], ids[perm], source[perm]
                route = Route(hops, perm, self.transport)
                lo = ep.rank * self.experts_per_rank
                local = (ids >= lo) & (ids < lo + self.experts_per_rank)
                local_ids = torch.where(local, ids - lo, -1)
                out_gates = torch.where(local, out_gates, 0.0)
                counts = torch.bincount(local_ids[local], minlength=self.experts_per_rank)
            box = _Box(out_x=out_x, out_gates=out_gates, route=route, local=local.float(), stats=self.stats,
                       rows=out_x.shape[0], hidden=x.shape[1], device=x.device, x_dtype=x.dtype, gates_dtype=gates.dtype)
            rx, rgates = _DispatchGrad.apply(x, gates, box)
            return Dispatched(rx, rgates, local_ids, counts, source, route, x.shape[0])

        return Pending(work, finish, self.transport, transfer)

    # ---- combine -----------------------------------------------------------------------------------
    def combine(self, y: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return self.combine_async(y, dispatched).wait()

    def combine_async(self, y: torch.Tensor, dispatched: Dispatched) -> Pending:
        """Start a combine of expert rows y [N, H] (each row already the gated sum over this rank's experts
        of the token); wait() returns the home rows [T, H] (sums over ranks, in y's dtype)."""
        if y.dim() != 2 or y.shape[0] != dispatched.x.shape[0]:
            raise ValueError(f"combine needs one row per dispatched row: y {tuple(y.shape)}, "
                             f"dispatched {dispatched.x.shape[0]} rows")
        self.stats.add_call("combine")
        wire = self.combine_dtype or y.dtype
        transfer = self.transport.open_transfer("combine")
        with torch.no_grad(), self.transport.issuing(transfer):
            pending = dispatched.route.reverse([y.detach()], [wire], self.stats, "combine", async_op=True)

        def finish() -> torch.Tensor:
            with torch.no_grad():
                out = pending.wait()[0].to(y.dtype)
            return _CombineGrad.apply(y, _Box(out=out, route=dispatched.route, stats=self.stats, y_dtype=y.dtype))

        return Pending(None, finish, self.transport, transfer)

    def _check(self, x, expert_ids, gates) -> None:
        if x.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape != gates.shape or \
                expert_ids.shape[0] != x.shape[0]:
            raise ValueError(f"dispatch needs x [T, H], expert_ids [T, K] and gates [T, K]; got "
                             f"{tuple(x.shape)}, {tuple(expert_ids.shape)}, {tuple(gates.shape)}")
        if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}); got "
                             f"[{int(expert_ids.min())}, {int(expert_ids.max())}]")
