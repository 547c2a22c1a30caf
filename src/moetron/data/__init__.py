"""The data path: tokenizers, prepared memory-mapped shards, packing with FIM at sample time, blends.

`build_data(cfg, seq_len, seed)` is the one entry point the trainer uses; `python -m moetron.data.prepare`
writes the shards it reads. Names are imported on first use, so that prepare and the tokenizer trainer
start without importing torch (a second of CPU per worker process).
"""

from importlib import import_module

_WHERE = {
    "build_data": "build", "DataBundle": "build", "BlendedWindows": "dataset", "Documents": "dataset",
    "PackedWindows": "dataset", "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer", "parse_psm": "fim", "to_psm": "fim",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'moetron.data' has no attribute {name!r}")
    return getattr(import_module(f"moetron.data.{_WHERE[name]}"), name)
