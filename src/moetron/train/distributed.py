"""The distributed trainer: the single-process recipe of trainer.py run with PP x DP (x EP) ranks.

    torchrun --nproc-per-node=4 -m moetron.train parallel=cpu_2x2

What changes against `Trainer` (everything else -- schedules, spike policy, rollback, faults, metrics,
preemption, exact resume -- is the same code):

- model: the full DeepSeekV3 is built with the run's seed exactly as on one process, then split into
  pipeline stages (model/stages.py) for the stage copies this rank holds in the schedule (DualPipe: two);
  with EP > 1 every MoE's routed experts are sharded over the EP group (model/moe_ep.py), whose groups
  for node-limited routing are its nodes. The first and last stage share the embedding Parameter where
  one rank holds both (DualPipe, DualPipeV); elsewhere (1F1B/ZB1P with PP > 1 and MTP) the two copies'
  gradients are summed over a small "embedding" group. With fp8 on, the stages are converted after the
  sharding (this rank's experts run the FP8 grouped GEMMs) and the dispatch payload is sent in FP8.
- step: each DP replica takes its slice of the global batch and runs the schedule's micro-batches
  through the PipelineExecutor (which also sums DualPipe's mirrored stage copies). Then: dense gradients
  are averaged over the DP group, routed-expert gradients over the expert-data-parallel group (same
  divisor: the DP size), the global grad norm is summed over every rank with each parameter counted once,
  all gradients are clipped by it, and ZeRO-1 AdamW (train/zero.py) updates each rank's shard.
- statistics: losses, balance losses and expert loads are summed over the world (every rank holding a
  loss or a MoE copy contributes exactly its own micro-batches), so every rank sees the same numbers and
  makes the same apply/skip/rollback decision; rank 0 alone writes metrics, events and the progress bar.
- checkpoints (train/dist_checkpoint.py): one DCP checkpoint written by all ranks, keyed by the full
  model's parameter names; routed experts are stored one tensor per GLOBAL expert id and optimizer
  moments per parameter, so a checkpoint loads into any PP / DP / EP layout and any ZeRO partition.
"""

from __future__ import annotations

import math
import os
import resource
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from moetron.comm import LinkModel, Transport
from moetron.config import ConfigError, MoetronConfig, invalid
from moetron.model.moe import MoE
from moetron.model.stages import PipelineStage, apply_selective_recompute, share_embedding
from moetron.model.transformer import cross_entropy
from moetron.parallel import PipelineExecutor, StageId, build_schedule
from moetron.parallel.mesh import MeshLayout, ProcessMesh
from moetron.train.dist_checkpoint import DistCheckpointStore
from moetron.train.trainer import Trainer
from moetron.train.zero import ShardGroup, ZeroAdamW


def ranks_per_node_from_env(configured: int, world: int) -> int:
    """parallel.ranks_per_node, else the launcher's local world size (torchrun, Slurm), else the world."""
    if configured:
        return configured
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world


class StagedModel(torch.nn.Module):
    """This rank's stage copies, by StageId; names inside each stage are the full model's."""

    def __init__(self, stages: dict[StageId, PipelineStage]):
        super().__init__()
        self.stage_ids = sorted(stages)
        self.stages = torch.nn.ModuleDict({f"s{s.stage}d{s.direction}": stages[s] for s in self.stage_ids})

    def stage(self, sid: StageId) -> PipelineStage:
        return self.stages[f"s{sid.stage}d{sid.direction}"]

    def by_id(self) -> dict[StageId, PipelineStage]:
        return {sid: self.stage(sid) for sid in self.stage_ids}

    def moe_layers(self) -> list[MoE]:
        seen, found = set(), []
        for stage in self.stages.values():
            for m in stage.moe_layers():
                if id(m) not in seen:
                    seen.add(id(m))
                    found.append(m)
        return found


class _WriterOnly:
    """A log file that only rank 0 writes; the others can still read it."""

    def __init__(self, inner):
        self.inner = inner

    def read(self):
        return self.inner.read()

    def write(self, *args, **kwargs) -> None:
        pass

    def event(self, *args, **kwargs) -> None:
        pass

    def truncate_after(self, *args, **kwargs) -> None:
        pass


