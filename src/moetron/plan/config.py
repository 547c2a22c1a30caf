"""The planner's root config: everything `python -m moetron.train` reads, plus `hardware` and `plan`."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from moetron.config import MoetronConfig
from moetron.config.errors import invalid
from moetron.config.hardware import HardwareConfig
from moetron.config.layout import check_layout as layout_check

RECOMPUTE = ("none", "selective", "full")
SCHEDULE_STAGES = {"1f1b": 1, "zb1p": 1, "dualpipe": 1, "dualpipev": 2}  # stages per pipeline rank (distinct)


@dataclass
class PlanOptions:
    # none: keep every activation; selective: recompute RMSNorm and the MLA up-projections in backward
    # (the report's choice); full: keep only each layer's input and recompute the layer.
    recompute: str = "selective"
    fused_cross_entropy: bool = True  # logits are recomputed per vocabulary chunk, never cached for backward
    dp_overlap: float = 0.0  # share of the data-parallel gradient sync hidden behind the pipeline's drain
    timeline: str = "runs/plan/timeline.png"  # PNG of one simulated step ("" to skip)
    json: str = ""  # also write the plan as a flat JSON object here


@dataclass
class PlanConfig(MoetronConfig):
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    plan: PlanOptions = field(default_factory=PlanOptions)

    @property
    def ranks_per_node(self) -> int:
        return self.parallel.ranks_per_node or self.hardware.gpus_per_node

    @property
    def num_stages(self) -> int:
        return self.parallel.pp * SCHEDULE_STAGES[self.parallel.schedule]

    @property
    def microbatches(self) -> int:
        """Micro-batches one pipeline runs per optimizer step (the batch at the end of the ramp)."""
        return self.train.global_batch_size // (self.parallel.dp * self.train.micro_batch_size)

    def validate(self) -> "PlanConfig":
        super().validate()
        self.hardware.validate()
        check_layout(self)
        return self


def check_layout(cfg: PlanConfig) -> None:
    """Layout errors a planner must catch before any work; each names its field."""
    p, t = cfg.parallel, cfg.train
    if cfg.plan.recompute not in RECOMPUTE:
        raise invalid("plan.recompute", cfg.plan.recompute, " | ".join(RECOMPUTE))
    if not 0 <= cfg.plan.dp_overlap <= 1:
        raise invalid("plan.dp_overlap", cfg.plan.dp_overlap, "a fraction in [0, 1]")
    # What the trainer refuses at start-up (config/layout.py); a world smaller than a node fills part of one.
    layout_check(cfg, ranks_per_node=min(cfg.ranks_per_node, p.world_size))
    # The plan's own: its micro-batch count is the batch at the end of the ramp over whole micro-batches.
    if t.global_batch_size % (p.dp * t.micro_batch_size):
        raise invalid("train.global_batch_size", t.global_batch_size,
                      f"a multiple of parallel.dp x train.micro_batch_size = {p.dp * t.micro_batch_size}")
    mb = cfg.microbatches
    if p.schedule in ("dualpipe", "dualpipev") and (mb < 2 * p.pp or (p.schedule == "dualpipe" and mb % 2)):
        raise invalid("train.global_batch_size", t.global_batch_size,
                      f"a batch giving an even number >= 2 x parallel.pp = {2 * p.pp} of micro-batches per "
                      f"pipeline (now {mb} = global_batch_size / (dp x micro_batch_size))")
    if p.schedule in ("1f1b", "zb1p") and mb < 1:
        raise invalid("train.global_batch_size", t.global_batch_size, "at least dp x micro_batch_size")


def register_plan_schema() -> None:
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)
