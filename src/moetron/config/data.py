"""Typed configuration of the data path: sources, blend, tokenizer and its special tokens, FIM."""

from dataclasses import dataclass, field

from moetron.config.checks import require_finite
from moetron.config.errors import invalid

INVALID_UTF8 = ("error", "replace")


@dataclass
class SpecialTokens:
    """The names of the control tokens in the tokenizer's vocabulary. The defaults are the DeepSeek-V3
    tokenizer's; PSM Fill-in-Middle emits fim_prefix, prefix, fim_suffix, suffix, fim_middle, middle."""

    bos: str = "<｜begin▁of▁sentence｜>"
    eos: str = "<｜end▁of▁sentence｜>"
    pad: str = "<｜▁pad▁｜>"
    fim_prefix: str = "<｜fim▁begin｜>"  # opens a FIM document, before the prefix
    fim_suffix: str = "<｜fim▁hole｜>"  # marks the hole, before the suffix
    fim_middle: str = "<｜fim▁end｜>"  # before the middle, which the model learns to fill in


@dataclass
class BlendSource:
    """One weighted source of a blend: a prepared directory, a Megatron .bin/.idx prefix or a raw file."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # Each entry: a directory written by `python -m moetron.data.prepare`, a Megatron-LM indexed dataset
    # prefix (PREFIX.bin + PREFIX.idx), or a raw .jsonl/.txt/.parquet file (prepared into a cache on first use).
    train_files: list[str] = field(default_factory=lambda: ["data/corpus/train.jsonl"])
    val_files: list[str] = field(default_factory=lambda: ["data/corpus/val.jsonl"])
    blend: list[BlendSource] = field(default_factory=list)  # non-empty: replaces train_files, sampled by weight
    tokenizer: str | None = None  # None: byte-level; else a Hugging Face `tokenizers` JSON file
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    fim_rate: float = 0.1  # share of documents rewritten as Fill-in-Middle (PSM layout) at sample time
    invalid_utf8: str = "error"  # raw input that is not UTF-8: error (refuse) | replace (with U+FFFD)
    text_key: str = "text"  # the field of a .jsonl object / .parquet column that holds the text
    cache_dir: str | None = None  # where raw files are prepared; None: a .prepared/ folder beside each file
    # The batch order (the shuffle of every epoch) and the FIM draws; None: run.seed. Set it to keep the data
    # fixed while run.seed changes the initialization (as benchmarks/fp8_loss.py does across its seeds).
    seed: int | None = None


def data_seed(data: DataConfig, run_seed: int) -> int:
    """The seed of the batch order and FIM draws: data.seed, else run.seed."""
    return run_seed if data.seed is None else data.seed


def validate_data(data: DataConfig, prefix: str = "data") -> None:
    require_finite(data, prefix)
    if not 0.0 <= data.fim_rate <= 1.0:
        raise invalid(f"{prefix}.fim_rate", data.fim_rate, "a probability in [0, 1]")
    if data.seed is not None and (isinstance(data.seed, bool) or not isinstance(data.seed, int) or data.seed < 0):
        raise invalid(f"{prefix}.seed", data.seed, "a non-negative integer, or null to use run.seed")
    if not data.train_files and not data.blend:
        raise invalid(f"{prefix}.train_files", data.train_files,
                      "a non-empty list of prepared directories or text files (or a data.blend)")
    if data.invalid_utf8 not in INVALID_UTF8:
        raise invalid(f"{prefix}.invalid_utf8", data.invalid_utf8,
                      "'error' (refuse input that is not UTF-8) or 'replace' (decode it with U+FFFD)")
    for i, source in enumerate(data.blend):
        if not source.path:
            raise invalid(f"{prefix}.blend[{i}].path", source.path, "a prepared directory or a data file")
        if not source.weight > 0:
            raise invalid(f"{prefix}.blend[{i}].weight", source.weight, "a positive number")
    for name, value in vars(data.special_tokens).items():
        if not isinstance(value, str) or not value:
            raise invalid(f"{prefix}.special_tokens.{name}", value, "a token of the tokenizer's vocabulary")
