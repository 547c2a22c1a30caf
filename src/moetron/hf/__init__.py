"""Hugging Face interop: export moetron checkpoints to the published DeepSeek-V3 safetensors layout and import
such directories (or what transformers' save_pretrained writes) as new moetron runs. CLI: `python -m moetron.hf`."""

from moetron.hf.config import hf_config, model_config, routing_mismatch
from moetron.hf.convert import (
    Report,
    expected_state,
    export_checkpoint,
    import_checkpoint,
    model_from_state,
    read_checkpoint,
)
from moetron.hf.safetensors_io import SafetensorsDir, write_sharded
from moetron.hf.tensors import from_hf, to_hf

__all__ = [
    "Report", "SafetensorsDir", "expected_state", "export_checkpoint", "from_hf", "hf_config", "import_checkpoint",
    "model_config", "model_from_state", "read_checkpoint", "routing_mismatch", "to_hf", "write_sharded",
]
