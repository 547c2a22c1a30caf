"""`build_data(cfg, seq_len, seed)`: the tokenizer and the train / val windows the trainer reads."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from moetron.config.data import DataConfig
from moetron.config.errors import invalid
from moetron.data.dataset import BlendedWindows, Documents, PackedWindows
from moetron.data.loader import check_paths, open_shards
from moetron.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@dataclass
class DataBundle:
    tokenizer: ByteTokenizer | HFTokenizer
    train: PackedWindows | BlendedWindows
    val: PackedWindows | None  # None when data.val_files is empty


def _windows(paths: list[str], field: str, tok, cfg: DataConfig, seq_len: int, seed: int,
             split: str) -> PackedWindows:
    shards = [shard for path in paths for shard in open_shards(path, field, tok, cfg)]
    return PackedWindows(Documents(shards, tok.eos_id), seq_len, tok, float(cfg.fim_rate), seed, split, field,
                         names=paths)


def build_data(cfg: DataConfig, seq_len: int, seed: int) -> DataBundle:
    """Validate `cfg`, load the tokenizer, open (preparing raw files once) the train and val data."""
    rate = cfg.fim_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) <= 1.0:
        raise invalid("data.fim_rate", rate, "a probability in [0, 1] (0 disables Fill-in-Middle)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise invalid("train.seq_len", seq_len, "a positive integer")
    # Check every path (and the tokenizer) before the slow part, so a typo fails at once.
    blend = list(cfg.blend or [])
    for i, source in enumerate(blend):
        check_paths([source.path], f"data.blend[{i}].path")
    train_files = [] if blend else check_paths(cfg.train_files, "data.train_files")
    val_files = check_paths(cfg.val_files, "data.val_files") if cfg.val_files else []
    tok = load_tokenizer(cfg.tokenizer, cfg.special_tokens)
    if blend:
        parts = [_windows([s.path], f"data.blend[{i}].path", tok, cfg, seq_len, seed, f"train/{i}")
                 for i, s in enumerate(blend)]
        train = BlendedWindows(parts, [s.weight for s in blend])
    else:
        train = _windows(train_files, "data.train_files", tok, cfg, seq_len, seed, "train")
    val = _windows(val_files, "data.val_files", tok, cfg, seq_len, seed, "val") if val_files else None
    return DataBundle(tokenizer=tok, train=train, val=val)

