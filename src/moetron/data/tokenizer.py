"""Tokenizers: a dependency-free byte-level one and a wrapper around a Hugging Face `tokenizers` file.

Both expose the same small surface the data pipeline and the trainer use: ``vocab_size``, the ids of
the five special tokens, ``encode(text) -> list[int]`` (no special tokens added) and ``decode``.
"""

from __future__ import annotations

import os

import numpy as np

from moetron.config.errors import invalid

EOS = "<|eos|>"
FIM_BEGIN = "<|fim_begin|>"
FIM_HOLE = "<|fim_hole|>"
FIM_END = "<|fim_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, FIM_BEGIN, FIM_HOLE, FIM_END, PAD)


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256..260 are the special tokens, in SPECIAL_TOKENS order."""

    def __init__(self) -> None:
        self.specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.eos_id = self.specials[EOS]
        self.fim_begin_id = self.specials[FIM_BEGIN]
        self.fim_hole_id = self.specials[FIM_HOLE]
        self.fim_end_id = self.specials[FIM_END]
        self.pad_id = self.specials[PAD]
        self._names = {i: name for name, i in self.specials.items()}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        # Lone surrogates (possible in JSON input) cannot be UTF-8 encoded; they become '?'.
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        """The same ids as `encode`, as an int64 array, without building a Python list (fast path)."""
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            out.append(self._names.get(i, "\ufffd"))
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file whose vocabulary contains the five special tokens."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        field = "data.tokenizer"
        self.path = path
        if not os.path.isfile(path):
            raise invalid(field, path, "the path of a Hugging Face `tokenizers` JSON file, or null for the "
                          "built-in byte-level tokenizer",
                          f"No such file (resolved to {os.path.abspath(path)}).")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises plain Exception subclasses for any parse failure
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise invalid(field, path, "a tokenizer.json saved by the Hugging Face `tokenizers` library "
                          "(Tokenizer.save), or null for the built-in byte-level tokenizer",
                          f"The file could not be loaded as a tokenizer ({first_line}).") from None
        ids = {name: self._tok.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise invalid(field, path, "a tokenizer whose vocabulary contains all of "
                          + ", ".join(SPECIAL_TOKENS)
                          + " (add them with Tokenizer.add_special_tokens and save it again)",
                          f"Its vocabulary lacks the special token(s) {', '.join(missing)}.")
        # Text that happens to contain "<|eos|>" etc. stays text; only the pipeline inserts control tokens.
        self._tok.encode_special_tokens = True
        self.specials = ids
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = ids[EOS]
        self.fim_begin_id = ids[FIM_BEGIN]
        self.fim_hole_id = ids[FIM_HOLE]
        self.fim_end_id = ids[FIM_END]
        self.pad_id = ids[PAD]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | None) -> ByteTokenizer | HFTokenizer:
    """None (or an empty string) gives the byte-level tokenizer; otherwise a `tokenizers` JSON file."""
    if path is None or path == "":
        return ByteTokenizer()
    if not isinstance(path, str):
        raise invalid("data.tokenizer", path, "null (byte-level) or the path of a `tokenizers` JSON file")
    return HFTokenizer(path)
