"""Which gradients the running backward wants from an FP8 autograd Function.

A zero-bubble schedule (ZB1P, DualPipe, DualPipeV; DeepSeek-V3 report, arXiv 2412.19437 §3.2.1) splits
a backward into B (input gradients, on the critical path) and a deferred W (weight gradients). The
split works on the autograd graph: B asks autograd for the input gradients only, W later asks for the
weight gradients only, each time starting at the same node. Autograd's own nodes then skip the GEMM of
the gradient nobody asked for; a custom Function would compute both, because its `needs_input_grad`
is fixed at forward time. So the FP8 Functions ask the engine instead (`wanted`): in B only Dgrad
runs, in W only Wgrad, in an ordinary backward both.

The engine can only answer for non-leaf nodes while autograd.grad() runs, and a Parameter is a leaf;
`with_edges` gives each differentiable operand its own view node, which costs no copy.
"""

import torch


def with_edges(*tensors):
    """Each tensor that needs a gradient as a view of itself (a non-leaf gradient edge), others as is."""
    return tuple(t.view_as(t) if t is not None and t.requires_grad else t for t in tensors)


def wanted(ctx, index: int) -> bool:
    """Whether the backward now running wants the gradient of the Function's input `index`."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # private: absent means compute all
    if will_execute is None:
        return True
    try:
        return will_execute(node)
    except RuntimeError:  # a leaf under autograd.grad(): the engine cannot say, so compute it
        return True


def deferred(ctx, index: int) -> bool:
    """Input `index` needs a gradient that this backward does not want: a W will ask for it later."""
    return ctx.needs_input_grad[index] and not wanted(ctx, index)
