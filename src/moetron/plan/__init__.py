"""moetron.plan: will a layout fit, and what will it cost? Per-rank memory, itemised, and predicted
step time, tokens/s, MFU and GPU-hours per trillion tokens, from the config alone (no allocation).

    python -m moetron.plan model=v3_671b train=v3 fp8=emulated hardware=h800 parallel.pp=16 ...
"""

from moetron.plan.config import PlanConfig, PlanOptions, check_layout, register_plan_schema
from moetron.plan.planner import Plan, dispatch_rows, make_plan


def load_plan_config(overrides: list[str] | tuple[str, ...] = ()) -> PlanConfig:
    """Compose hydra_conf/plan.yaml with `overrides` (Hydra syntax) into a validated PlanConfig."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_plan_schema()
    GlobalHydra.instance().clear()
    with initialize_config_module("moetron.hydra_conf", version_base=None):
        cfg = compose("plan", overrides=list(overrides))
    return OmegaConf.to_object(cfg).validate()


def plan(overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    return make_plan(load_plan_config(overrides))


__all__ = ["Plan", "PlanConfig", "PlanOptions", "check_layout", "dispatch_rows", "load_plan_config", "make_plan", "plan"]
