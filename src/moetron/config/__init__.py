"""Typed configuration: Hydra YAML -> these dataclasses (validated once) -> constructors."""

from dataclasses import dataclass, field

from moetron.config.errors import ConfigError, invalid
from moetron.config.fp8 import FP8Config, validate_fp8
from moetron.config.model import ModelConfig, RopeScaling
from moetron.config.monitor import FaultConfig, MonitorConfig, SpikeConfig, validate_monitor
from moetron.config.parallel import ParallelConfig, validate_parallel
from moetron.config.train import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    validate_data,
    validate_run,
    validate_train,
)


@dataclass
class MoetronConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "MoetronConfig":
        self.model.validate()
        validate_train(self.train)
        validate_data(self.data)
        validate_run(self.run)
        validate_monitor(self.monitor)
        validate_fp8(self.fp8)
        validate_parallel(self.parallel)
        max_len = self.model.max_position_embeddings
        if self.train.seq_len > max_len:
            raise invalid("train.seq_len", self.train.seq_len,
                          f"at most model.max_position_embeddings ({max_len})")
        return self


__all__ = [
    "ConfigError", "DataConfig", "FP8Config", "FaultConfig", "ModelConfig", "MonitorConfig", "MoetronConfig", "OptimConfig", "ParallelConfig",
    "RopeScaling", "RunConfig", "SpikeConfig", "TrainConfig", "invalid",
]
