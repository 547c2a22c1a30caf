"""The single-process trainer: the DeepSeek-V3 recipe of SPEC §2 on one device.

One step: a batch of sequences (ramped size) split into micro-batches; forward/backward with gradient
accumulation in FP32; clip at global norm 1.0; the step is judged (NaN/Inf, loss and grad-norm spikes);
then AdamW (FP32 masters, BF16 moments) at the scheduled LR and the aux-loss-free bias update from the
step's expert loads -- or, for a bad step, a skipped update or a rollback. Checkpoints resume bitwise exactly.
"""

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from moetron.checkpoint import CheckpointStore
from moetron.config import ConfigError, MoetronConfig
from moetron.config.hydra import to_yaml
from moetron.data import build_data
from moetron.model import DeepSeekV3, max_violation
from moetron.model.flops import training_flops_per_token
from moetron.monitor import FaultInjector, SpikeDetector, Verdict
from moetron.train import schedules
from moetron.train.logs import EventLog, JsonLines
from moetron.train.optim import MasterAdamW


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs. `tokens` counts trained tokens
    (the schedules' clock); `sequences` is the data cursor, which a rollback moves past skipped batches."""

    step: int = 0
    tokens: int = 0
    sequences: int = 0
    rollbacks: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(**{name: saved.get(name, 0) for name in cls.__dataclass_fields__})


class Trainer:
    def __init__(self, config: MoetronConfig):
        self.cfg = config
        self.run_dir = Path(config.run.dir)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.data = build_data(config.data, config.train.seq_len, config.run.seed)
        if self.data.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"Invalid value for `model.vocab_size`: {config.model.vocab_size}. The tokenizer has "
                f"{self.data.tokenizer.vocab_size} tokens. Valid: at least {self.data.tokenizer.vocab_size}."
            )
        torch.manual_seed(config.run.seed)
        self.model = DeepSeekV3(config.model)
        self.setup_parallel()  # also converts to FP8 when fp8.enabled (before the optimizer, same Parameters)
        self.optimizer = self.build_optimizer()
        self.checkpoints = self.build_checkpoints()
        self.metrics = self.log_file(JsonLines, "metrics.jsonl")
        self.expert_loads = self.log_file(JsonLines, "expert_load.jsonl")
        self.events = self.log_file(EventLog, "events.jsonl")
        self.detector = SpikeDetector(config.monitor.spike)
        fired = {(e["step"], e["kind"]) for e in self.events.read() if e["event"] == "fault"}
        self.faults = FaultInjector(config.monitor.faults, fired,
                                    on_fire=lambda step, kind: self.events.event("fault", step, kind=kind))
        self.flops_per_token = training_flops_per_token(config.model, config.train.seq_len)
        self.sink = None
        self.stop_signal: str | None = None  # set by SIGUSR1/SIGTERM: finish the step, checkpoint, exit
        self.state = TrainState()

    # ------------------------------------------------- what a distributed trainer replaces (train/distributed.py)
    is_writer = True  # the one process that writes metrics, events, config.yaml and shows the progress bar

    def setup_parallel(self) -> None:
        """Split the model over the ranks (nothing to split on one process) and apply fp8."""
        self.apply_fp8(self.model)

    def apply_fp8(self, module: torch.nn.Module) -> None:
        """fp8.enabled: run `module`'s FP8-eligible GEMMs in FP8 (fp8/convert.py: attention projections, dense
        and shared-expert FFNs, MTP eh_proj, routed experts), in place, keeping the Parameter objects."""
        if self.cfg.fp8.enabled:
            from moetron.fp8.convert import convert_to_fp8

            convert_to_fp8(module, self.cfg.fp8.backend, self.cfg.fp8.power_of_two_scales)

    def build_optimizer(self):
        return MasterAdamW(self.model.named_parameters(), self.cfg.train.optim)

    def build_checkpoints(self):
        return CheckpointStore(self.run_dir / "checkpoints", keep=self.cfg.run.keep_checkpoints)

    def log_file(self, kind, name: str):
        return kind(self.run_dir / name)

    def barrier(self) -> None:
        """Wait for every rank (one process: nothing to wait for)."""

    def moe_layers(self) -> list:
        return self.model.moe_layers()

    def clip_gradients(self) -> float:
        clip = self.cfg.train.optim.grad_clip or float("inf")
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()

    def moe_statistics(self, micro_batches: int) -> tuple[float, list[torch.Tensor]]:
        """The step's balance loss (summed over layers, mean over micro-batches) and each MoE layer's
        expert loads over the whole batch."""
        moe_layers = self.moe_layers()
        bal_loss = sum(moe.balance_loss_sum.item() for moe in moe_layers) / micro_batches
        return bal_loss, [moe.tokens_per_expert.clone() for moe in moe_layers]

    def update_biases(self, loads: list[torch.Tensor], gamma: float) -> None:
        for moe, load in zip(self.moe_layers(), loads):  # aux-loss-free balancing, after the optimizer step
            moe.update_bias(load, gamma)

    def bias_table(self) -> torch.Tensor | None:
        moe_layers = self.moe_layers()
        return torch.cat([moe.gate.e_score_correction_bias for moe in moe_layers]) if moe_layers else None

    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    def after_update(self) -> None:
        """Runs after each applied optimizer step (the distributed trainer updates its weight EMA here)."""

    def batch_size(self) -> int:
        """Sequences in this step (the ramp of SPEC §2)."""
        return schedules.batch_size(self.cfg.train, self.state.tokens)

    # ----------------------------------------------------------------------------------------- set-up
    def save_every(self) -> int:
        return self.cfg.run.save_every or max(1, self.cfg.train.steps // 4)

    def start(self) -> None:
        """Create the run directory, or resume from its newest complete checkpoint."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_same_model()
        self.barrier()  # every rank has compared against the saved config before the writer replaces it
        if self.is_writer:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            for stale in self.checkpoints.remove_stale():
                self.events.event("checkpoint_discarded", self.state.step, path=str(stale), reason="never published")
        self.barrier()
        loaded = self.checkpoints.load_latest(self.model, self.optimizer)
        if loaded is None:
            self._truncate_logs(0)
            self.events.event("start", 0, pid=os.getpid(), params=sum(p.numel() for p in self.model.parameters()))
        else:
            self.state = TrainState.from_dict(loaded.train_state)
            for reason in loaded.skipped:
                self.events.event("checkpoint_skipped", self.state.step, reason=reason)
            self._truncate_logs(self.state.step)  # steps logged after the checkpoint will be redone
            self.events.event("resume", self.state.step, pid=os.getpid(), checkpoint=str(loaded.path),
                              restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
        if self.is_writer and self.cfg.monitor.wandb and self.cfg.monitor.wandb_mode != "disabled":
            from moetron.monitor.wandb_sink import WandbSink

            self.sink = WandbSink(self.cfg.monitor, self.run_dir, OmegaConf.to_container(OmegaConf.structured(self.cfg)))

    def _truncate_logs(self, step: int) -> None:
        self.metrics.truncate_after(step)
        self.expert_loads.truncate_after(step)

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
        if self.cfg.train.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate_gradients(self, batch: torch.Tensor, mtp_lambda: float, loss_factor: float) -> dict:
        """Forward + backward over the micro-batches; the step's loss is their mean."""
        micro_batches = batch.shape[0] // self.cfg.train.micro_batch_size
        for moe in self.model.moe_layers():
            moe.aux_loss_scale = 1.0 / micro_batches
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
        self.model.train()
        for micro in batch.split(self.cfg.train.micro_batch_size):
            with self.autocast():
                out = self.model(micro[:, :-1], micro[:, 1:], mtp_lambda=mtp_lambda)
            loss = out.loss * loss_factor if loss_factor != 1.0 else out.loss
            (loss / micro_batches).backward()
            sums["loss"] += loss.item() / micro_batches
            sums["lm_loss"] += out.lm_loss.item() / micro_batches
            sums["mtp_loss"] += (out.mtp_loss.item() if out.mtp_loss is not None else 0.0) / micro_batches
        return sums

    def train_step(self) -> dict:
        train, state = self.cfg.train, self.state
        step = state.step + 1
        self.faults.crash(step)
        batch_size = self.batch_size()
        mtp_lambda = schedules.mtp_lambda(train, state.tokens)
        batch = self.data.train.batch(state.sequences, batch_size, shuffle=True, seed=self.cfg.run.seed)
        batch = self.faults.batch(step, batch, self.data.tokenizer.vocab_size)
        sums = self.accumulate_gradients(batch, mtp_lambda, self.faults.loss_factor(step))

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
            self.after_update()
            state.tokens += batch_size * train.seq_len
        self.optimizer.zero_grad(set_to_none=True)
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
        if self.sink is not None:
            self.sink.log_event(verdict.kind, step, f"{verdict.detail}; action: {action}")
        return action

    def _before(self, step: int) -> Path | None:
        """The newest complete checkpoint taken before `step`."""
        earlier = [p for p in self.checkpoints.complete() if int(p.name.split("_")[1]) < step]
        return earlier[-1] if earlier else None

    def rollback(self, spike_step: int, batch_size: int) -> None:
        """PaLM-style: restore the newest checkpoint before the spike, move the data cursor past the spike
        plus `rollback_skip_batches` batches, and save at once so a crash cannot replay the bad window."""
        target = self._before(spike_step)
        cursor = self.state.sequences + self.cfg.monitor.spike.rollback_skip_batches * batch_size
        rollbacks = self.state.rollbacks + 1
        restored = TrainState.from_dict(self.checkpoints.load(target, self.model, self.optimizer))
        self.state = TrainState(restored.step, restored.tokens, cursor, rollbacks)
        self.detector.forget_after(restored.step)
        self._truncate_logs(restored.step)
        self.events.event("rollback", spike_step, to_step=restored.step, checkpoint=str(target),
                          skipped_sequences=cursor - restored.sequences, data_cursor=cursor)
        if self.sink is not None:
            self.sink.log_event("rollback", spike_step, f"restored {target}, data cursor {cursor}")
        self.save()

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token loss on the first eval_batches micro-batches of the held-out split."""
        if self.data.val is None:
            return float("nan")
        self.model.eval()
        train = self.cfg.train
        count = min(train.eval_batches * train.micro_batch_size, self.data.val.num_sequences)
        batch = self.data.val.batch(0, count, shuffle=False)
        losses = []
        for micro in batch.split(train.micro_batch_size):
            with self.autocast():
                losses.append(self.model(micro[:, :-1], micro[:, 1:]).lm_loss.item())
        return sum(losses) / len(losses)

    def save(self) -> None:
        step = self.state.step
        path = self.checkpoints.save(step, self.model, self.optimizer, asdict(self.state),
                                     before_publish=self.faults.checkpoint_hook(step))
        self.events.event("checkpoint", step, path=str(path))

    # ------------------------------------------------------------------------------------------- loop
    def request_stop(self, signum, _frame=None) -> None:
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> dict | None:
        if threading.current_thread() is threading.main_thread():  # preemption (Slurm's --signal, SIGTERM)
            for signum in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(signum, self.request_stop)
        self.start()
        cfg = self.cfg
        total = cfg.train.steps
        if self.state.step >= total:
            if self.is_writer:
                    print(f"moetron: {self.run_dir} already trained {self.state.step} steps (train.steps={total}).")
            return None
        bar = tqdm(total=total, initial=self.state.step, disable=not (cfg.run.progress and self.is_writer), unit="step",
                   dynamic_ncols=True, desc="train")
        record, window_tokens, window_start = None, 0, time.perf_counter()
        while self.state.step < total:
            step_start = time.perf_counter()
            record = self.train_step()
            loads = record.pop("_loads")
            if record["action"] == "rollback":
                bar.n = self.state.step
                bar.refresh()
                continue
            step_time = time.perf_counter() - step_start
            window_tokens += record["batch_size"] * cfg.train.seq_len
            step = self.state.step
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total):
                record["val_loss"] = self.validate()
            if step == 1 or step % cfg.run.log_every == 0 or step == total or "val_loss" in record:
                self.log(record, window_tokens / (time.perf_counter() - window_start), step_time)
                window_tokens, window_start = 0, time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % cfg.monitor.expert_load_every == 0 or step == total:
                self.log_expert_load(step, loads)
            saved = step % self.save_every() == 0 or step == total
            if saved:
                self.save()
            bar.update(1)
            if self.stop_requested():
                return self.preempt(record, saved, bar)
        bar.close()
        self.events.event("finish", self.state.step)
        self.finish()
        return record

    def preempt(self, record: dict, saved: bool, bar) -> dict:
        """Stop after a complete step with a checkpoint, so the requeued job resumes with nothing lost."""
        bar.close()
        if not saved:
            self.save()
        self.events.event("preempted", self.state.step, signal=self.stop_signal,
                          slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        self.finish()
        return record | {"preempted": True}

    def log(self, record: dict, tokens_per_s: float, step_time: float) -> None:
        record["tokens_per_s"] = tokens_per_s
        record["step_time"] = step_time
        if self.cfg.monitor.peak_tflops > 0:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.cfg.monitor.peak_tflops * 1e12)
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
        if self.cfg.monitor.report and self.is_writer:
            from moetron.report import draw_report

            draw_report(self.run_dir, self.run_dir / "report.png")
        if self.sink is not None:
            self.sink.finish()


def _round(value):
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    return value


def _finite_or_str(value: float):
    return value if math.isfinite(value) else str(value)
