"""The data pipeline: tokenizer, Fill-in-Middle, document packing and resumable shuffled windows.

`build_data(cfg, seq_len, seed)` is the one entry point the trainer uses.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from moetron.config.errors import invalid
from moetron.config.train import DataConfig
from moetron.data.dataset import TokenWindows, check_files, encode_documents
from moetron.data.fim import parse_psm, to_psm
from moetron.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, load_tokenizer


@dataclass
class DataBundle:
    tokenizer: ByteTokenizer | HFTokenizer
    train: TokenWindows
    val: TokenWindows | None  # None when data.val_files is empty


def build_data(cfg: DataConfig, seq_len: int, seed: int) -> DataBundle:
    """Validate `cfg`, load the tokenizer, encode the train (and val) files and cut them into windows."""
    rate = cfg.fim_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) <= 1.0:
        raise invalid("data.fim_rate", rate, "a probability in [0, 1] (0 disables Fill-in-Middle)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise invalid("train.seq_len", seq_len, "a positive integer")
    # Check every path (and the tokenizer) before the slow part, so a typo fails at once.
    train_files = check_files(cfg.train_files, "data.train_files")
    val_files = list(cfg.val_files or [])
    if val_files:
        val_files = check_files(val_files, "data.val_files")
    tok = load_tokenizer(cfg.tokenizer)
    train_stream = encode_documents(train_files, tok, float(rate), seed, field="data.train_files")
    train = TokenWindows(train_stream, seq_len, files=train_files, field="data.train_files")
    val = None
    if val_files:
        val_stream = encode_documents(val_files, tok, float(rate), seed, field="data.val_files",
                                      split="val")
        val = TokenWindows(val_stream, seq_len, files=val_files, field="data.val_files")
    return DataBundle(tokenizer=tok, train=train, val=val)


__all__ = [
    "SPECIAL_TOKENS", "ByteTokenizer", "DataBundle", "HFTokenizer", "TokenWindows", "build_data",
    "encode_documents", "load_tokenizer", "parse_psm", "to_psm",
]
