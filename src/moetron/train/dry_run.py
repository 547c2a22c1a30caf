"""`python -m moetron.train ... run.dry_run=true run.rank=R`: build rank R of the layout, count, exit.

The trainer builds rank R alone in this process over torch's fake process group (moetron.device.start_fake):
the full model on the meta device, `parallelize` keeps R's stages and experts, and only those are
materialized and initialized. The parameter bytes are those of the tensors now allocated; gradient and
optimizer bytes come from the shapes the trainer would allocate (the optimizer's own accounting of its
ZeRO-1 shard). Each item is printed beside moetron.plan's figure for the same pipeline rank.
"""

from __future__ import annotations

import resource
from dataclasses import fields

from moetron.config import ConfigError, MoetronConfig
from moetron.parallel import ScheduleError
from moetron.plan.memory import GB

# dry-run item -> the start of moetron.plan's item name
PLAN_ITEMS = {"parameters": "parameters", "gradients": "gradients", "master weights": "FP32 master weights",
              "AdamW moments": "AdamW moments"}


def planned_items(config: MoetronConfig, pp_index: int) -> tuple[dict[str, float], str]:
    """moetron.plan's bytes of the dry run's items on pipeline rank `pp_index` ({} and why, if it cannot plan)."""
    from moetron.plan.config import PlanConfig
    from moetron.plan.planner import make_plan

    try:
        plan = make_plan(PlanConfig(**{f.name: getattr(config, f.name) for f in fields(MoetronConfig)}))
    except (ConfigError, ScheduleError, ValueError) as err:  # the planner's rules (e.g. on the batch) differ
        return {}, f"moetron.plan cannot plan this layout: {err}"
    items = plan.items_per_rank[pp_index]
    out = {}
    for item, prefix in PLAN_ITEMS.items():
        out[item] = sum(v for k, v in items.items() if k.startswith(prefix))
    return out, ""


def measure(trainer) -> dict[str, float]:
    """Bytes this rank holds: its materialized parameters, and the gradient and optimizer state the trainer
    allocates for them (counted from their shapes)."""
    params = {id(p): p for p in trainer.model.parameters()}.values()
    return {
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": trainer.optimizer.gradient_bytes(),
        "master weights": trainer.optimizer.master_bytes(),
        "AdamW moments": trainer.optimizer.moment_bytes(),
    }


def report(trainer) -> str:
    cfg, par = trainer.cfg, trainer.cfg.parallel
    mine = measure(trainer)
    planned, why = planned_items(cfg, trainer.pp_index)
    stages = ", ".join(f"stage {sid.stage}" + (f" (direction {sid.direction})" if par.schedule == "dualpipe" else "")
                       for sid in trainer.model.stage_ids)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines = [
        f"moetron dry run: rank {trainer.rank} of {trainer.world} (model={cfg.model.name}, {par.schedule} pp {par.pp} "
        f"x dp {par.dp}, ep {par.ep}; pipeline rank {trainer.pp_index}, {stages}), parameters in "
        f"{cfg.train.param_dtype} on {trainer.device}, built in {trainer.build_seconds:.1f} s, peak RSS {rss:.2f} GB",
        f"  {'item':<20}{'this rank (GB)':>16}{'moetron.plan (GB)':>20}{'difference':>12}",
    ]
    for item, value in mine.items():
        plan = planned.get(item)
        diff = f"{100 * (value - plan) / plan:+.1f}%" if plan else ("-" if plan is None else "n/a")
        plan_s = f"{plan / GB:.3f}" if plan is not None else "-"
        lines.append(f"  {item:<20}{value / GB:>16.3f}{plan_s:>20}{diff:>12}")
    total = sum(mine.values())
    lines.append(f"  {'total':<20}{total / GB:>16.3f}{sum(planned.values()) / GB if planned else 0:>20.3f}")
    if why:
        lines.append(f"  {why}")
    return "\n".join(lines)
