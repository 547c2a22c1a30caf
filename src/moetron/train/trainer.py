"""The single-process trainer: the DeepSeek-V3 recipe of SPEC §2 on one device.

One step: a batch of sequences (ramped size) split into micro-batches; forward/backward with gradient
accumulation in FP32; clip at global norm 1.0; AdamW (FP32 masters, BF16 moments) at the scheduled LR;
then the aux-loss-free bias update from the step's expert loads. Checkpoints resume bitwise exactly.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from moetron.checkpoint import CheckpointStore
from moetron.config import ConfigError, MoetronConfig
from moetron.config.hydra import to_yaml
from moetron.data import build_data
from moetron.model import DeepSeekV3, max_violation
from moetron.train import schedules
from moetron.train.logs import EventLog, JsonLines
from moetron.train.optim import MasterAdamW


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs: the counters the schedules and
    the data order are functions of."""

    step: int = 0
    tokens: int = 0
    sequences: int = 0

    def as_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "sequences": self.sequences}


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
        self.optimizer = MasterAdamW(self.model.named_parameters(), config.train.optim)
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoints", keep=config.run.keep_checkpoints)
        self.metrics = JsonLines(self.run_dir / "metrics.jsonl")
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.state = TrainState()

    # ----------------------------------------------------------------------------------------- set-up
    def save_every(self) -> int:
        return self.cfg.run.save_every or max(1, self.cfg.train.steps // 4)

    def start(self) -> None:
        """Create the run directory, or resume from its newest complete checkpoint."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_same_model()
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        loaded = self.checkpoints.load_latest(self.model, self.optimizer)
        if loaded is None:
            self.metrics.truncate_after(0)
            self.events.event("start", 0, params=sum(p.numel() for p in self.model.parameters()))
            return
        self.state = TrainState(**{k: loaded.train_state.get(k, 0) for k in ('step', 'tokens', 'sequences')})
        for reason in loaded.skipped:
            self.events.event("checkpoint_skipped", self.state.step, reason=reason)
        self.metrics.truncate_after(self.state.step)  # steps logged after the checkpoint will be redone
        self.events.event("resume", self.state.step, checkpoint=str(loaded.path))

    def _check_same_model(self) -> None:
        """Resuming with another model shape would fail deep inside the loader: say which field changed."""
        saved = self.run_dir / "config.yaml"
        if not saved.exists() or not self.checkpoints.complete():
            return
        old = OmegaConf.load(saved)
        for name in ("model", "train.seq_len", "data.tokenizer"):
            before, now = OmegaConf.select(old, name), OmegaConf.select(OmegaConf.structured(self.cfg), name)
            if before != now:
                raise ConfigError(
                    f"Invalid value for `{name}` when resuming {self.run_dir}: the checkpoints were made with "
                    f"{OmegaConf.to_container(before) if OmegaConf.is_config(before) else before!r}, this run asks for "
                    f"{OmegaConf.to_container(now) if OmegaConf.is_config(now) else now!r}. Valid: the same value, "
                    "or a new run.dir."
                )

    # ------------------------------------------------------------------------------------------ steps
    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        train, state = self.cfg.train, self.state
        batch_size = schedules.batch_size(train, state.tokens)
        micro_batches = batch_size // train.micro_batch_size
        mtp_lambda = schedules.mtp_lambda(train, state.tokens)
        batch = self.data.train.batch(state.sequences, batch_size, shuffle=True, seed=self.cfg.run.seed)

        self.model.train()
        moe_layers = self.model.moe_layers()
        for moe in moe_layers:
            moe.aux_loss_scale = 1.0 / micro_batches  # the step's loss is the mean over micro-batches
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
        for micro in batch.split(train.micro_batch_size):
            with self.autocast():
                out = self.model(micro[:, :-1], micro[:, 1:], mtp_lambda=mtp_lambda)
            (out.loss / micro_batches).backward()
            sums["loss"] += out.loss.item() / micro_batches
            sums["lm_loss"] += out.lm_loss.item() / micro_batches
            sums["mtp_loss"] += (out.mtp_loss.item() if out.mtp_loss is not None else 0.0) / micro_batches

        clip = train.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        lr = schedules.learning_rate(train.optim, state.step, state.tokens)
        self.optimizer.set_lr(lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        # Aux-loss-free balancing after the optimizer step, from the loads of the whole step.
        gamma = schedules.bias_update_rate(train, state.tokens)
        max_vios, bal_loss = [], 0.0
        for moe in moe_layers:
            load = moe.tokens_per_expert.clone()
            max_vios.append(max_violation(load))
            bal_loss += moe.balance_loss_sum.item() / micro_batches
            moe.update_bias(load, gamma)
            moe.reset_stats()

        state.step += 1
        state.sequences += batch_size
        state.tokens += batch_size * train.seq_len
        return {
            "step": state.step,
            "loss": sums["loss"] + bal_loss,
            "lm_loss": sums["lm_loss"],
            "mtp_loss": sums["mtp_loss"],
            "bal_loss": bal_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "batch_size": batch_size,
            "tokens": state.tokens,
            "mtp_lambda": mtp_lambda,
            "bias_update_rate": gamma,
            "max_vio": sum(max_vios) / max(len(max_vios), 1),
            "max_vio_layers": [round(v, 4) for v in max_vios],
        }

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
        path = self.checkpoints.save(self.state.step, self.model, self.optimizer, self.state.as_dict())
        self.events.event("checkpoint", self.state.step, path=str(path))

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict | None:
        self.start()
        cfg = self.cfg
        total = cfg.train.steps
        if self.state.step >= total:
            print(f"moetron: {self.run_dir} already trained {self.state.step} steps (train.steps={total}).")
            return None
        bar = tqdm(total=total, initial=self.state.step, disable=not cfg.run.progress, unit="step",
                   dynamic_ncols=True, desc="train")
        record, window_tokens, window_start = None, 0, time.perf_counter()
        while self.state.step < total:
            step_start = time.perf_counter()
            record = self.train_step()
            step_time = time.perf_counter() - step_start
            window_tokens += record["batch_size"] * cfg.train.seq_len
            step = self.state.step
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total):
                record["val_loss"] = self.validate()
            if step == 1 or step % cfg.run.log_every == 0 or step == total or "val_loss" in record:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / elapsed
                record["step_time"] = step_time
                self.metrics.write({k: _round(v) for k, v in record.items()})
                window_tokens, window_start = 0, time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % self.save_every() == 0 or step == total:
                self.save()
            bar.update(1)
        bar.close()
        self.events.event("finish", self.state.step)
        return record


def _round(value):
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    return value
