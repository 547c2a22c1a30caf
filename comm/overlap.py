"""Overlapped F&B (arXiv 2412.19437 §3.2.1): the forward chunk of one micro-batch and the backward chunk of another run
as a pair, so that every all-to-all of one is in flight while the other computes.

A transformer layer falls into sub-steps at its collectives. Forward: attention + router | dispatch |
experts | combine | residual tail. Backward: tail | combine's backward (a dispatch of gradients) |
experts | dispatch's backward (a combine of gradients) | router + attention. Rather than asking every
model to cut its layers into callables, the pair runs as two coroutines: the forward on the calling thread
(autocast, grad mode and every other thread-local setting apply as usual) and the backward on a helper
thread. A compute token lets one side compute at a time (as on a GPU's one compute stream): a side hands it
over whenever it starts to wait for a collective of its Transport, and takes it back at its next compute
step (the next module call in the forward; after the backward node of dispatch / combine in the backward).
While the backward still has transfers to issue it has priority: it is the longer chain (its compute is
about twice the forward's, and each of its transfers waits for that compute), so the forward hands the
token over at its next module call whenever the backward wants it, and fills the backward's waits. The
backward's work after its last transfer (attention B, the W GEMMs) hides nothing: from then on the
forward, which still has transfers ahead, goes first, the backward handing over at its next autograd node.
The backward starts, so the pattern is DualPipe's:

    backward  tail ─┐ combine-bwd ···· experts-bwd ─┐ dispatch-bwd ···· attention-bwd ─┐ ...
    forward         └ attention ─┐ dispatch ···· experts ─┐ combine ···· ...

(···· a transfer in flight while the other side computes). The glue between the two hops of a two-hop
transfer runs without the token, so the second hop is issued as soon as the first lands. The split
follows the model's own structure (any number of layers, dense layers, MTP), and the arithmetic is the
model's own forward and the executor's own backward (`run_b_then_w()` or `run()`; a B-only chunk leaves its W
to the WeightGradStore as usual): results are bitwise identical to sequential_forward_backward.

The backward side issues its collectives on twin process groups (same ranks, created once at setup),
so the two sides never need to agree on an order of issue across ranks; no side ever waits for a
collective while holding the token, so the token cannot deadlock across ranks. All of this lives in the
Transport that the stages' dispatchers share (no process-wide state):

    transport = Transport()
    ep = new_ep_groups(partition, ranks_per_node)            # or ProcessMesh(...).ep
    apply_expert_parallel(stage, ep, transport=transport)    # every MoE layer talks through `transport`
    enable_overlap(transport, ep, partition, ranks_per_node) # collective: twins of ep's groups
    executor = PipelineExecutor(schedule, stages, loss_fn, forward_backward=OverlappedForwardBackward(transport))

CPU: gloo's async work handles (gloo moves the bytes on its own threads, on the same cores). GPUs: the
collectives run on NCCL's communication stream and a handle's wait() makes the compute stream wait for
its event, never the host; the two sides enqueue from two host threads onto the tensors' device.
"""

from __future__ import annotations

import threading
import time

from .layout import EPGroup, new_ep_groups
from .recorder import Span, current_rank
from .transport import Transport


class ComputeToken:
    """Only its holder ("F" or "B") computes. A side gives it up whenever it waits for a collective and takes
    it back at its next compute step, so one side's transfer is in flight while the other computes, and the
    two never slice the cores between them. Nobody blocks on a collective while holding it, so it cannot
    deadlock across ranks; the glue between the hops of one dispatch runs without it (issued promptly)."""

    def __init__(self, transport: Transport):
        self._cv = threading.Condition()
        self._transport = transport
        self.owner: str | None = None
        self.waiting: set[str] = set()

    def acquire(self, who: str) -> None:
        with self._cv:
            if self.owner in (None, who):
                self.owner = who
                return
            start = time.perf_counter()
            self.waiting.add(who)
            while self.owner not in (None, who):
                self._cv.wait()
            self.waiting.discard(who)
            self.owner = who
        recorder = self._transport.recorder
        if recorder is not None:
            recorder.add(Span(current_rank(), who, "token", start, time.perf_counter()))

    def release(self, who: str) -> None:
        with self._cv:
            if self.owner == who:
                self.owner = None
                self._cv.notify_all()

    def yield_to_waiting(self, who: str) -> None:
        """Hand the token to the other side if it waits for it; take it back when that side next waits."""
        with self._cv:
            others = self.waiting - {who}
            if self.owner != who or not others:
                return
            self.owner = others.pop()  # straight to the waiter, so that we cannot take it back first
            self._cv.notify_all()
        self.acquire(who)


