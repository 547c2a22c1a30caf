"""Overlapped F&B (arXiv 2412.19437 §3.2.1): the forward chunk of one micro-batch and the backward chunk of another run
as a pair, so that every all-to-all of one is in flight while the other computes.

A transformer layer falls into sub-steps at its transfers. Forward: attention + router + (dispatch issued)
+ shared experts | experts + (combine issued) | residual tail and the next layer. Backward: tail + (the
backward of combine, a dispatch of gradients, issued) | experts backward + (the backward of dispatch, a
combine of gradients, issued) | router + attention backward and the layer below. Every transfer is
issued asynchronously and waited for only just before its consumer (`comm.transport.Pending`), and at
that point the pair hands over: the other chunk enqueues its next sub-step (up to its own next wait)
before this chunk's wait and consumer are enqueued. Exactly one chunk runs at any time, and the order in
which work is enqueued is the one Megatron-core's combined 1F1B EP overlap and DualPipe use:

    backward  tail ─┐ combine-bwd ·········· experts-bwd ─┐ dispatch-bwd ········ attention-bwd ─┐
    forward         └ attention + shared ─┐ dispatch ······· experts ─┐ combine ··········· tail ...

(──: compute enqueued on the one compute stream, ····: a transfer on the communication stream). On a GPU
the host only enqueues, and a wait makes the compute stream (not the host) stop: since a chunk enqueues
its wait only after the other chunk has enqueued its compute, no chunk's kernels ever queue behind the
other chunk's wait (comm/stream_model.py records this order and replays it; tests/distributed/
test_overlap_streams.py checks it). On CPU, with gloo's async handles, the same order holds on the host.

The split follows the model's own structure, with no model code cut into callables and no module names
matched: the forward is the stage's own forward, the backward the executor's own autograd backward
(`run_b_then_w()` or `run()`; a B-only chunk leaves its W to the WeightGradStore as usual), and the
hand-over points are the waits of the transfers (`Pending.wait`), wherever a model uses them. Results
are therefore bitwise identical to sequential_forward_backward.

The two chunks are coroutines: each keeps its own call stack (the forward on the calling thread, so that
autocast, grad mode and every other thread-local setting apply as usual; the backward on a helper
thread, as autograd's engine runs it) and a baton says which one runs (`turn`). Which process group a
transfer takes follows from its direction (the backward's transfers take twins of the EP groups, created
once at setup), so the two chunks never need to agree on an order of issue across ranks; since every EP
rank of a pair runs the same chunks, the hand-overs come in the same order on every rank and a chunk
only ever waits for transfers its peers issued before their matching hand-over: no deadlock.

    transport = Transport()
    ep = new_ep_groups(partition, ranks_per_node)            # or ProcessMesh(...).ep
    apply_expert_parallel(stage, ep, transport=transport)    # every MoE layer talks through `transport`
    enable_overlap(transport, ep, partition, ranks_per_node) # collective: twins of ep's groups
    executor = PipelineExecutor(schedule, stages, loss_fn, forward_backward=OverlappedForwardBackward(transport))
"""

from __future__ import annotations

import threading

from .layout import EPGroup, new_ep_groups
from .transport import Transport

_OTHER = {"F": "B", "B": "F"}


class Baton:
    """Which chunk of a pair runs ("F" or "B": `turn`); the other is parked until it is handed the baton.
    The side that calls hand_over or finish is the one holding the baton (only it runs)."""

    def __init__(self, transport: Transport, first: str = "B"):
        self._cv = threading.Condition()
        self._transport = transport
        self.finished: set[str] = set()
        self.turn = ""
        with self._cv:
            self._give(first)

    def _give(self, side: str) -> None:
        self.turn = side
        if self._transport.streams is not None:
            self._transport.streams.side = side
        self._cv.notify_all()

    def wait_for_turn(self, side: str) -> None:
        with self._cv:
            while self.turn != side:
                self._cv.wait()

    def hand_over(self) -> None:
        """The running side is about to wait for a transfer: the other side runs (until it hands over or
        finishes), then this side carries on."""
        with self._cv:
            me = self.turn
            if _OTHER[me] in self.finished:
                return
            self._give(_OTHER[me])
            while self.turn != me:
                self._cv.wait()

    def finish(self) -> None:
        """The running side is done: the other side runs to its end."""
        with self._cv:
            me = self.turn
            self.finished.add(me)
            if _OTHER[me] not in self.finished:
                self._give(_OTHER[me])


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
    stages whose dispatchers share `transport`: the two chunks interleaved at their transfers' waits, the
    backward first (its tail computes while nothing of the forward is in flight yet). Equal, bit for bit,
    to sequential_forward_backward."""

    def __init__(self, transport: Transport, split_backward: bool = True):
        self.transport = transport
        # Run the backward chunk as B then W (its `run_b_then_w`, if it has one): its transfers go out before
        # the weight GEMMs, which then fill the forward's last waits. Off where B cannot skip W (FP8 GEMMs
        # that compute both gradients in one backward would run twice).
        self.split_backward = split_backward

    def __call__(self, forward, backward) -> tuple:
        transport = self.transport
        if transport.pair is not None:
            raise RuntimeError("overlapped F&B is not reentrant: a pair is already running on this transport")
        result: dict = {}
        baton = Baton(transport, first="B")

        def run_backward() -> None:
            try:
                run = getattr(backward, "run_b_then_w", backward.run) if self.split_backward else backward.run
                result["grads"] = run()
            except BaseException as error:  # re-raised on the calling thread
                result["error"] = error
            finally:
                baton.finish()

        transport.pair = baton
        helper = threading.Thread(target=run_backward, name="moetron-fb-backward", daemon=True)
        try:
            helper.start()
            baton.wait_for_turn("F")
            try:
                out = forward.run()
            finally:
                baton.finish()
                helper.join()
        finally:
            transport.pair = None
            if transport.streams is not None:
                transport.streams.side = "-"
        if "error" in result:
            raise result["error"]
        return out, result["grads"]


def sequential_forward_backward(forward, backward) -> tuple:
    """The non-overlapped reference (same as moetron.parallel.executor's default): forward, then backward."""
    return forward.run(), backward.run()
