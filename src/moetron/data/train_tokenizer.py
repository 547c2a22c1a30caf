"""Train a byte-level BPE tokenizer on text files with the Hugging Face `tokenizers` trainer.

    python -m moetron.data.train_tokenizer INPUTS... --out tokenizer.json [--vocab-size 4096] [--force]

The vocabulary is the 256 bytes, the six special tokens of `data.special_tokens` (DeepSeek-V3's names) and
BPE merges up to --vocab-size. Byte-level: every string encodes, nothing is unknown. `make corpus` trains
data/corpus/tokenizer.json on data/corpus/train.jsonl. The file is written under a temporary name and
renamed, and an existing one is kept unless --force is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import astuple

from moetron.config.data import SpecialTokens
from moetron.config.errors import ConfigError
from moetron.data.sources import Counts, expand_inputs, plan_chunks, read_chunk


def _texts(files: list[str], text_key: str) -> Iterator[str]:
    for path in files:
        for chunk in plan_chunks(path, 1 << 62):
            yield from read_chunk(chunk, text_key, "replace", Counts())


def train_tokenizer(inputs: list[str], out: str, vocab_size: int = 4096, text_key: str = "text",
                    special_tokens: SpecialTokens | None = None) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(astuple(special_tokens or SpecialTokens()))
    floor = 256 + len(specials)
    if vocab_size <= floor:
        raise ConfigError(f"Invalid value for `--vocab-size`: {vocab_size}. Valid: more than {floor} (the 256 "
                          f"bytes and {len(specials)} special tokens).")
    files = expand_inputs(inputs)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_texts(files, text_key), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    return (f"wrote {out}: byte-level BPE, {tok.get_vocab_size()} tokens ({len(specials)} special) trained on "
            f"{', '.join(files)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.data.train_tokenizer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUTS", help=".jsonl, .txt or .parquet files or globs")
    parser.add_argument("--out", required=True, help="the tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=4096, help="total tokens, specials included (default 4096)")
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column of the text")
    parser.add_argument("--force", action="store_true", help="train again even if --out exists")
    args = parser.parse_args(argv)
    if os.path.isfile(args.out) and not args.force:
        print(f"tokenizer already present: {args.out}; nothing to do (--force trains it again)")
        return 0
    try:
        print(train_tokenizer(args.inputs, args.out, args.vocab_size, args.text_key))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
