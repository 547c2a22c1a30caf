"""Tokenizers: a dependency-free byte-level one and any Hugging Face `tokenizers` JSON file.

Both expose the surface the data path and the trainer use: ``vocab_size``, the ids of the six special
tokens (named by `data.special_tokens`; DeepSeek-V3's names by default), ``encode(text) -> list[int]``
(no special tokens added), ``encode_batch(texts) -> list[np.ndarray]``, ``decode`` and ``fingerprint``
(a hash of the vocabulary file, recorded by prepare so that shards are never read with another tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

import numpy as np

from moetron.config.data import SpecialTokens
from moetron.config.errors import invalid

# The byte tokenizer's ids 256.. in this order (eos first keeps the ids of earlier versions).
BYTE_SPECIAL_ORDER = ("eos", "fim_prefix", "fim_suffix", "fim_middle", "pad", "bos")


class _Specials:
    """Named ids of the special tokens: bos_id, eos_id, pad_id, fim_prefix_id, fim_suffix_id, fim_middle_id."""

    def _set_specials(self, names: SpecialTokens, ids: dict[str, int]) -> None:
        self.special_names = names
        self.specials = {getattr(names, role): i for role, i in ids.items()}
        for role, i in ids.items():
            setattr(self, f"{role}_id", i)


class ByteTokenizer(_Specials):
    """Ids 0..255 are the UTF-8 bytes of the text; 256..261 are the special tokens (BYTE_SPECIAL_ORDER)."""

    def __init__(self, names: SpecialTokens | None = None) -> None:
        names = names or SpecialTokens()
        self._set_specials(names, {role: 256 + i for i, role in enumerate(BYTE_SPECIAL_ORDER)})
        self.vocab_size = 256 + len(BYTE_SPECIAL_ORDER)
        self._names = {i: name for name, i in self.specials.items()}
        self.path = None
        self.fingerprint = "bytes"

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        # Lone surrogates (possible in JSON input) cannot be UTF-8 encoded; they become '?'.
        return list(text.encode("utf-8", errors="replace"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
                for t in texts]

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


class HFTokenizer(_Specials):
    """A Hugging Face `tokenizers` JSON file whose vocabulary holds the configured special tokens."""

    def __init__(self, path: str, names: SpecialTokens | None = None) -> None:
        from tokenizers import Tokenizer

        names = names or SpecialTokens()
        self.path = path
        if not os.path.isfile(path):
            raise invalid("data.tokenizer", path, "the path of a Hugging Face `tokenizers` JSON file (`make corpus` "
                          "trains data/corpus/tokenizer.json), or null for the built-in byte-level tokenizer",
                          f"No such file (resolved to {os.path.abspath(path)}).")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for any parse failure
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise invalid("data.tokenizer", path, "a tokenizer.json saved by the Hugging Face `tokenizers` "
                          "library (Tokenizer.save), or null for the built-in byte-level tokenizer",
                          f"The file could not be loaded as a tokenizer ({first_line}).") from None
        ids = {}
        for role, name in asdict(names).items():
            ids[role] = self._tok.token_to_id(name)
            if ids[role] is None:
                added = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
                shown = ", ".join(added[:8]) + (", ..." if len(added) > 8 else "") if added else "none"
                raise invalid(f"data.special_tokens.{role}", name,
                              f"a token in the vocabulary of {path} (its special tokens include: {shown}); "
                              "set data.special_tokens.* to the names your tokenizer uses",
                              f"{path} has no token {name!r}.")
        # Text that happens to contain a special token's name stays text; only the pipeline inserts them.
        self._tok.encode_special_tokens = True
        self._set_specials(names, ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "hf/" + hashlib.sha256(raw).hexdigest()[:16]  # what ids the tokens mean
        self._fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Batch encoding in the tokenizers library (Rust), one int64 array per text."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self._fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | None, names: SpecialTokens | None = None) -> ByteTokenizer | HFTokenizer:
    """None (or an empty string) gives the byte-level tokenizer; otherwise a `tokenizers` JSON file."""
    if path is None or path == "":
        return ByteTokenizer(names)
    if not isinstance(path, str):
        raise invalid("data.tokenizer", path, "null (byte-level) or the path of a `tokenizers` JSON file")
    return HFTokenizer(path, names)
