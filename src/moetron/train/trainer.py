"""The trainer: the DeepSeek-V3 recipe (arXiv 2412.19437 §4.2) on any layout, one process included.

    python -m moetron.train model=tiny                                   # one process: pp = dp = ep = 1
    torchrun --nproc-per-node=4 -m moetron.train parallel=cpu_2x2        # DualPipe pp 2 x dp 2, EP 2

One loop for every layout (nanoGPT's habit; one process is the smallest layout, not another class):
- set-up: the device and process group (moetron.device), the mesh, the full model built on the meta device
  and cut to this rank's stages and experts by `parallelize`, then only that part materialized in
  train.param_dtype and initialized as one process would (model/init.py); ZeRO-1 AdamW (train/zero.py);
- a step: this replica's slice of the (ramped) batch runs through the PipelineExecutor's schedule, gradients
  accumulating in FP32 (`main_grad`); losses, balance losses and expert loads are summed over the world, so
  every rank makes the same decision; each gradient is reduce-scattered over the ranks holding its tensor
  (DP or expert-DP replicas, DualPipe's mirror copy, the embedding's copy) and averaged over DP; the global
  grad norm counts each element once (its shard); the step is judged (NaN/Inf, loss and grad-norm spikes)
  and applied (shard update, all-gather), skipped or rolled back; the aux-loss-free bias update follows;
- checkpoints in the one format of every layout (checkpoint/state.py), so any run resumes in any layout;
- the step's phases and its waits on EP and DP communication are timed (train/timing.py) and gathered from
  every rank with the memory peaks (train/perf.py);
- rank 0 alone writes metrics, events and the progress bar.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from moetron import device as dev
from moetron.checkpoint import CheckpointStore
from moetron.checkpoint.state import FlatChunk, expert_offsets, model_entries
from moetron.comm import FlightRecorder, LinkModel, Transport
from moetron.config import ConfigError, MoetronConfig, invalid
from moetron.config.data import data_seed
from moetron.config.hydra import to_yaml
from moetron.config.layout import check_layout, config_fields
from moetron.data import build_data
from moetron.model import DeepSeekV3, max_violation
from moetron.model.flops import achieved_tflops_per_device, mfu_per_device, training_flops_per_token
from moetron.model.moe import MoE
from moetron.model.stages import stages_holding
from moetron.model.transformer import cross_entropy
from moetron.monitor import FaultInjector, SpikeDetector, Verdict
from moetron.monitor.watchdog import HangWatchdog
from moetron.parallel import PipelineExecutor, build_schedule
from moetron.parallel.mesh import KINDS, ProcessMesh
from moetron.train import perf, schedules
from moetron.train.ema import WeightEMA
from moetron.train.logs import EventLog, JsonLines
from moetron.train.parallelize import materialize, parallelize
from moetron.train.run_lock import RunDirLock
from moetron.train.timing import PhaseClock, WaitClock
from moetron.train.zero import ShardGroup, ZeroAdamW

BACKEND_TIMEOUT_FLOOR_S = 300.0  # the process group's timeout is 2 x parallel.comm_timeout, at least this
COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # train.precision -> autocast dtype
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # train.param_dtype


class Diverged(RuntimeError):
    """train.max_nonfinite_steps consecutive steps had a NaN/Inf loss or gradient: the run stops (exit 1),
    its checkpoints hold only finite weights (a non-finite step is never applied)."""


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs. `tokens` counts trained tokens
    (the schedules' clock); `sequences` is the data cursor, which a rollback moves past skipped batches."""

    step: int = 0
    tokens: int = 0
    sequences: int = 0
    rollbacks: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        return cls(**{name: saved.get(name, 0) for name in cls.__dataclass_fields__})


def ranks_per_node_from_env(configured: int, world: int) -> int:
    """parallel.ranks_per_node, else the launcher's local world size (torchrun, Slurm), else the world."""
    if configured:
        return configured
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world


def start_runtime(config: MoetronConfig) -> dev.Runtime:
    """The device (run.device) and the process group: a world of one when no launcher started us; for a dry
    run, rank run.rank of the layout's world over the fake process group."""
    run, world = config.run, config.parallel.world_size
    try:
        if run.dry_run:
            if run.rank >= world:
                raise invalid("run.rank", run.rank, f"a rank of the layout, 0 to {world - 1}",
                              f"parallel.pp x parallel.dp x parallel.tp = {world}.")
            return dev.start_fake(run.device, run.rank, world)
        # The backend's own timeout is a backstop behind the watchdog, which fires first and says more; it also
        # bounds the start-up rendezvous, hence the floor (ranks of a loaded machine start slowly).
        return dev.start(run.device, timeout_s=max(2 * config.parallel.comm_timeout, BACKEND_TIMEOUT_FLOOR_S))
    except ValueError as err:
        raise invalid("run.device", config.run.device, " | ".join(dev.DEVICES), str(err).capitalize() + ".") from err


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


