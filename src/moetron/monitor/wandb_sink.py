"""wandb logging from the one rank that holds the loss: offline by default (no account needed), online
when configured. Alerts do nothing offline, so every alert is also an event in events.jsonl."""

import secrets
from pathlib import Path

from moetron.config.monitor import MonitorConfig

# metrics.jsonl key -> wandb section; the dashboard (dashboard.yaml) is written against these names.
SECTIONS = {
    "loss": "train", "lm_loss": "train", "mtp_loss": "train", "bal_loss": "train", "val_loss": "eval",
    "grad_norm": "optim", "lr": "optim", "batch_size": "optim", "mtp_lambda": "optim",
    "bias_update_rate": "optim", "tokens": "progress", "tokens_per_s": "perf", "step_time": "perf",
    "mfu": "perf", "tokens_per_s_per_device": "perf", "tflops_per_device": "perf",
    "time_data": "time", "time_forward_backward": "time", "time_optimizer": "time", "time_checkpoint": "time",
    "ep_wait_share": "comm", "dp_wait_share": "comm",
    "peak_rss_mb": "memory", "peak_device_allocated_mb": "memory", "peak_device_reserved_mb": "memory",
    "max_vio": "balance", "bias_absmax": "balance", "bias_std": "balance",
}


def wandb_key(name: str) -> str:
    return f"{SECTIONS[name]}/{name}"


def wandb_record(record: dict) -> dict:
    """A metrics.jsonl record as wandb keys: known scalars by section, per-layer MaxVio expanded."""
    out = {wandb_key(k): v for k, v in record.items() if k in SECTIONS}
    for layer, value in enumerate(record.get("max_vio_layers", [])):
        out[f"balance/max_vio_layer_{layer:02d}"] = value
    return out


class WandbSink:
    def __init__(self, cfg: MonitorConfig, run_dir: Path, config: dict):
        import wandb  # lazy: an optional extra

        self.wandb = wandb
        id_file = run_dir / "wandb_id.txt"  # a resumed run appends to the same wandb run
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode, dir=str(run_dir),
            id=run_id, resume="allow", name=run_dir.name, config=config, reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", init_timeout=300),  # a loaded box starts it slowly
        )
        # Plot against the trainer's step, not wandb's own counter: after a rollback the trainer's step goes
        # back, and wandb drops rows whose internal step is not increasing.
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def log(self, record: dict) -> None:
        self.run.log({"trainer/step": record["step"], **wandb_record(record)})

    def log_event(self, name: str, step: int, text: str, also: tuple[str, ...] = ()) -> None:
        """An event as a metric (so it plots) and an alert (so someone is told, when online); `also`: more
        event names of the same step (the action taken: skip), plotted without an alert of their own."""
        self.run.log({"trainer/step": step, f"events/{name}": 1, **{f"events/{other}": 1 for other in also}})
        self.run.alert(title=f"moetron {name} at step {step}", text=text, level=self.wandb.AlertLevel.WARN)

    def log_expert_load(self, step: int, figure) -> None:
        self.run.log({"trainer/step": step, "balance/expert_load_heatmap": self.wandb.Image(figure)})

    def finish(self) -> None:
        self.run.finish()
        # Shut the wandb service down too: only then is the offline run file closed and complete on disk for
        # whoever reads it next (a sync job, our tests), however late the service would otherwise flush it.
        self.wandb.teardown()
