"""Checkpoints of a distributed run: one DCP checkpoint written by every rank, independent of the layout.

Keys (what DCP stores; replicated keys -- DP replicas, DualPipe's mirrored copies -- are written once):
  model.<full-model name>                      dense parameters and persistent buffers (e.g. the routing bias)
  model.<name of a routed-expert stack>.<id>   one expert's slice, id = GLOBAL expert id
  optim.<name>.{exp_avg,exp_avg_sq,step}       AdamW state, written by the ZeRO owner of the parameter
  optim.<expert stack>.<id>.{exp_avg,exp_avg_sq} and optim.<expert stack>.step
  ema.<name>[.<id>]                            the weight EMA (parallel.ema), written by the ZeRO owner
Every rank asks for the keys of what it holds, so the checkpoint loads into any PP / DP / EP layout or
ZeRO partition of the same model (the stage split and the expert blocks are recomputed from the names).
The directory protocol (step_NNNNNNNN, atomic publish, keep the newest N, stale temporaries, corrupt
checkpoints skipped) is CheckpointStore's; rank 0 does the file-system steps between barriers.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moetron.checkpoint.store import (
    TRAIN_STATE,
    CheckpointStore,
    LoadedCheckpoint,
    load_dcp,
    read_train_state,
    verify_shards,
)


class DistCheckpointStore(CheckpointStore):
    def __init__(self, root: str | Path, trainer, keep: int = 3):
        super().__init__(root, keep)
        self.trainer = trainer

    # ---- the flat state: key -> (tensor DCP reads or writes, where a loaded value goes) -----------------
    def entries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        t = self.trainer
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for stage in t.model.stages.values():
            for name, value in stage.state_dict(keep_vars=True).items():
                value = value.detach()
                if name in t.expert_offset:
                    for i in range(value.shape[0]):
                        out[f"model.{name}.{t.expert_offset[name] + i}"] = (value[i], value[i])
                else:
                    out[f"model.{name}"] = (value, value)
        opt = t.optimizer
        for name in opt.owned:
            state = opt.state_of(name)
            out[f"optim.{name}.step"] = (state["step"], state["step"])
            for moment in ("exp_avg", "exp_avg_sq"):
                value = state[moment]
                if name in t.expert_offset:
                    for i in range(value.shape[0]):
                        out[f"optim.{name}.{t.expert_offset[name] + i}.{moment}"] = (value[i], value[i])
                else:
                    out[f"optim.{name}.{moment}"] = (value, value)
        t.ema_wait()
        for name, value in t.ema.items():
            if name in t.expert_offset:
                for i in range(value.shape[0]):
                    out[f"ema.{name}.{t.expert_offset[name] + i}"] = (value[i], value[i])
            else:
                out[f"ema.{name}"] = (value, value)
        return out

    # ---- save / load ----------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, train_state: dict, before_publish=None) -> Path:
        rank = dist.get_rank()
        final = self.path(step)
        tmp = self.root / f".{final.name}.tmp-dist"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = {key: value.clone() for key, (value, _) in self.entries().items()}  # views: own storage
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp))
        if rank == 0:
            layout = self.trainer.mesh.layout
            with open(tmp / TRAIN_STATE, "w") as f:
                json.dump({**train_state, "has_optimizer": True,
                           "layout": dict(world=layout.world_size, pp=layout.pp, dp=layout.dp, ep=layout.ep,
                                          schedule=self.trainer.cfg.parallel.schedule)}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        if before_publish is not None:
            before_publish()
        dist.barrier()
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def remove_stale(self) -> list[Path]:
        return super().remove_stale() if dist.get_rank() == 0 else []

    def load_latest(self, model, optimizer) -> LoadedCheckpoint | None:
        dist.barrier()  # rank 0 may just have removed stale temporaries
        return super().load_latest(model, optimizer)

    def load(self, path: Path, model, optimizer) -> dict:
        train_state = read_train_state(path)
        verify_shards(path)
        entries = self.entries()
        state = {key: torch.empty_like(value) for key, (value, _) in entries.items()}
        load_dcp(state, path)
        with torch.no_grad():
            for key, (_, target) in entries.items():
                target.copy_(state[key])
        return train_state
