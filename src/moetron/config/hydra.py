"""The bridge from Hydra to the typed config: register the schema, convert and validate once."""

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moetron.config import MoetronConfig


def register_schema() -> None:
    """Make `moetron_schema` (the dataclasses) the base of hydra_conf/config.yaml, so YAML is type-checked."""
    ConfigStore.instance().store(name="moetron_schema", node=MoetronConfig)


def to_config(cfg: DictConfig) -> MoetronConfig:
    """Hydra's DictConfig -> the validated dataclasses (raises ConfigError on a bad value)."""
    config = OmegaConf.to_object(cfg)
    return config.validate()


def to_yaml(config: MoetronConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
