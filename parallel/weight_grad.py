"""Splitting one chunk's backward into B (input gradients) and a deferred W (weight gradients).

Works on the autograd graph, so any module is covered (nn.Linear, grouped expert GEMMs, norms)
without replacing layers. After a chunk's forward the graph is read once:

- every node gets the set of leaves below it (the stage inputs and the parameters);
- a *weight branch* is a node whose only leaf is one parameter (e.g. the transpose feeding a
  Linear's weight, or the parameter's AccumulateGrad itself): only W needs it;
- a *frontier* node has activation-gradient work behind it and at least one weight branch below:
  the matmul of a Linear or a grouped GEMM.

B runs the graph from the output to the stage inputs and stops at the frontier nodes, keeping the
gradients that arrive there (autograd only evaluates the outputs a call needs, so the weight GEMMs
are skipped). W later runs each frontier node again for its own parameters only, starting from the
kept gradients. If two frontier nodes share a parameter (tied weights) the split would double count,
so that chunk falls back to a full backward in B and an empty W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge


def _num_outputs(node) -> int:
    """How many forward outputs (backward inputs) a node has."""
    metadata = getattr(node, "_input_metadata", None)
    return 1 if metadata is None else len(metadata)


def _children(node) -> list:
    return [child for child, _ in node.next_functions if child is not None]


@dataclass
class _GraphSplit:
    frontier: list = field(default_factory=list)  # nodes where B stops
    params_of: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # id(node) -> its params
    has_chain: bool = True  # False: nothing for B to do, W is the whole backward
    shared: bool = False  # a parameter below two frontier nodes: no split


def analyse(root, inputs: Sequence[torch.Tensor]) -> _GraphSplit:
    """Find the frontier of the graph under `root` (a Node) for stage inputs `inputs`."""
    input_ids = {id(t) for t in inputs}
    leaf_bit: dict[int, int] = {}  # id(leaf tensor) -> bit
    leaf_of_bit: list[torch.Tensor] = []
    mask: dict[int, int] = {}  # id(node) -> bitmask of leaves below it
    nodes: dict[int, object] = {}

    # Iterative post-order walk (graphs of big stages are deeper than Python's recursion limit).
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if key in mask:
            continue
        if not expanded:
            nodes[key] = node
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in mask)
            continue
        bits = 0
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad of a leaf
            if id(variable) not in leaf_bit:
                leaf_bit[id(variable)] = len(leaf_of_bit)
                leaf_of_bit.append(variable)
            bits = 1 << leaf_bit[id(variable)]
        for c in _children(node):
            bits |= mask[id(c)]
        mask[key] = bits

    input_bits = sum(1 << leaf_bit[i] for i in input_ids if i in leaf_bit)

    def weight_branch(key: int) -> bool:
        bits = mask[key]
        return bits != 0 and bits & (bits - 1) == 0 and not bits & input_bits

    split = _GraphSplit()
    if mask[id(root)] == 0 or weight_branch(id(root)):
        split.has_chain = False
        return split
    owner: dict[int, int] = {}  # id(param) -> id(frontier node)
    for key, node in nodes.items():
        if mask[key] == 0 or weight_branch(key):
            continue
        params = []
        for c in _children(node):
            if weight_branch(id(c)):
                params.append(leaf_of_bit[mask[id(c)].bit_length() - 1])
        if not params:
            continue
        split.frontier.append(node)
        split.params_of[key] = params
        for p in params:
            if owner.setdefault(id(p), key) != key:
                split.shared = True
    return split


class ChunkBackward:
    """The backward of one chunk: `full()` once, or `inputs_only()` now and `weights()` later.

    `root` is the gradient edge of the chunk's output (or loss); `grad` the gradient arriving for it;
    `inputs` the stage inputs that need a gradient. Both entry points return the input gradients.
    """

    def __init__(self, root: GradientEdge, grad: torch.Tensor, inputs: Sequence[torch.Tensor]):
        self.root, self.grad, self.inputs = root, grad, list(inputs)
        self._pending: list[tuple[list[GradientEdge], list[torch.Tensor], list[torch.Tensor]]] = []

    def full(self) -> list[torch.Tensor | None]:
        targets = self.inputs + [p for p in self._leaf_params()]
        if not targets:
            return []
        grads = torch.autograd.grad([self.root], targets, [self.grad], allow_unused=True)
        _accumulate(targets[len(self.inputs):], grads[len(self.inputs):])
        return list(grads[: len(self.inputs)])

    def inputs_only(self) -> list[torch.Tensor | None]:
        split = analyse(self.root.node, self.inputs)
        if split.shared:
            return self.full()
        if not split.has_chain:  # nothing flows to the inputs: all of it is weight work
            self._pending = [([self.root], [self.grad], self._leaf_params())]
            return [None] * len(self.inputs)
        edges = [GradientEdge(n, k) for n in split.frontier for k in range(_num_outputs(n))]
        grads = torch.autograd.grad(
            [self.root], self.inputs + edges, [self.grad], retain_graph=True, allow_unused=True
        )
        kept = dict(zip(((id(e.node), e.output_nr) for e in edges), grads[len(self.inputs):]))
        for node in split.frontier:
            roots, root_grads = [], []
            for k in range(_num_outputs(node)):
                g = kept[(id(node), k)]
                if g is not None:
                    roots.append(GradientEdge(node, k))
                    root_grads.append(g)
            if roots:
                self._pending.append((roots, root_grads, split.params_of[id(node)]))
        return list(grads[: len(self.inputs)])

    def weights(self) -> None:
        """Compute and accumulate (into .grad) the weight gradients B left behind."""
        for roots, grads, params in self._pending:
            targets = [p for p in params if p.requires_grad]
            if targets:
                _accumulate(targets, torch.autograd.grad(roots, targets, grads, allow_unused=True))
        self._pending = []

    def _leaf_params(self) -> list[torch.Tensor]:
        """Every leaf under the root that is not a stage input (the parameters this chunk used)."""
        split_inputs = {id(t) for t in self.inputs}
        found, seen, stack = [], set(), [self.root.node]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in split_inputs:
                found.append(variable)
            stack.extend(_children(node))
        return found


def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """p.grad += g, as autograd's AccumulateGrad would (same arithmetic, so results match bitwise); into
    p.main_grad instead where the parameter carries one (an FP32 accumulation buffer, Megatron's convention:
    autograd's own accumulation then goes there too, through a hook of the trainer)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        main = getattr(p, "main_grad", None)
        if main is not None:
            main.add_(g)
        elif p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)


class WeightGradStore:
    """Per-executor store of deferred weight gradients, keyed by chunk (micro-batch, stage, direction)."""

    def __init__(self) -> None:
        self._pending: dict[tuple[int, int, int], ChunkBackward] = {}

    def put(self, key: tuple[int, int, int], backward: ChunkBackward) -> None:
        if key in self._pending:
            raise RuntimeError(f"chunk {key} already has a deferred weight gradient")
        self._pending[key] = backward

    def run(self, key: tuple[int, int, int]) -> None:
        backward = self._pending.pop(key, None)
        if backward is None:
            raise RuntimeError(f"W for chunk {key} but its B never ran")
        backward.weights()

    def __len__(self) -> int:
        return len(self._pending)