class _Pair:
    """A running overlapped F&B pair, as its Transport sees it, and who may compute when both want to."""

    def __init__(self, transport: Transport, backward_transfers: int):
        self.forward_thread = threading.get_ident()
        self.token = ComputeToken(transport)
        self.backward_transfers_left = backward_transfers  # dispatch / combine backward nodes not yet run

    def role(self) -> str:
        return "F" if threading.get_ident() == self.forward_thread else "B"

    def compute_step(self) -> None:
        """A module call: the forward takes the token, and hands it over at once to the backward if that
        waits for it and still has transfers to issue (the backward's chain is the longer one). A recompute
        inside the backward calls modules too: its side already holds the token."""
        who = self.role()
        self.token.acquire(who)
        if who == "F" and self.backward_transfers_left > 0:
            self.token.yield_to_waiting("F")

    def backward_node(self) -> None:
        """An autograd node of the backward is about to run. Once the backward has issued all its transfers,
        its remaining work (attention B, the W GEMMs) hides nothing, so the forward, which still has
        transfers ahead, goes first."""
        if self.backward_transfers_left == 0:
            self.token.yield_to_waiting("B")

    def backward_transfer_done(self) -> None:
        """The backward of a dispatch or combine has run (its transfer landed): the backward computes next."""
        self.backward_transfers_left -= 1
        self.token.acquire("B")

    def give_up_turn(self) -> None:
        """Called by a side that starts to wait for a transfer: the other side may compute meanwhile."""
        self.token.release(self.role())


def enable_overlap(transport: Transport, ep: EPGroup | None, partition: list[list[int]],
                   ranks_per_node: int) -> EPGroup | None:
    """COLLECTIVE over the default group (every rank, same arguments): create twins of the EP, rail and
    intra-node groups of every EP group in `partition` and register this rank's (`ep`, the EPGroup that
    new_ep_groups(partition, ranks_per_node) gave it) with `transport`. Returns the twin EPGroup."""
    twin = new_ep_groups(partition, ranks_per_node)
    if ep is not None and twin is not None:
        if tuple(twin.ranks) != tuple(ep.ranks):
            raise ValueError(f"ep holds ranks {ep.ranks} but `partition` puts this rank in {twin.ranks}")
        for mine, theirs in ((ep.group, twin.group), (ep.rail, twin.rail), (ep.intra, twin.intra)):
            transport.register_twin(mine, theirs)
    return twin


class OverlappedForwardBackward:
    """The executor's F&B hook (forward_job, backward_job) -> (forward output or loss, input gradients) for
    stages whose dispatchers share `transport`: the backward chunk on a helper thread, the forward chunk
    here, each one's collectives in flight while the other computes. Equal, bit for bit, to
    sequential_forward_backward."""

    def __init__(self, transport: Transport, split_backward: bool = True):
        self.transport = transport
        # Run the backward chunk as B then W (its `run_b_then_w`, if it has one): its transfers go out before
        # the weight GEMMs. Off only for modules whose B cannot skip their weight GEMMs (autograd's own
        # nodes and moetron's FP8 Functions can).
        self.split_backward = split_backward

    def __call__(self, forward, backward) -> tuple:
        transport = self.transport
        if transport.pair is not None:
            raise RuntimeError("overlapped F&B is not reentrant: a pair is already running on this transport")
        result: dict = {}
        root = getattr(getattr(backward, "backward", None), "root", None)
        comm, every = _graph_nodes(root.node if root is not None else None)
        pair = _Pair(transport, len(comm))
        token = pair.token
        # Where a side that gave the token up (to wait for a transfer) takes it back: its next module call
        # (forward side), after the backward of dispatch or combine (backward side). Where it hands the token
        # over if the other side has priority: the same module calls, and every backward node.
        hooks = [module.register_forward_pre_hook(lambda module, args: pair.compute_step())
                 for module in forward.module.modules()]
        hooks += [node.register_hook(lambda grad_inputs, grad_outputs: pair.backward_transfer_done())
                  for node in comm]
        hooks += [node.register_prehook(lambda grad_outputs: pair.backward_node()) for node in every]

        def run_backward() -> None:
            token.acquire("B")  # the backward starts: its tail computes while the forward waits for the token
            try:
                run = getattr(backward, "run_b_then_w", backward.run) if self.split_backward else backward.run
                result["grads"] = run()
            except BaseException as error:  # re-raised on the calling thread
                result["error"] = error
            finally:
                token.release("B")

        transport.pair = pair
        helper = threading.Thread(target=run_backward, name="moetron-fb-backward", daemon=True)
        try:
            helper.start()
            try:
                out = forward.run()
            finally:
                token.release("F")
                helper.join()
        finally:
            transport.pair = None
            for hook in hooks:
                hook.remove()
        if "error" in result:
            raise result["error"]
        return out, result["grads"]


_COMM_NODES = ("_DispatchGradBackward", "_CombineGradBackward")  # moetron.comm's differentiable transfers


def _graph_nodes(root) -> tuple[list, list]:
    """The backward nodes of dispatch / combine under `root`, and every node under it."""
    comm, every, seen, stack = [], [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        every.append(node)
        if type(node).__name__ in _COMM_NODES or node.name() in _COMM_NODES:
            comm.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return comm, every


def sequential_forward_backward(forward, backward) -> tuple:
    """The non-overlapped reference (same as moetron.parallel.executor's default): forward, then backward."""
    return forward.run(), backward.run()