class DistributedTrainer(Trainer):
    def __init__(self, config: MoetronConfig, ranks_per_node: int | None = None):
        if not dist.is_initialized():
            raise RuntimeError("DistributedTrainer needs torch.distributed initialized (torchrun sets it up)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ranks_per_node = ranks_per_node_from_env(ranks_per_node or config.parallel.ranks_per_node, self.world)
        self.is_writer = self.rank == 0
        self._executors: dict[int, PipelineExecutor] = {}
        super().__init__(config)

    # ------------------------------------------------------------------------------------ layout
    def setup_parallel(self) -> None:
        cfg, par = self.cfg, self.cfg.parallel
        if par.tp != 1:
            raise invalid("parallel.tp", par.tp, "1",
                          "The trainer has no tensor parallelism (the DeepSeek-V3 layout uses none).")
        if par.world_size != self.world:
            raise ConfigError(
                f"Invalid value for `parallel.pp x parallel.dp x parallel.tp`: {par.pp} x {par.dp} x {par.tp} = "
                f"{par.world_size}, but {self.world} processes were launched (WORLD_SIZE). Valid: a layout whose "
                f"product is {self.world}, or launch {par.world_size} processes (torchrun --nproc-per-node)."
            )
        layout = MeshLayout(self.world, self.ranks_per_node, pp=par.pp, ep=par.ep, tp=1, order=par.rank_order)
        layout.check_experts(cfg.model.n_routed_experts)
        if cfg.train.micro_batch_size * par.dp > cfg.train.batch_ramp_start:
            raise invalid("train.micro_batch_size", cfg.train.micro_batch_size,
                          f"at most train.batch_ramp_start / parallel.dp = {cfg.train.batch_ramp_start // par.dp}",
                          "Every data-parallel replica needs whole micro-batches.")
        self.mesh = ProcessMesh(layout)
        self.pp_index, self.dp_index = self.mesh.coords["pp"], self.mesh.coords["dp"]
        probe = build_schedule(par.schedule, par.pp, 2 * par.pp)
        self.num_stages = probe.num_stages
        self.placement = dict(probe.placement)
        mine = probe.stages_of(self.pp_index)

        full = self.model
        self.moe_ids = {name: i for i, (name, m) in enumerate(
            (n, m) for n, m in full.named_modules() if isinstance(m, MoE))}
        stages = {sid: PipelineStage(full, sid.stage, self.num_stages) for sid in mine}
        firsts = [s for sid, s in stages.items() if sid.stage == 0]
        lasts = [s for sid, s in stages.items() if sid.stage == self.num_stages - 1]
        if firsts and lasts and self.num_stages > 1:
            share_embedding(firsts[0], lasts[0])
        # One transport for every MoE layer of this rank: the link model (parallel.link_model_scale > 0) and
        # the overlap of F&B pairs apply to all of them.
        self.transport = Transport(link=LinkModel(self.ranks_per_node, scale=par.link_model_scale)
                                   if par.link_model_scale > 0 else None)
        if par.ep > 1:
            from moetron.model.moe_ep import apply_expert_parallel

            for stage in stages.values():  # with fp8 on, the dispatch payload travels in E4M3 (SPEC §3.2)
                apply_expert_parallel(stage, self.mesh.ep, par.ep_dispatch, fp8_dispatch=cfg.fp8.enabled,
                                      transport=self.transport)
        # FP8 after the expert sharding, so that this rank's block of experts (a new GroupedExperts) gets the
        # FP8 grouped GEMMs, and before recompute, which wraps the forwards of the modules it finds.
        for stage in stages.values():
            self.apply_fp8(stage)
        if par.recompute:
            for stage in stages.values():
                apply_selective_recompute(stage)
        del full
        self.model = StagedModel(stages)
        self._layer_ids = {}  # id(MoE module) -> global MoE layer index (layers first, then MTP)
        for stage in stages.values():
            for name, m in stage.named_modules():
                if isinstance(m, MoE):
                    self._layer_ids[id(m)] = self.moe_ids[name]
        self._tied_embedding_group()
        self._parameter_table()
        self._setup_overlap()

    def _tied_embedding_group(self) -> None:
        """1F1B/ZB1P with PP > 1 and MTP: stage 0 and the last stage hold separate embedding copies."""
        self.embed_group, self.embed_param = None, None
        last = self.num_stages - 1
        holders = {r for sid, r in self.placement.items() if sid.stage in (0, last)}
        split = any({sid.stage for sid, r in self.placement.items() if r == h} & {0, last} != {0, last}
                    for h in holders)
        if not (split and self.cfg.model.num_nextn_predict_layers > 0):
            return
        layout = self.mesh.layout
        for d in range(layout.dp):
            ranks = sorted(layout.rank_of(p, d) for p in holders)
            group = dist.new_group(ranks)
            if self.rank in ranks:
                self.embed_group = group
        for stage in self.model.stages.values():
            if hasattr(stage, "embed_tokens"):
                self.embed_param = stage.embed_tokens.weight

    def _parameter_table(self) -> None:
        """Unique parameters with their full-model key; expert blocks with their first global expert id."""
        expert_offset = {}
        for moe in self.model.moe_layers():
            for p in moe.experts.parameters():
                expert_offset[id(p)] = getattr(moe, "expert_offset", 0)
        seen, dense, experts = set(), [], []
        for stage in self.model.stages.values():
            for name, p in stage.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                (experts if id(p) in expert_offset else dense).append((name, p))
        self.expert_offset = {name: expert_offset[id(p)] for name, p in experts}
        mesh = self.mesh
        self.shard_groups = [ShardGroup(mesh.dp_ranks, mesh.dp_group, sorted(dense, key=lambda kp: kp[0])),
                             ShardGroup(mesh.edp_ranks, mesh.edp_group, sorted(experts, key=lambda kp: kp[0]))]
        # Count each parameter once in the global grad norm: one pipeline copy (the lowest pp index that
        # holds the key) and, inside its replica group, the member that owns it under the ZeRO partition.
        keys = {name for name, _ in dense + experts}
        gathered = [None] * len(mesh.pp_ranks)
        dist.all_gather_object(gathered, (self.pp_index, sorted(keys)), group=mesh.pp_group)
        first_holder = {}
        for pp_index, names in sorted(gathered):
            for name in names:
                first_holder.setdefault(name, pp_index)
        self.norm_params = []
        for g in self.shard_groups:
            for (name, p), owner in zip(g.params, g.owners()):
                if g.ranks[owner] == self.rank and first_holder[name] == self.pp_index:
                    self.norm_params.append(p)
        # Every MoE layer's canonical holder (lowest global rank) reports its bias for the metrics.
        local_layers = sorted(set(self._layer_ids.values()))
        everyone = [None] * self.world
        dist.all_gather_object(everyone, local_layers)
        self.num_moe_layers = len(self.moe_ids)
        self.bias_reporter = {}
        for rank, layers in enumerate(everyone):
            for i in layers:
                self.bias_reporter.setdefault(i, rank)

    def build_optimizer(self):
        optimizer = ZeroAdamW(self.shard_groups, self.cfg.train.optim, self.rank, shard=self.cfg.parallel.zero1)
        optimizer.init_state()
        # EMA of the weights this rank owns under ZeRO (1/dp of them), in CPU memory, updated on a
        # background thread after each applied step (waited for before the next update touches the weights).
        self.ema: dict[str, torch.Tensor] = {}
        self._ema_pending: Future | None = None
        if self.cfg.parallel.ema:
            self._ema_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetron-ema")
            self.ema = {key: p.detach().to("cpu", copy=True) for key, p in optimizer.owned.items()}
        return optimizer

    def after_update(self) -> None:
        if not self.ema:
            return
        self.ema_wait()
        decay, owned = self.cfg.parallel.ema_decay, self.optimizer.owned

        @torch.no_grad()
        def update():
            for key, avg in self.ema.items():
                avg.lerp_(owned[key].detach().to("cpu", non_blocking=True), 1.0 - decay)

        self._ema_pending = self._ema_worker.submit(update)

    def ema_wait(self) -> None:
        if self._ema_pending is not None:
            self._ema_pending.result()
            self._ema_pending = None

    def train_step(self) -> dict:
        record = super().train_step()
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record["peak_rss_mb"] = peak.item()  # the largest peak resident memory of any rank
        return record

    def build_checkpoints(self):
        return DistCheckpointStore(self.run_dir / "checkpoints", self, keep=self.cfg.run.keep_checkpoints)

    def log_file(self, kind, name: str):
        inner = kind(self.run_dir / name)
        return inner if self.is_writer else _WriterOnly(inner)

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------------------------ a step
    def batch_size(self) -> int:
        """The ramp's size rounded down to whole micro-batches per replica (an even number of them for
        DualPipe), at least the schedule's minimum."""
        train, par = self.cfg.train, self.cfg.parallel
        quantum = par.dp * train.micro_batch_size * (2 if par.schedule == "dualpipe" else 1)
        least = par.dp * train.micro_batch_size * (2 * par.pp if par.schedule.startswith("dualpipe") else 1)
        return max(super().batch_size() // quantum * quantum, least)

    def executor(self, num_micro: int) -> PipelineExecutor:
        if num_micro not in self._executors:
            try:
                schedule = build_schedule(self.cfg.parallel.schedule, self.cfg.parallel.pp, num_micro)
            except ValueError as err:
                raise ConfigError(
                    f"Invalid value for `train.micro_batch_size`: {self.cfg.train.micro_batch_size}. Each of the "
                    f"{self.cfg.parallel.dp} data-parallel replicas gets {num_micro} micro-batches, which "
                    f"parallel.schedule={self.cfg.parallel.schedule} rejects: {err}"
                ) from err
            self._executors[num_micro] = PipelineExecutor(
                schedule, self.model.by_id(), self._loss_fn, group=self.mesh.pp_group,
                forward_backward=self._overlap_hook())
        return self._executors[num_micro]

    def _overlap_hook(self):
        """parallel.overlap with EP: moetron.comm.overlap's F&B hook (each all-to-all of one chunk in flight
        while the other chunk computes; bitwise equal to the sequential pair). Else the sequential F&B."""
        return self._overlapped

    def _setup_overlap(self) -> None:
        """COLLECTIVE: twin EP groups for the backward side of overlapped F&B pairs."""
        self._overlapped = None
        if not (self.cfg.parallel.overlap and self.cfg.parallel.ep > 1):
            return
        from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap

        enable_overlap(self.transport, self.mesh.ep, self.mesh.layout.ep_groups(), self.ranks_per_node)
        # B then W inside a pair only without FP8: our FP8 GEMMs compute dgrad and wgrad in one backward, so a
        # split would run them twice (measured: make train 20% slower).
        self._overlapped = OverlappedForwardBackward(self.transport, split_backward=not self.cfg.fp8.enabled)

    def _loss_fn(self, out, target: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        lm_loss, mtp_loss = out.stage.losses(out.hidden, target[:, :-1], target[:, 1:], ctx["mtp_lambda"])
        loss = lm_loss + mtp_loss if mtp_loss is not None else lm_loss
        if ctx["loss_factor"] != 1.0:
            loss = loss * ctx["loss_factor"]
        ctx["sums"] += torch.tensor([loss.item(), lm_loss.item(), mtp_loss.item() if mtp_loss is not None else 0.0],
                                    dtype=torch.float64)
        return loss / ctx["num_micro"]

    def my_slice(self, batch: torch.Tensor) -> torch.Tensor:
        per = batch.shape[0] // self.mesh.layout.dp
        return batch[self.dp_index * per:(self.dp_index + 1) * per]

    def accumulate_gradients(self, batch: torch.Tensor, mtp_lambda: float, loss_factor: float) -> dict:
        mbs = self.cfg.train.micro_batch_size
        mine = self.my_slice(batch)
        micro = list(mine.split(mbs))
        executor = self.executor(len(micro))
        for moe in self.moe_layers():
            moe.aux_loss_scale = 1.0 / len(micro)
        self._ctx = dict(mtp_lambda=mtp_lambda, loss_factor=loss_factor, num_micro=len(micro),
                         sums=torch.zeros(3, dtype=torch.float64))
        self.model.train()
        holds = {sid.stage for sid in self.model.stage_ids}
        inputs = [m[:, :-1] for m in micro] if 0 in holds else None
        targets = micro if self.num_stages - 1 in holds else None
        with self.autocast():
            executor.step(inputs, targets)
        sums = self._ctx["sums"]
        dist.all_reduce(sums)
        total_micro = batch.shape[0] // mbs
        self.reduce_gradients()
        return {"loss": sums[0].item() / total_micro, "lm_loss": sums[1].item() / total_micro,
                "mtp_loss": sums[2].item() / total_micro}

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        if self.embed_group is not None and self.embed_param is not None:
            grad = _grad(self.embed_param)
            dist.all_reduce(grad, group=self.embed_group)
            self.embed_param.grad = grad
        dp = self.mesh.layout.dp
        for g in self.shard_groups:
            params = [p for _, p in g.params]
            if not params:
                continue
            flat = torch.cat([_grad(p).reshape(-1) for p in params])
            if len(g.ranks) > 1:
                dist.all_reduce(flat, group=g.group)
            if dp > 1:
                flat /= dp
            offset = 0
            for p in params:
                p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    @torch.no_grad()
    def clip_gradients(self) -> float:
        self.ema_wait()  # the optimizer step that follows writes the weights the EMA thread reads
        local = torch.zeros((), dtype=torch.float64)
        for p in self.norm_params:
            if p.grad is not None:
                local += p.grad.double().pow(2).sum()
        dist.all_reduce(local)
        norm = math.sqrt(local.item()) if math.isfinite(local.item()) else float("nan")
        clip = self.cfg.train.optim.grad_clip or float("inf")
        coef = min(clip / (norm + 1e-6), 1.0) if math.isfinite(norm) else float("nan")
        for g in self.shard_groups:
            for _, p in g.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def moe_statistics(self, micro_batches: int) -> tuple[float, list[torch.Tensor]]:
        table = torch.zeros(self.num_moe_layers, self.cfg.model.n_routed_experts, dtype=torch.float64)
        bal = torch.zeros(1, dtype=torch.float64)
        for moe in self.moe_layers():
            table[self._layer_ids[id(moe)]] += moe.tokens_per_expert.double()
            bal += moe.balance_loss_sum.double()
        packed = torch.cat([bal, table.flatten()])
        dist.all_reduce(packed)
        loads = packed[1:].view_as(table).float()
        return packed[0].item() / micro_batches, list(loads.unbind(0))

    def update_biases(self, loads: list[torch.Tensor], gamma: float) -> None:
        for moe in self.moe_layers():
            moe.update_bias(loads[self._layer_ids[id(moe)]], gamma)

    def bias_table(self) -> torch.Tensor | None:
        if not self.num_moe_layers:
            return None
        table = torch.zeros(self.num_moe_layers, self.cfg.model.n_routed_experts)
        for moe in self.moe_layers():
            i = self._layer_ids[id(moe)]
            if self.bias_reporter[i] == self.rank:
                table[i] = moe.gate.e_score_correction_bias
        dist.all_reduce(table)
        return table.flatten()

    def stop_requested(self) -> bool:
        flag = torch.tensor([1 if self.stop_signal is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.stop_signal is None:
            self.stop_signal = "peer"
        return bool(flag.item())

    # ------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token loss on held-out micro-batches, through the direction-0 copies of the stages;
        the micro-batches are dealt over the DP replicas (a multiple of dp of them is used)."""
        if self.data.val is None:
            return float("nan")
        self.model.eval()
        train, dp = self.cfg.train, self.mesh.layout.dp
        count = min(train.eval_batches * train.micro_batch_size, self.data.val.num_sequences)
        micros = list(self.data.val.batch(0, count, shuffle=False).split(train.micro_batch_size))
        micros = micros[: len(micros) // dp * dp] or micros[:1]
        mine = micros[self.dp_index::dp] if len(micros) >= dp else micros
        pp_ranks = self.mesh.pp_ranks
        total = torch.zeros(2, dtype=torch.float64)
        for micro in mine:
            h = None
            for s in range(self.num_stages):
                holder = self.placement[StageId(s, 0)]
                if holder != self.pp_index:
                    continue
                if s > 0 and self.placement[StageId(s - 1, 0)] != self.pp_index:
                    h = torch.empty(micro.shape[0], micro.shape[1] - 1, self.cfg.model.hidden_size)
                    dist.recv(h, src=pp_ranks[self.placement[StageId(s - 1, 0)]], group=self.mesh.pp_group)
                stage = self.model.stage(StageId(s, 0))
                with self.autocast():
                    out = stage(micro[:, :-1] if s == 0 else h)
                if s == self.num_stages - 1:
                    with self.autocast():
                        total[0] += cross_entropy(stage.logits(out.hidden), micro[:, 1:]).item()
                    total[1] += 1
                    continue
                h = out.float()
                nxt = self.placement[StageId(s + 1, 0)]
                if nxt != self.pp_index:
                    dist.send(h, dst=pp_ranks[nxt], group=self.mesh.pp_group)
        if len(micros) < dp and self.dp_index > 0:
            total.zero_()  # too few micro-batches to deal: every replica ran the same one, count it once
        dist.all_reduce(total)
        return total[0].item() / max(total[1].item(), 1.0)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
