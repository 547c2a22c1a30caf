"""The DeepSeek-V3 model as single-device code that reads like the paper; parallelism is applied from outside."""

from moetron.model.moe import MoE, max_violation
from moetron.model.param_count import ParamCount, count_parameters
from moetron.model.transformer import IGNORE_INDEX, DeepSeekV3, ModelOutput

__all__ = ["IGNORE_INDEX", "DeepSeekV3", "MoE", "ModelOutput", "ParamCount", "count_parameters", "max_violation"]
