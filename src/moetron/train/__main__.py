"""`python -m moetron.train [hydra overrides]`: train (or resume) the run in run.dir."""

import os
import sys

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from moetron.config import ConfigError
from moetron.config.hydra import register_schema, to_config
from moetron.train.trainer import Diverged, Trainer

register_schema()

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped early by a signal with a checkpoint saved; run again to resume


@hydra.main(config_path="pkg://moetron.hydra_conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        # One trainer for every layout: alone it is a world of one, under torchrun / srun one rank of many.
        trainer = Trainer(to_config(cfg))
        last = trainer.fit()
    except ConfigError as err:  # a user mistake: one paragraph, no traceback, nothing written over
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"moetron: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Diverged as err:  # the run itself failed: exit 1, its finite checkpoints kept
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"moetron: stopped: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if last is not None and last.get("preempted"):  # every rank exits 75, so the launcher requeues the job
        if not trainer.is_writer:
            sys.exit(EXIT_REQUEUE)
        print(f"moetron: stopped by {trainer.stop_signal} after step {last['step']} with a checkpoint saved; "
              f"rerun the same command to resume (run.dir={trainer.run_dir})")
        sys.exit(EXIT_REQUEUE)
    if last is not None and trainer.is_writer:
        summary = f"step {last['step']}  loss {last['loss']:.4f}  lm_loss {last['lm_loss']:.4f}"
        if "val_loss" in last:
            summary += f"  val_loss {last['val_loss']:.4f}"
        print(f"moetron: done: {summary}  run.dir={trainer.run_dir}")


if __name__ == "__main__":
    main()
