"""The keys of the one checkpoint format (checkpoint/store.py), from whatever part of the model a rank holds.

    model.<full-model name>                      dense parameters and persistent buffers (the routing bias)
    model.<routed-expert stack>.<id>             one expert's slice of a stacked expert tensor, id = GLOBAL id
    optim.<name>[.<id>].{exp_avg,exp_avg_sq}     AdamW moments, per parameter (per expert for stacks)
    optim.<name>.step                            AdamW's step count of the parameter
    master.<name>[.<id>]                         FP32 master weights (train.param_dtype=bf16)
    ema.<name>[.<id>]                            the weight EMA (parallel.ema), of the masters

Optimizer state, masters and EMA are flat (1-D, the parameter's elements in order): ZeRO-1 shards split
parameters anywhere, so a rank holds elements [offset, offset + n) of a key, a `FlatChunk`, which DCP stores
as a 1-D ShardedTensor chunk and reads back into any other split (a chunk covering the key is a plain tensor).

Names are the full model's because stages and expert blocks keep them (model/stages.py, model/moe_ep.py);
routed experts are split per global id, so the same file serves one process, any EP size and any stage split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetron.model.init import expert_offsets  # noqa: F401 (re-exported: the checkpoint's expert keys)


def flat_entries(prefix: str, name: str, value: torch.Tensor, offsets: dict[str, int],
                 suffix: str = "") -> dict[str, torch.Tensor]:
    """`value` under its key, or one key per expert row (views) when `name` is a routed-expert stack."""
    if name in offsets:
        return {f"{prefix}{name}.{offsets[name] + i}{suffix}": value[i] for i in range(value.shape[0])}
    return {f"{prefix}{name}{suffix}": value}


def model_entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model keys of `module` (a full model or a stage), values are the live tensors (views)."""
    offsets = expert_offsets(module)
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        out.update(flat_entries("model.", name, value.detach(), offsets))
    return out


@dataclass
class FlatChunk:
    """Elements [offset, offset + local.numel()) of a key whose flattened tensor has `length` elements;
    `chunks` is (global rank, offset, size) of every rank's chunk of that key (this one included)."""

    local: torch.Tensor  # 1-D view into the owner's buffer
    offset: int
    length: int
    chunks: list[tuple[int, int, int]]

    def for_dcp(self, local: torch.Tensor):
        """What DCP saves or loads for this chunk, with `local` (own storage) as this rank's data."""
        if self.offset == 0 and self.local.numel() == self.length:
            return local
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

        rank = torch.distributed.get_rank()
        shards = [ShardMetadata([off], [size], f"rank:{r}/{local.device}") for r, off, size in self.chunks]
        mine = next(m for m, (r, off, _) in zip(shards, self.chunks) if r == rank and off == self.offset)
        meta = ShardedTensorMetadata(shards, torch.Size([self.length]), TensorProperties(dtype=local.dtype))
        return ShardedTensor._init_from_local_shards_and_global_metadata([Shard(local, mine)], meta)
