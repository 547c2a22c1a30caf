"""The planner's root config: everything `python -m moetron.train` reads, plus `hardware` and `plan`."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from moetron.config import MoetronConfig
from moetron.config.errors import invalid
from moetron.config.hardware import HardwareConfig

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
    """Layout errors a planner (and a launcher) must catch before any work; each names its field."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if cfg.plan.recompute not in RECOMPUTE:
        raise invalid("plan.recompute", cfg.plan.recompute, " | ".join(RECOMPUTE))
    if not 0 <= cfg.plan.dp_overlap <= 1:
        raise invalid("plan.dp_overlap", cfg.plan.dp_overlap, "a fraction in [0, 1]")
    if m.n_routed_experts % p.ep:
        raise invalid("parallel.ep", p.ep, f"a divisor of model.n_routed_experts ({m.n_routed_experts})",
                      "Every expert-parallel rank holds the same number of routed experts.")
    if m.num_attention_heads % p.tp:
        raise invalid("parallel.tp", p.tp, f"a divisor of model.num_attention_heads ({m.num_attention_heads})")
    rpn = cfg.ranks_per_node
    if p.ep > rpn and p.ep % rpn:
        raise invalid("parallel.ep", p.ep, f"at most or a multiple of the ranks per node ({rpn})",
                      "An expert-parallel group spans whole nodes or fits inside one.")
    if p.world_size > rpn and p.world_size % rpn:
        raise invalid("parallel.ranks_per_node", p.ranks_per_node,
                      f"a divisor of the world size pp x dp x tp = {p.world_size}")
    units = m.num_hidden_layers
    if cfg.num_stages > units:
        raise invalid("parallel.pp", p.pp,
                      f"at most {units // SCHEDULE_STAGES[p.schedule]} for {p.schedule}",
                      f"{cfg.num_stages} pipeline stages cannot share {units} Transformer layers (every stage "
                      "holds at least one; the MTP modules ride on the last).")
    if p.schedule == "dualpipe" and p.pp % 2:
        raise invalid("parallel.pp", p.pp, "an even number for DualPipe", "Rank r pairs with rank PP-1-r.")
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
