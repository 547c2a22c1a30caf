"""Overlapped F&B (SPEC §3.1): the forward chunk of one micro-batch and the backward chunk of another run
as a pair, so that every all-to-all of one is in flight while the other computes.

A transformer layer falls into sub-steps at its collectives. Forward: attention + router | dispatch |
experts | combine | residual tail. Backward: tail | combine's backward (a dispatch of gradients) |
experts | dispatch's backward (a combine of gradients) | router + attention. Rather than asking every
model to cut its layers into callables, the pair runs as two coroutines: the forward on the calling thread
(autocast, grad mode and every other thread-local setting apply as usual) and the backward on a helper
thread. A compute token (comm/intercept.py) lets one side compute at a time: a side hands it over
whenever it starts to wait for a collective of moetron.comm, and takes it back at its next compute step
(the next module call in the forward; after the backward node of dispatch / combine in the backward).
The backward starts, so the pattern is DualPipe's:

    backward  tail ─┐ combine-bwd ···· experts-bwd ─┐ dispatch-bwd ···· attention-bwd ─┐ ...
    forward         └ attention ─┐ dispatch ···· experts ─┐ combine ···· ...

(···· a transfer in flight while the other side computes). The glue between the two hops of a two-hop
transfer runs without the token, so the second hop is issued as soon as the first lands. The split
follows the model's own structure (any number of layers, dense layers, MTP), and the arithmetic is the
model's own forward and the executor's own backward (`backward.run()`, so a B-only chunk leaves its W
to the WeightGradStore as usual): results are bitwise identical to sequential_forward_backward.

The backward side issues its collectives on twin process groups (same ranks, created once at setup),
so the two sides never need to agree on an order of issue across ranks; no side ever waits for a
collective while holding the token, so the token cannot deadlock across ranks.

    ep = new_ep_groups(partition, ranks_per_node)            # or ProcessMesh(...).ep
    enable_overlap(ep, partition, ranks_per_node)            # collective: twins of ep's groups
    executor = PipelineExecutor(schedule, stages, loss_fn, forward_backward=overlapped_forward_backward)

CPU: gloo's async work handles (gloo moves the bytes on its own threads, on the same cores). GPUs: the
collectives run on NCCL's communication stream and a handle's wait() makes the compute stream wait for
its event, never the host; the two sides enqueue from two host threads onto the tensors' device.
"""

from __future__ import annotations

import threading

import torch.distributed as dist
from torch.nn.modules.module import register_module_forward_pre_hook

from .intercept import STATE, ComputeToken, install, role
from .layout import EPGroup, new_ep_groups


def register_twin(group: dist.ProcessGroup, twin: dist.ProcessGroup) -> None:
    """Use `twin` (a process group of the same ranks) for the backward side's collectives on `group`."""
    install()
    if group is None or twin is None:
        return
    if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(twin):
        raise ValueError(f"a twin group must hold the same ranks: {dist.get_process_group_ranks(group)} vs "
                         f"{dist.get_process_group_ranks(twin)}")
    STATE.twins[group] = twin


def enable_overlap(ep: EPGroup | None, partition: list[list[int]], ranks_per_node: int) -> EPGroup | None:
    """COLLECTIVE over the default group (every rank, same arguments): create twins of the EP, rail and
    intra-node groups of every EP group in `partition` and register this rank's (`ep`, the EPGroup that
    new_ep_groups(partition, ranks_per_node) gave it). Returns the twin EPGroup."""
    twin = new_ep_groups(partition, ranks_per_node)
    if ep is not None and twin is not None:
        if tuple(twin.ranks) != tuple(ep.ranks):
            raise ValueError(f"ep holds ranks {ep.ranks} but `partition` puts this rank in {twin.ranks}")
        for mine, theirs in ((ep.group, twin.group), (ep.rail, twin.rail), (ep.intra, twin.intra)):
            register_twin(mine, theirs)
    return twin


def overlapped_forward_backward(forward, backward) -> tuple:
    """The executor's F&B hook (forward_job, backward_job) -> (forward output or loss, input gradients):
    the backward chunk on a helper thread, the forward chunk here, each one's collectives in flight while
    the other computes. Equal, bit for bit, to sequential_forward_backward."""
    install()
    if STATE.forward_thread is not None:
        raise RuntimeError("overlapped_forward_backward is not reentrant: an F&B pair is already running")
    result: dict = {}
    token = ComputeToken()
    # Where a side that gave the token up (to wait for a transfer) takes it back: the next module call
    # (forward side), after the backward of dispatch or combine (backward side).
    hooks = [register_module_forward_pre_hook(lambda module, args: token.acquire(role()))]
    root = getattr(getattr(backward, "backward", None), "root", None)
    for node in _comm_nodes(root.node if root is not None else None):
        hooks.append(node.register_hook(lambda grad_inputs, grad_outputs: token.acquire("B")))

    def run_backward() -> None:
        token.acquire("B")  # the backward starts: its tail computes while the forward waits for the token
        try:
            result["grads"] = backward.run()
        except BaseException as error:  # re-raised on the calling thread
            result["error"] = error
        finally:
            token.release("B")

    STATE.forward_thread, STATE.token = threading.get_ident(), token
    helper = threading.Thread(target=run_backward, name="moetron-fb-backward", daemon=True)
    try:
        helper.start()
        try:
            out = forward.run()
        finally:
            token.release("F")
            helper.join()
    finally:
        STATE.forward_thread = STATE.token = None
        for hook in hooks:
            hook.remove()
    if "error" in result:
        raise result["error"]
    return out, result["grads"]


_COMM_NODES = ("_DispatchGradBackward", "_CombineGradBackward")  # moetron.comm's differentiable transfers


def _comm_nodes(root) -> list:
    """The backward nodes of dispatch / combine under `root`."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in _COMM_NODES or node.name() in _COMM_NODES:
            found.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return found


def sequential_forward_backward(forward, backward) -> tuple:
    """The non-overlapped reference (same as moetron.parallel.executor's default): forward, then backward."""
    return forward.run(), backward.run()