class Trainer:
    def __init__(self, config: MoetronConfig, ranks_per_node: int | None = None):
        started = time.perf_counter()
        self.cfg = config
        self.dry_run = config.run.dry_run  # build this rank, count its bytes, stop (train/dry_run.py)
        self.run_dir = Path(config.run.dir)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.runtime = start_runtime(config)
        self.device, self.rank, self.world = self.runtime.device, self.runtime.rank, self.runtime.world_size
        # This rank's recent collectives, for the hang watchdog (started by fit; monitor/watchdog.py).
        self.flight = FlightRecorder(self.rank)
        self.watchdog: HangWatchdog | None = None
        self.is_writer = self.rank == 0
        self.autocast_dtype = COMPUTE_DTYPES[config.train.precision]
        self.mesh = self.build_mesh(ranks_per_node_from_env(ranks_per_node or config.parallel.ranks_per_node,
                                                            self.world))
        self._name_groups()
        self.data_seed = data_seed(config.data, config.run.seed)  # the batch order's; run.seed sets the initialization
        self.data = None if self.dry_run else build_data(config.data, config.train.seq_len, self.data_seed)
        if self.data is not None and self.data.tokenizer.vocab_size > config.model.vocab_size:
            raise invalid("model.vocab_size", config.model.vocab_size, f"at least {self.data.tokenizer.vocab_size}",
                          f"The tokenizer has {self.data.tokenizer.vocab_size} tokens.")
        torch.manual_seed(config.run.seed)
        with torch.device("meta"):  # the full model costs no memory; this rank materializes only its part
            full = DeepSeekV3(config.model)
        self.moe_ids = {name: i for i, name in enumerate(n for n, m in full.named_modules() if isinstance(m, MoE))}
        par = config.parallel
        # One transport for every MoE layer of this rank: the link model and the overlap apply to all of them.
        self.transport = Transport(link=LinkModel(self.mesh.layout.ranks_per_node, scale=par.link_model_scale)
                                   if par.link_model_scale > 0 else None, flight=self.flight)
        with config_fields():
            staged = parallelize(full, self.mesh, config, self.transport)
        del full
        self.param_dtype = PARAM_DTYPES[config.train.param_dtype]
        self.model = materialize(staged, self.device, config.run.seed, config.model.initializer_range,
                                 self.param_dtype)
        self.num_stages, self.placement = self.model.num_stages, self.model.placement
        self._parameter_table()
        # A dry run counts the optimizer's buffers from their shapes instead of allocating them.
        self.optimizer = ZeroAdamW(self.shard_groups, config.train.optim, self.rank, shard=par.zero1,
                                   allocate=not self.dry_run, flight=self.flight)
        self.build_seconds = time.perf_counter() - started
        if self.dry_run:
            return
        for p in self.optimizer.all_params:  # autograd's .grad (param dtype) -> the FP32 main_grad, each backward
            p.register_post_accumulate_grad_hook(_to_main_grad)
        # parallel.ema: the EMA of this rank's FP32 master shard, in host memory (train/ema.py).
        self.ema = WeightEMA(self.optimizer.master_pieces(), par.ema_decay) if par.ema else None
        # run.async_checkpoint: background writes plan over a gloo group of their own, so that their
        # collectives never interleave with the training thread's on the same group. COLLECTIVE.
        async_group = dist.new_group(backend="gloo") if config.run.async_checkpoint else None
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoints", keep=config.run.keep_checkpoints,
                                           rank=self.rank, barrier=self.barrier,
                                           process_group=self.runtime.object_group, async_group=async_group)
        self.pending_save = None  # the background save in flight (run.async_checkpoint), at most one
        self.metrics = self.log_file(JsonLines, "metrics.jsonl")
        self.expert_loads = self.log_file(JsonLines, "expert_load.jsonl")
        self.rank_metrics = self.log_file(JsonLines, "ranks.jsonl")  # per-rank memory, step time, comm waits
        # Where a step's time goes: its phases, and the waits on EP all-to-alls and DP (ZeRO) collectives.
        self.phases = PhaseClock(self.device)
        self.transport.wait_clock = WaitClock(self.device)
        self.optimizer.comm_clock = WaitClock(self.device)
        self.events = self.log_file(EventLog, "events.jsonl")
        self.detector = SpikeDetector(config.monitor.spike)
        fired = {(e["step"], e["kind"]) for e in self.events.read() if e["event"] == "fault"}
        self.faults = FaultInjector(config.monitor.faults, fired,
                                    on_fire=lambda step, kind: self.events.event("fault", step, kind=kind))
        self.flops_per_token = training_flops_per_token(config.model, config.train.seq_len)
        self._executors: dict[int, PipelineExecutor] = {}
        self._overlapped = self._setup_overlap()
        self.sink = None
        self.stop_signal: str | None = None  # set by SIGUSR1/SIGTERM: finish the step, checkpoint, exit
        self.state = TrainState()
        self.nonfinite_streak = 0  # consecutive steps skipped for a NaN/Inf loss or gradient

    # ------------------------------------------------------------------------------------ layout
    def build_mesh(self, ranks_per_node: int) -> ProcessMesh:
        # The same check as `moetron.slurm render` and `moetron.plan` (config/layout.py), against the launch.
        launch = ("this is one process; launch them with torchrun --nproc-per-node" if self.world == 1
                  else f"{self.world} processes were launched (WORLD_SIZE)")
        layout = check_layout(self.cfg, self.world, ranks_per_node, launch)
        with config_fields():
            mesh = ProcessMesh(layout.mesh)
        self.pp_index, self.dp_index = mesh.coords["pp"], mesh.coords["dp"]
        return mesh

    def _name_groups(self) -> None:
        """Name the mesh's process groups in the flight records ("pp", "ep rail", ...)."""
        groups = [(getattr(self.mesh, f"{kind}_group", None), kind) for kind in KINDS]
        ep = self.mesh.ep
        groups += [(ep.group, "ep"), (ep.rail, "ep rail"), (ep.intra, "ep intra")]
        for group, name in groups:
            if group is not None and not self.dry_run:
                self.flight.name_group(group, name)

    def _pp_holders(self, name: str) -> list[int]:
        """The pipeline ranks holding the full-model tensor `name` (DualPipe: two; the embedding with MTP: the
        ranks of stage 0 and of the last stage)."""
        cfg = self.cfg.model
        stages = stages_holding(name, cfg.num_hidden_layers, self.num_stages, cfg.num_nextn_predict_layers)
        return sorted({pp for sid, pp in self.placement.items() if sid.stage in stages})

    def _first_holder(self, name: str) -> int:
        """The lowest pipeline index holding the full-model tensor `name` (the copy that reports it)."""
        return self._pp_holders(name)[0]

    def _holders(self, pp_ranks, kind: str, dp_index: int) -> tuple[int, ...]:
        """Global ranks holding what pipeline ranks `pp_ranks` hold at `dp_index`: their `kind` replica groups
        (dp for dense parameters, edp for routed experts)."""
        layout = self.mesh.layout
        return tuple(sorted(r for pp in pp_ranks for r in self._replicas[kind][layout.rank_of(pp, dp_index)]))

    def _parameter_table(self) -> None:
        """Unique parameters by full-model key, grouped by the ranks that hold them (ZeRO-1 groups: DP or EDP
        replicas, DualPipe's mirror copies, the embedding's copy on the last stage); which MoE layers' biases
        this rank reports. COLLECTIVE: creates the process group of every holder set of the layout."""
        layout = self.mesh.layout
        self._replicas = {kind: {r: g for g in getattr(layout, f"{kind}_groups")() for r in g} for kind in ("dp", "edp")}
        self.expert_offset: dict[str, int] = {}
        for stage in self.model.stages.values():
            self.expert_offset.update(expert_offsets(stage))
        held: dict[tuple[int, ...], list] = {}
        seen = set()
        for stage in self.model.stages.values():
            for name, p in stage.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    kind = "edp" if name in self.expert_offset else "dp"
                    held.setdefault(self._holders(self._pp_holders(name), kind, self.dp_index), []).append((name, p))
        groups = self._holder_groups()
        self.shard_groups = [
            ShardGroup(list(ranks), groups.get(ranks), sorted(params, key=lambda kp: kp[0]),
                       {name: self.expert_offset[name] for name, _ in params if name in self.expert_offset})
            for ranks, params in sorted(held.items())]
        self._layer_ids = {}  # id(MoE module) -> global MoE layer index (layers first, then MTP)
        self._reports_bias = set()  # the MoE layers whose bias this rank reports (first holder, replica 0)
        for stage in self.model.stages.values():
            for name, m in stage.named_modules():
                if isinstance(m, MoE):
                    self._layer_ids[id(m)] = self.moe_ids[name]
                    if self.dp_index == 0 and self._first_holder(f"{name}.gate.weight") == self.pp_index:
                        self._reports_bias.add(self.moe_ids[name])

    def _holder_groups(self) -> dict[tuple[int, ...], dist.ProcessGroup]:
        """A process group for every set of holders in the layout (of more than one rank), created in the same
        order on every rank. COLLECTIVE."""
        cfg = self.cfg.model
        pp_sets = {tuple(sorted({pp for sid, pp in self.placement.items() if sid.stage == s}))
                   for s in range(self.num_stages)}
        if cfg.num_nextn_predict_layers:
            pp_sets.add(tuple(self._pp_holders("embed_tokens.weight")))
        sets = {self._holders(pps, kind, d) for pps in pp_sets for kind in ("dp", "edp")
                for d in range(self.mesh.layout.dp)}
        return {ranks: dist.new_group(list(ranks)) for ranks in sorted(sets) if len(ranks) > 1}

    def _setup_overlap(self):
        """parallel.overlap with EP: moetron.comm.overlap's F&B hook (each all-to-all of one chunk in flight
        while the other chunk computes; bitwise equal to the sequential pair). COLLECTIVE (twin EP groups)."""
        if not (self.cfg.parallel.overlap and self.cfg.parallel.ep > 1):
            return None
        from moetron.comm.overlap import OverlappedForwardBackward, enable_overlap

        enable_overlap(self.transport, self.mesh.ep, self.mesh.layout.ep_groups(), self.mesh.layout.ranks_per_node)
        # B then W inside a pair, FP8 included: B runs only the Dgrad GEMMs, the W only the Wgrad ones.
        return OverlappedForwardBackward(self.transport, split_backward=True)

    def layout(self) -> dict:
        par = self.cfg.parallel
        return dict(world=self.world, pp=par.pp, dp=par.dp, ep=par.ep, schedule=par.schedule)

    def log_file(self, kind, name: str):
        inner = kind(self.run_dir / name)
        return inner if self.is_writer else _WriterOnly(inner)

    def barrier(self) -> None:
        with self.flight.op("barrier", self.runtime.object_group):
            dist.barrier(group=self.runtime.object_group)

    def all_reduce(self, tensor: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> None:
        """dist.all_reduce over the world, in the flight recorder as `what`."""
        with self.flight.op("all_reduce", what=what, nbytes=tensor.numel() * tensor.element_size()):
            dist.all_reduce(tensor, op=op)

    def moe_layers(self) -> list[MoE]:
        return self.model.moe_layers()

    # ------------------------------------------------------------------------------ checkpoints
    def state_entries(self) -> dict[str, torch.Tensor]:
        """This rank's part of the checkpoint: key -> live tensor (checkpoint/state.py's keys)."""
        out: dict[str, torch.Tensor] = {}
        for stage in self.model.stages.values():
            out.update(model_entries(stage))
        optimizer = self.optimizer.entries()
        out.update(optimizer)
        if self.ema is not None:
            self.ema.wait()
            for key, value in self.ema.averages.items():
                master = optimizer[f"master.{key}"]
                out[f"ema.{key}"] = FlatChunk(value, master.offset, master.length, master.chunks)
        return out

    def has_masters(self) -> bool:
        """Checkpoints keep the FP32 masters only when the parameters are not FP32 themselves."""
        return self.param_dtype != torch.float32

    def after_load(self, train_state: dict) -> None:
        """FP32 parameters (or a checkpoint without masters) are the masters' source."""
        if not train_state.get("has_masters", False):
            self.optimizer.load_masters()

    def save(self, wait: bool = False) -> None:
        """Checkpoint the state after this step. With run.async_checkpoint the write runs in the background
        (published later by `poll_save` or `publish_save`) unless `wait`; the previous one is published first."""
        self.publish_save()
        step = self.state.step
        train_state = {**asdict(self.state), "has_optimizer": True, "has_masters": self.has_masters(),
                       "layout": self.layout(), "spike_history": self.detector.state()}
        crash = self.faults.checkpoint_hook(step)
        if not self.cfg.run.async_checkpoint:
            path = self.checkpoints.save(step, self.state_entries(), train_state, before_publish=crash)
            self.events.event("checkpoint", step, path=str(path))
            return
        self.pending_save = self.checkpoints.save_async(step, self.state_entries(), train_state, during_write=crash)
        if wait:
            self.publish_save()

    def poll_save(self) -> None:
        """At a step boundary: publish the background save once every rank's write has ended (a collective
        verdict, as publishing is collective); otherwise train on."""
        if self.pending_save is None:
            return
        done = torch.tensor([1 if self.pending_save.done() else 0], device=self.device)
        self.all_reduce(done, "background save done", op=dist.ReduceOp.MIN)
        if done.item():
            self.publish_save()

    def publish_save(self) -> None:
        """Wait for the background save in flight, if any, and publish it (a failed write: ConfigError)."""
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            path = self.checkpoints.publish(pending)
            self.events.event("checkpoint", pending.step, path=str(path), published_at_step=self.state.step)

    def abandon_save(self) -> None:
        """The run failed: let the background write end (it uses the process group) without publishing it;
        its temporary directory is removed when the run is resumed."""
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            pending.write.exception()  # waits; its error, if any, is not this run's failure

    # ----------------------------------------------------------------------------------------- set-up
    def save_every(self) -> int:
        return self.cfg.run.save_every or max(1, self.cfg.train.steps // 4)

    def start(self) -> None:
        """Create the run directory, or resume from its newest complete checkpoint (saved by any layout)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_run_dir()
        self._check_same_model()
        self.barrier()  # every rank has compared against the saved config before the writer replaces it
        if self.is_writer:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            for stale in self.checkpoints.remove_stale():
                self.events.event("checkpoint_discarded", self.state.step, path=str(stale), reason="never published")
        loaded = self.checkpoints.load_latest(self.state_entries())
        if loaded is None:
            self._truncate_logs(0)
            params = sum(p.numel() for g in self.shard_groups for _, p in g.params)
            self.events.event("start", 0, pid=os.getpid(), params_on_rank0=params, layout=self.layout())
        else:
            self._resumed(loaded)
        if self.is_writer and self.cfg.monitor.wandb and self.cfg.monitor.wandb_mode != "disabled":
            from moetron.monitor.wandb_sink import WandbSink

            self.sink = WandbSink(self.cfg.monitor, self.run_dir,
                                  OmegaConf.to_container(OmegaConf.structured(self.cfg)))

    def _resumed(self, loaded) -> None:
        self.after_load(loaded.train_state)
        self.state = TrainState.from_dict(loaded.train_state)
        self.detector.load_state(loaded.train_state.get("spike_history", []))
        for reason in loaded.skipped:
            self.events.event("checkpoint_skipped", self.state.step, reason=reason)
        self._truncate_logs(self.state.step)  # steps logged after the checkpoint will be redone
        self.events.event("resume", self.state.step, pid=os.getpid(), checkpoint=str(loaded.path),
                          restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
        saved_layout = loaded.train_state.get("layout")  # None: an HF import
        if saved_layout != self.layout():  # any layout resumes any checkpoint: a note, never an error
            self.events.event("layout_change", self.state.step, old=saved_layout, new=self.layout())

    def _lock_run_dir(self) -> None:
        """Refuse to share run.dir with another trainer (rank 0 holds the lock; every rank learns the verdict)."""
        self.run_lock = RunDirLock(self.run_dir)
        # With the lock's verdict rank 0 sends the launch's name: the flight records of this launch carry it.
        holder = [self.run_lock.acquire() if self.is_writer else None, f"{os.getpid()}@{time.time():.6f}"]
        if self.world > 1:
            with self.flight.op("broadcast", self.runtime.object_group, what="run.dir lock"):
                dist.broadcast_object_list(holder, src=0, group=self.runtime.object_group)
        if self.watchdog is not None:
            self.watchdog.incarnation = holder[1]
        if holder[0] is not None:
            raise invalid("run.dir", str(self.run_dir), "a run directory no other trainer is using (wait for that "
                          "run to end or stop it, or choose another run.dir)",
                          f"Another trainer is training in it: {holder[0]}.")

    def _truncate_logs(self, step: int) -> None:
        self.metrics.truncate_after(step)
        self.expert_loads.truncate_after(step)
        self.rank_metrics.truncate_after(step)

    def _check_same_model(self) -> None:
        """Resuming with another model shape would fail deep inside the loader: say which field changed."""
        saved = self.run_dir / "config.yaml"
        if not saved.exists() or not self.checkpoints.complete():
            return
        old, new = OmegaConf.load(saved), OmegaConf.structured(self.cfg)
        for name in ("model", "train.seq_len", "data.tokenizer", "fp8"):
            before, now = OmegaConf.select(old, name), OmegaConf.select(new, name)
            if before != now:
                show = [OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for v in (before, now)]
                raise ConfigError(
                    f"Invalid value for `{name}` when resuming {self.run_dir}: the checkpoints were made with "
                    f"{show[0]!r}, this run asks for {show[1]!r}. Valid: the same value, or a new run.dir."
                )

    # ------------------------------------------------------------------------------------------ steps
    def autocast(self):
        return dev.autocast(self.device, self.autocast_dtype)

    def batch_size(self) -> int:
        """The ramp's size (§4.2) rounded down to whole micro-batches per replica, in the schedule's multiples
        and at least its minimum."""
        train, dp = self.cfg.train, self.cfg.parallel.dp
        quantum = dp * train.micro_batch_size * self.micro_batch_quantum()
        ramp = schedules.batch_size(train, self.state.tokens)
        return max(ramp // quantum * quantum, dp * train.micro_batch_size * self.least_micro_batches())

    def micro_batch_quantum(self) -> int:
        """Micro-batches per replica come in multiples of this (DualPipe: an even number)."""
        return 2 if self.cfg.parallel.schedule == "dualpipe" else 1

    def least_micro_batches(self) -> int:
        """The fewest micro-batches per replica the schedule runs (DualPipe, DualPipeV: 2 x pp)."""
        par = self.cfg.parallel
        return 2 * par.pp if par.schedule.startswith("dualpipe") else 1

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
                forward_backward=self._overlapped, device=self.device, sum_copies=False, flight=self.flight)
        return self._executors[num_micro]

    def _loss_fn(self, out, target: torch.Tensor) -> torch.Tensor:
        """The last stage's loss for one micro-batch: lm + MTP (training) or lm alone (validation). The
        sums stay on the device (no host sync per micro-batch)."""
        ctx = self._ctx
        if ctx["eval"]:
            lm_loss = cross_entropy(out.stage.logits(out.hidden), target[:, 1:])
            ctx["sums"][0] += lm_loss.detach().double()
            return lm_loss
        lm_loss, mtp_loss = out.stage.losses(out.hidden, target[:, :-1], target[:, 1:], ctx["mtp_lambda"])
        loss = lm_loss + mtp_loss if mtp_loss is not None else lm_loss
        if ctx["loss_factor"] != 1.0:
            loss = loss * ctx["loss_factor"]
        zero = torch.zeros((), device=loss.device)
        ctx["sums"] += torch.stack([loss.detach(), lm_loss.detach(),
                                    mtp_loss.detach() if mtp_loss is not None else zero]).double()
        return loss / ctx["num_micro"]

    def my_micro_batches(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """This DP replica's slice of the global batch, on the device, cut into micro-batches."""
        per = batch.shape[0] // self.mesh.layout.dp
        mine = dev.to_device(batch[self.dp_index * per:(self.dp_index + 1) * per], self.device)
        return list(mine.split(self.cfg.train.micro_batch_size))

    def run_pipeline(self, micro: list[torch.Tensor], forward_only: bool = False):
        """Run this rank's part of the schedule over the micro-batches (inputs where it holds stage 0,
        targets where it holds the last stage)."""
        inputs = [m[:, :-1] for m in micro] if self.model.holds(0) else None
        targets = micro if self.model.holds(self.num_stages - 1) else None
        with self.autocast():
            return self.executor(len(micro)).step(inputs, targets, forward_only=forward_only)

    def accumulate_gradients(self, batch: torch.Tensor, mtp_lambda: float, loss_factor: float) -> dict:
        """Forward + backward over this replica's micro-batches; the step's losses are means over the
        global batch, and gradients are reduced over the replicas."""
        micro = self.my_micro_batches(batch)
        for moe in self.moe_layers():
            moe.aux_loss_scale = 1.0 / len(micro)
        self._ctx = dict(eval=False, mtp_lambda=mtp_lambda, loss_factor=loss_factor, num_micro=len(micro),
                         sums=torch.zeros(3, dtype=torch.float64, device=self.device))
        self.model.train()
        self.optimizer.zero_grad()
        self.run_pipeline(micro)
        sums = self._ctx["sums"]
        self.all_reduce(sums, "loss sums")
        # Each holder's FP32 gradients summed into the shard owners (DP replicas, DualPipe's two copies, the
        # embedding's copies) and averaged over the data-parallel replicas.
        self.optimizer.reduce_gradients(self.mesh.layout.dp)
        total_micro = batch.shape[0] // self.cfg.train.micro_batch_size
        loss, lm_loss, mtp_loss = (sums / total_micro).tolist()
        return {"loss": loss, "lm_loss": lm_loss, "mtp_loss": mtp_loss}

    @torch.no_grad()
    def clip_gradients(self) -> float:
        """Clip at the global norm (§4.2: 1.0): each element is in exactly one rank's gradient shard."""
        if self.ema is not None:
            self.ema.wait()  # the optimizer step that follows writes the masters the EMA thread reads
        local = self.optimizer.grad_sq_norm(self.device)
        self.all_reduce(local, "grad norm")
        squared = local.item()
        norm = math.sqrt(squared) if math.isfinite(squared) else float("nan")
        clip = self.cfg.train.optim.grad_clip or float("inf")
        coef = min(clip / (norm + 1e-6), 1.0) if math.isfinite(norm) else float("nan")
        self.optimizer.scale_gradients(coef)
        return norm

    def moe_statistics(self, micro_batches: int) -> tuple[float, list[torch.Tensor]]:
        """The step's balance loss (summed over layers, mean over micro-batches) and each MoE layer's
        expert loads over the global batch, summed over every rank that ran a copy."""
        table = torch.zeros(len(self.moe_ids), self.cfg.model.n_routed_experts, dtype=torch.float64,
                            device=self.device)
        bal = torch.zeros(1, dtype=torch.float64, device=self.device)
        for moe in self.moe_layers():
            table[self._layer_ids[id(moe)]] += moe.tokens_per_expert.double()
            bal += moe.balance_loss_sum.double()
        packed = torch.cat([bal, table.flatten()])
        self.all_reduce(packed, "expert loads")
        loads = packed[1:].view_as(table).float().to(dev.HOST)
        return packed[0].item() / micro_batches, list(loads.unbind(0))

    def update_biases(self, loads: list[torch.Tensor], gamma: float) -> None:
        """Aux-loss-free balancing (§2.1.2), after the optimizer step, from the global batch's loads."""
        for moe in self.moe_layers():
            moe.update_bias(loads[self._layer_ids[id(moe)]].to(self.device), gamma)

    def bias_table(self) -> torch.Tensor | None:
        if not self.moe_ids:
            return None
        table = torch.zeros(len(self.moe_ids), self.cfg.model.n_routed_experts, device=self.device)
        for moe in self.moe_layers():
            i = self._layer_ids[id(moe)]
            if i in self._reports_bias:
                table[i] = moe.gate.e_score_correction_bias
        self.all_reduce(table, "router biases")
        return table.flatten().to(dev.HOST)

    def stop_requested(self) -> bool:
        """A stop signal on any rank stops every rank after the same step."""
        flag = torch.tensor([1 if self.stop_signal is not None else 0], device=self.device)
        self.all_reduce(flag, "stop flag", op=dist.ReduceOp.MAX)
        if flag.item() and self.stop_signal is None:
            self.stop_signal = "peer"
        return bool(flag.item())

    def comm_waits(self) -> tuple[float, float]:
        """Seconds this rank was blocked on EP all-to-alls and on DP (ZeRO) collectives since the last call."""
        return self.transport.wait_clock.take(), self.optimizer.comm_clock.take()

    def step_performance(self, step: int, step_time: float, ep_wait: float, dp_wait: float) -> dict:
        """Every rank's memory peaks, phase times and comm waits, gathered (COLLECTIVE: every rank, every
        step); rank 0 writes the per-rank values to ranks.jsonl and returns the headline figures."""
        row = perf.rank_row(self.device, step_time, self.phases.take(), ep_wait, dp_wait)
        record, per_rank = perf.summarize(perf.gather_rows(row), dev.is_gpu(self.device))
        self.rank_metrics.write({"step": step, **per_rank})
        return record

    def train_step(self) -> dict:
        """One step: the phases data, forward_backward (with the DP gradient reduction) and optimizer (the
        norm, the verdict, the update and its all-gather, the bias update) are timed on self.phases."""
        train, state = self.cfg.train, self.state
        step = state.step + 1
        self.flight.beat(step)
        self.faults.crash(step)
        with self.phases.phase("data"):
            batch_size = self.batch_size()
            mtp_lambda = schedules.mtp_lambda(train, state.tokens)
            batch = self.data.train.batch(state.sequences, batch_size, shuffle=True, seed=self.data_seed)
            batch = self.faults.batch(step, batch, self.data.tokenizer.vocab_size)
        with self.phases.phase("forward_backward"):
            sums = self.accumulate_gradients(batch, mtp_lambda, self.faults.loss_factor(step))
        with self.phases.phase("optimizer"):
            return self._update(step, batch_size, mtp_lambda, sums)

    def _update(self, step: int, batch_size: int, mtp_lambda: float, sums: dict) -> dict:
        train, state = self.cfg.train, self.state
        grad_norm = self.clip_gradients()
        bal_loss, loads = self.moe_statistics(batch_size // train.micro_batch_size)
        loss = sums["loss"] + bal_loss
        action = self.decide(step, self.detector.judge(step, loss, grad_norm), loss, grad_norm)

        lr = schedules.learning_rate(train.optim, state.step, state.tokens)
        gamma = schedules.bias_update_rate(train, state.tokens)
        if action == "apply":
            self.optimizer.set_lr(lr)
            self.optimizer.step()
            self.update_biases(loads, gamma)
            if self.ema is not None:
                self.ema.update()
            state.tokens += batch_size * train.seq_len
        self.optimizer.zero_grad()
        for moe in self.moe_layers():
            moe.reset_stats()
        state.step = step
        state.sequences += batch_size
        biases = self.bias_table()
        record = {
            "step": step, "loss": loss, "lm_loss": sums["lm_loss"], "mtp_loss": sums["mtp_loss"],
            "bal_loss": bal_loss, "grad_norm": grad_norm, "lr": lr, "batch_size": batch_size,
            "tokens": state.tokens, "mtp_lambda": mtp_lambda, "bias_update_rate": gamma,
            "max_vio": sum(map(max_violation, loads)) / max(len(loads), 1),
            "max_vio_layers": [round(max_violation(load), 4) for load in loads],
            "bias_absmax": biases.abs().max().item() if biases is not None else 0.0,
            "bias_std": biases.std().item() if biases is not None and biases.numel() > 1 else 0.0,
            "action": action,
        }
        if action == "rollback":
            self.rollback(step, batch_size)
        return record | {"_loads": loads}

    def decide(self, step: int, verdict: Verdict, loss: float, grad_norm: float) -> str:
        """apply | skip | rollback, from the verdict and the spike policy; every non-apply is an event."""
        self.nonfinite_streak = self.nonfinite_streak + 1 if verdict.kind == "nonfinite" else 0
        if verdict.ok:
            return "apply"
        spike = self.cfg.monitor.spike
        policy = spike.grad_policy if verdict.kind == "grad_spike" else spike.policy
        if verdict.kind == "nonfinite":
            action = "skip"  # a NaN/Inf update can never be applied
        elif policy == "warn":
            action = "apply"
        elif policy == "rollback" and self.state.rollbacks < spike.max_rollbacks and self._before(step):
            action = "rollback"
        else:
            action = "skip"
        self.events.event(verdict.kind, step, loss=_finite_or_str(loss), grad_norm=_finite_or_str(grad_norm),
                          detail=verdict.detail, action=action)
        if self.sink is not None:  # a skipped step is also an events/skip point (the dashboard's Recovery panel)
            self.sink.log_event(verdict.kind, step, f"{verdict.detail}; action: {action}",
                                also=("skip",) if action == "skip" else ())
        return action

    def _before(self, step: int) -> list[Path]:
        """The complete checkpoints taken before `step`, oldest first."""
        return [p for p in self.checkpoints.complete() if int(p.name.split("_")[1]) < step]

    def rollback(self, spike_step: int, batch_size: int) -> None:
        """PaLM-style: restore the newest sound checkpoint before the spike (a damaged one is moved aside and
        the next older tried), move the data cursor past the spike plus `rollback_skip_batches` batches, and
        save at once so a crash cannot replay the bad window."""
        cursor = self.state.sequences + self.cfg.monitor.spike.rollback_skip_batches * batch_size
        self.publish_save()  # a save in flight is one the rollback may choose, as a synchronous save would be
        self.barrier()  # every rank has decided on the same checkpoints before any reads them
        for target in reversed(self._before(spike_step)):
            try:
                saved = self.checkpoints.load(target, self.state_entries())
                restored = TrainState.from_dict(saved)
                break
            except ConfigError as err:
                self.events.event("checkpoint_skipped", spike_step, reason=str(err))
        else:  # nothing sound to go back to: the spike's update was not applied; carry on from here
            self.events.event("rollback_failed", spike_step, reason="no sound checkpoint before the spike")
            return
        self.after_load(saved)
        self.state = TrainState(restored.step, restored.tokens, cursor, self.state.rollbacks + 1)
        self.detector.load_state(saved.get("spike_history", []))
        self._truncate_logs(restored.step)
        self.events.event("rollback", spike_step, to_step=restored.step, checkpoint=str(target),
                          skipped_sequences=cursor - restored.sequences, data_cursor=cursor)
        if self.sink is not None:
            self.sink.log_event("rollback", spike_step, f"restored {target}, data cursor {cursor}")
        self.save(wait=True)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token loss on held-out micro-batches, forward-only through the pipeline schedule; the
        micro-batches are dealt over the DP replicas (each gets the schedule's minimum at least)."""
        if self.data.val is None:
            return float("nan")
        train, dp = self.cfg.train, self.mesh.layout.dp
        quantum = self.micro_batch_quantum()
        per_replica = max(-(-max(train.eval_batches // dp, 1) // quantum) * quantum, self.least_micro_batches())
        count = per_replica * dp * train.micro_batch_size
        batch = self.data.val.batch(0, count, shuffle=False)
        self.model.eval()
        self._ctx = dict(eval=True, sums=torch.zeros(1, dtype=torch.float64, device=self.device))
        self.run_pipeline(self.my_micro_batches(batch), forward_only=True)
        total = self._ctx["sums"]
        self.all_reduce(total, "validation loss")
        return total.item() / (per_replica * dp)

    # ------------------------------------------------------------------------------------------- loop
    def request_stop(self, signum, _frame=None) -> None:
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> dict | None:
        try:
            if not self.dry_run:  # a rank that makes no progress for parallel.comm_timeout writes its record, exits
                self.watchdog = HangWatchdog(self.flight, self.cfg.parallel.comm_timeout, self.run_dir, self.world,
                                             incarnation="").start()
            return self._fit()
        except dist.DistError as err:  # the backend gave up first (its timeout, a peer gone): the same report
            if self.watchdog is None:
                raise
            self.watchdog.trip(f"the backend raised {type(err).__name__} ({str(err).splitlines()[0][:200]})")
            raise
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if getattr(self, "pending_save", None) is not None:
                self.abandon_save()
            if hasattr(self, "run_lock"):
                self.run_lock.release()  # whatever ended the run, another trainer may now take run.dir
            if self.runtime.owns_group and dist.is_initialized():
                dist.destroy_process_group()  # a group this trainer created is not left behind

    def _fit(self) -> dict | None:
        if threading.current_thread() is threading.main_thread():  # preemption (Slurm's --signal, SIGTERM, ^C)
            for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):  # Ctrl-C too: no step lost
                signal.signal(signum, self.request_stop)
        if self.dry_run:
            from moetron.train.dry_run import report

            print(report(self))
            return None
        self.start()
        cfg = self.cfg
        total = cfg.train.steps
        if self.state.step >= total:
            if self.is_writer:
                print(f"moetron: {self.run_dir} already trained {self.state.step} steps (train.steps={total}).")
            return None
        bar = tqdm(total=total, initial=self.state.step, disable=not (cfg.run.progress and self.is_writer),
                   unit="step", dynamic_ncols=True, desc="train")
        record, window_tokens, window_start = None, 0, time.perf_counter()
        while self.state.step < total:
            self.phases.take(), self.comm_waits()  # nothing from before this step (validation, a rollback)
            step_start = time.perf_counter()
            record = self.train_step()
            loads = record.pop("_loads")
            if self.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                return self.diverged(record, bar)
            if record["action"] == "rollback":
                bar.n = self.state.step
                bar.refresh()
                continue
            step_time = time.perf_counter() - step_start
            ep_wait, dp_wait = self.comm_waits()  # the step's own (validation's all-to-alls come next)
            window_tokens += record["batch_size"] * cfg.train.seq_len
            step = self.state.step
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total):
                record["val_loss"] = self.validate()
            self.poll_save()  # run.async_checkpoint: publish a background save whose write has ended
            # No checkpoint in a run of non-finite steps: the kept ones stay those of finite training.
            saved = (step % self.save_every() == 0 or step == total) and self.nonfinite_streak == 0
            if saved:
                save_start = time.perf_counter()
                with self.phases.phase("checkpoint"):
                    self.save()
                step_time += time.perf_counter() - save_start  # the step's time: train_step and its checkpoint
            record |= self.step_performance(step, step_time, ep_wait, dp_wait)
            if step == 1 or step % cfg.run.log_every == 0 or step == total or "val_loss" in record:
                self.log(record, window_tokens / (time.perf_counter() - window_start))
                window_tokens, window_start = 0, time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % cfg.monitor.expert_load_every == 0 or step == total:
                self.log_expert_load(step, loads)
            bar.update(1)
            if self.stop_requested():
                return self.preempt(record, saved, bar)
        bar.close()
        self.events.event("finish", self.state.step)
        self.finish()
        return record

    def diverged(self, record: dict, bar):
        """Stop: nothing finite is left to train on. The checkpoints (all finite) stay as they are."""
        bar.close()
        self.log(record, 0.0)
        self.events.event("diverged", self.state.step, nonfinite_steps=self.nonfinite_streak)
        self.finish()
        raise Diverged(f"{self.nonfinite_streak} consecutive steps (up to step {self.state.step}) had a NaN or Inf "
                       f"loss or gradient (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); no update "
                       f"was applied. The checkpoints in {self.run_dir / 'checkpoints'} hold the last finite weights. "
                       "Check the data, lower train.optim.lr, or raise train.max_nonfinite_steps.")

    def preempt(self, record: dict, saved: bool, bar) -> dict:
        """Stop after a complete step with a checkpoint, so the requeued job resumes with nothing lost."""
        bar.close()
        if not saved:
            self.save()
        self.events.event("preempted", self.state.step, signal=self.stop_signal,
                          slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        self.finish()
        return record | {"preempted": True}

    def log(self, record: dict, tokens_per_s: float) -> None:
        """`tokens_per_s`: the global throughput (every replica) since the last log; per device it is the
        world's share, and MFU is one device's share of the model FLOP/s over one device's peak."""
        record["tokens_per_s"] = tokens_per_s
        record["tokens_per_s_per_device"] = tokens_per_s / self.world
        record["tflops_per_device"] = achieved_tflops_per_device(tokens_per_s, self.flops_per_token, self.world)
        if self.cfg.monitor.peak_tflops > 0:
            record["mfu"] = mfu_per_device(tokens_per_s, self.flops_per_token, self.world,
                                           self.cfg.monitor.peak_tflops)
        self.metrics.write({k: _round(v) for k, v in record.items()})
        if self.sink is not None:
            self.sink.log(record)

    def log_expert_load(self, step: int, loads: list[torch.Tensor]) -> None:
        """Per MoE layer, each expert's load divided by the mean load (1.0 = perfectly balanced)."""
        if not loads:
            return
        relative = [(load / load.float().mean().clamp(min=1e-9)).tolist() for load in loads]
        self.expert_loads.write({"step": step, "load": [[round(x, 3) for x in row] for row in relative]})
        if self.sink is not None:
            from moetron.report import load_heatmap_figure

            figure = load_heatmap_figure(relative, f"expert load / mean, step {step}")
            self.sink.log_expert_load(step, figure)
            figure.clf()

    def finish(self) -> None:
        if self.watchdog is not None:  # no collectives from here on: the report may take its time
            self.watchdog.stop()
        self.publish_save()  # nothing in flight is lost at the end of a run, a preemption or a divergence
        if self.ema is not None:
            self.ema.close()
        self.run_lock.release()
        if self.cfg.monitor.report and self.is_writer:
            from moetron.report import draw_report

            draw_report(self.run_dir, self.run_dir / "report.png")
        if self.sink is not None:
            self.sink.finish()


def _to_main_grad(p: torch.Tensor) -> None:
    """Accumulate in FP32 (arXiv 2412.19437 §3.3): add the backward's gradient to p.main_grad, drop .grad."""
    p.main_grad.add_(p.grad)
    p.grad = None


def _round(value):
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    return value


def _finite_or_str(value: float):
    return value if math.isfinite(value) else str(value)
