"""Initialization that does not depend on the layout: each tensor from its own generator.

The report's init (arXiv 2412.19437 §4.2): Normal(0, 0.006) for every matrix, ones for the norms, a zero
balancing bias. A tensor's values come from a generator seeded by (run seed, full-model name) -- and for a
routed-expert stack, one generator per row seeded by (run seed, name, GLOBAL expert id) -- so a rank that
builds only its stages and its block of experts draws exactly the values one process gives the whole model,
whatever the pipeline split, expert-parallel size or device count.

    init_parameters(stage, seed, std)   # after to_empty(device=...)
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from moetron.model.moe import MoE


def expert_offsets(module: nn.Module) -> dict[str, int]:
    """Names (in `module`'s state dict) of routed-expert stacks -> global id of their first row."""
    offsets = {}
    for prefix, moe in module.named_modules():
        if isinstance(moe, MoE):
            for name, _ in moe.experts.named_parameters():
                offsets[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = moe.expert_offset
    return offsets


def tensor_seed(seed: int, name: str, expert: int | None = None) -> int:
    """A 63-bit seed from the run seed, the full-model name and (for a routed expert) its global id."""
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()  # grad mode is per thread: the workers need it too
def _fill(t: torch.Tensor, seed: int, std: float) -> None:
    if t.dim() < 2:  # norm weights
        t.fill_(1.0)
        return
    generator = torch.Generator(device=t.device)
    generator.manual_seed(seed)
    t.normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, std: float, threads: int | None = None) -> None:
    """Initialize every parameter of `module` (full-model names, as stages keep them) in place and zero its
    buffers (the balancing bias and the MoE statistics); routed-expert rows are initialized expert by expert
    under their global ids. Tensors are filled by `threads` workers (default: torch's intra-op threads);
    each has its own generator, so the values do not depend on the order."""
    offsets = expert_offsets(module)
    jobs = []
    for name, p in module.named_parameters():
        if name in offsets:
            jobs += [(p[i], tensor_seed(seed, name, offsets[name] + i)) for i in range(p.shape[0])]
        else:
            jobs.append((p, tensor_seed(seed, name)))
    workers = threads or torch.get_num_threads()
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(workers) as pool:  # normal_ releases the GIL
            list(pool.map(lambda job: _fill(job[0], job[1], std), jobs))
    else:
        for t, s in jobs:
            _fill(t, s, std)
    for buf in module.buffers():
        buf.zero_()
