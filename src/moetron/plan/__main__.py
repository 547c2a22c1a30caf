"""`python -m moetron.plan [hydra overrides]`: per-rank memory, fits or not, predicted step time,
tokens/s per GPU, MFU, GPU-hours per trillion tokens and a timeline PNG of one step."""

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moetron.config import ConfigError
from moetron.parallel import ScheduleError
from moetron.plan.config import register_plan_schema

register_plan_schema()


@hydra.main(config_path="pkg://moetron.hydra_conf", config_name="plan", version_base=None)
def main(cfg: DictConfig) -> None:
    from moetron.plan.planner import make_plan

    try:
        plan = make_plan(OmegaConf.to_object(cfg).validate())
    except (ConfigError, ScheduleError) as err:
        print(f"moetron.plan: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(plan.report())
    if plan.cfg.plan.timeline:
        from moetron.parallel.timeline import plot_timeline

        c = plan.cfg
        title = (f"{c.model.name} on {c.parallel.world_size} x {c.hardware.name}: {c.parallel.schedule}, "
                 f"PP {c.parallel.pp}, {c.microbatches} micro-batches, step {plan.step_time:.3g} s (seconds)")
        print(f"timeline: {plot_timeline(plan.sim, c.plan.timeline, title=title)}")
    if plan.cfg.plan.json:
        path = Path(plan.cfg.plan.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.as_dict(), indent=1) + "\n")
        print(f"json: {path}")


if __name__ == "__main__":
    main()
