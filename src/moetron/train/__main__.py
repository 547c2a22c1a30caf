"""`python -m moetron.train [hydra overrides]`: train (or resume) the run in run.dir."""

import datetime
import os
import sys

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from moetron.config import ConfigError
from moetron.config.hydra import register_schema, to_config

register_schema()

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped early by a signal with a checkpoint saved; run again to resume


@hydra.main(config_path="pkg://moetron.hydra_conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = to_config(cfg)
        if world > 1:  # under torchrun / srun: the distributed trainer over parallel.*
            from moetron.train.distributed import DistributedTrainer

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
            trainer = DistributedTrainer(config)
        else:
            from moetron.train.trainer import Trainer

            if config.parallel.world_size > 1:
                raise ConfigError(
                    f"Invalid value for `parallel.pp x parallel.dp x parallel.tp`: {config.parallel.world_size}, "
                    f"but this is one process. Valid: 1 (parallel=single), or launch {config.parallel.world_size} "
                    f"processes: torchrun --nproc-per-node={config.parallel.world_size} -m moetron.train ..."
                )
            trainer = Trainer(config)
        last = trainer.fit()
    except ConfigError as err:  # a user mistake: one paragraph, no traceback, nothing written over
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"moetron: error: {err}", file=sys.stderr)
        sys.exit(2)
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
