"""Documents -> one packed token stream -> fixed-length training windows.

* `encode_documents` reads .jsonl / .txt files, tokenizes every document, rewrites a `fim_rate` share
  of them as Fill-in-Middle (PSM) and appends `<|eos|>` to each; the result is one 1-D int64 stream.
  Whether (and where) document number i is cut for FIM depends only on (seed, i): its own RNG, seeded
  from those two numbers, so the decision is reproducible, independent of every other document's
  content, length or decision, and nested across rates (the FIM set at rate r is a subset of the one
  at any rate r' > r). The index i counts documents over all files in order, empty ones included.
* `TokenWindows` cuts the stream into windows of seq_len + 1 tokens that overlap by one token
  (inputs w[:-1], targets w[1:]), and serves them as an endless sequence of shuffled epochs addressed
  by a global position: `batch(start, count)` depends only on (start, count, seed). Resuming a run or
  skipping data is choosing `start`; no iterator state needs saving.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moetron.config.errors import invalid
from moetron.data.fim import to_psm

EXTENSIONS = (".jsonl", ".txt")
TXT_SEPARATOR = "<|endoftext|>"
_TXT_SPLIT = re.compile(r"^<\|endoftext\|>\r?(?:\n|\Z)", re.MULTILINE)
CORPUS_HINT = ("to build the default corpus run `make corpus` or "
               "`python -m moetron.data.corpus data/corpus`")


def _shown(path: str) -> str:
    absolute = os.path.abspath(path)
    return path if absolute == path else f"{path} (resolved to {absolute})"


def check_files(files: Sequence[str], field: str) -> list[str]:
    """Validate the list itself and every path in it before any work: existence and extension."""
    if isinstance(files, str):
        files = [files]
    files = list(files) if files is not None else []
    if not files:
        raise invalid(field, files, f"a non-empty list of .jsonl or .txt files; {CORPUS_HINT}")
    for path in files:
        if not isinstance(path, str) or not path:
            raise invalid(field, path, "a file path (string)")
        if not path.endswith(EXTENSIONS):
            raise invalid(field, path, "a .jsonl file (one JSON object with a string field \"text\" per line) "
                          f"or a .txt file (documents separated by a line that is exactly {TXT_SEPARATOR})",
                          "Unknown file extension.")
        if not os.path.isfile(path):
            raise invalid(field, path, f"an existing .jsonl or .txt file; {CORPUS_HINT}",
                          f"No such file: {_shown(path)}.")
    return files


def iter_documents(path: str, field: str = "data.train_files") -> Iterator[str]:
    """The documents of one file, in order (empty ones included; the caller skips them)."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
        yield from _TXT_SPLIT.split(text)
        return
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise invalid(field, path, "JSON Lines: one JSON object per line with a string field \"text\"",
                              f"Line {lineno} of {path} is not valid JSON ({exc.msg} at column {exc.colno}).") \
                    from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                got = f"an object with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
                raise invalid(field, path, "JSON Lines: one JSON object per line with a string field \"text\"",
                              f"Line {lineno} of {path} is {got}, not an object with a string \"text\".")
            yield obj["text"]


def document_rng(seed: int, index: int, split: str = "train") -> random.Random:
    """The RNG of document `index` (global over the split's files): a function of (seed, index, split) only."""
    return random.Random(f"moetron.data.fim/{split}/{int(seed)}/{int(index)}")


def _encode(tok, text: str) -> np.ndarray:
    fast = getattr(tok, "encode_array", None)
    if fast is not None:
        return fast(text)
    return np.asarray(tok.encode(text), dtype=np.int64)


def encode_documents(files: Sequence[str], tok, fim_rate: float, seed: int,
                     field: str = "data.train_files", split: str = "train") -> torch.Tensor:
    """Tokenize the documents of `files` in order into one 1-D int64 stream, each followed by eos.

    `field` names the config field in error messages; `split` keys the per-document RNG so that the
    train and val splits draw independent FIM decisions from the same seed.
    """
    files = check_files(files, field)
    eos = np.array([tok.eos_id], dtype=np.int64)
    chunks: list[np.ndarray] = []
    index = 0
    for path in files:
        found = 0
        for text in iter_documents(path, field):
            rng = document_rng(seed, index, split)
            index += 1
            if not text:
                continue
            if rng.random() < fim_rate:
                chunks.append(np.asarray(to_psm(text, rng, tok), dtype=np.int64))
            else:
                chunks.append(_encode(tok, text))
            chunks.append(eos)
            found += 1
        if not found:
            raise invalid(field, path, "a file with at least one non-empty document",
                          f"{_shown(path)} contains no documents.")
    return torch.from_numpy(np.concatenate(chunks))


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"moetron.data.epoch/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the windows in `epoch`: torch.randperm seeded with (seed, epoch) only."""
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_sequences, generator=gen)


class TokenWindows:
    """Windows of seq_len + 1 tokens over a packed stream; window i starts at token i * seq_len."""

    def __init__(self, stream: torch.Tensor, seq_len: int, files: Sequence[str] = (),
                 field: str = "data.train_files") -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise invalid("train.seq_len", seq_len, "a positive integer")
        stream = torch.as_tensor(stream, dtype=torch.int64)
        if stream.dim() != 1:
            raise ValueError(f"the token stream must be 1-D, got shape {tuple(stream.shape)}")
        if stream.numel() < seq_len + 1:
            names = ", ".join(files) if files else "(in-memory stream)"
            raise invalid(field, list(files),
                          f"files with at least train.seq_len + 1 = {seq_len + 1} tokens, or a smaller "
                          "train.seq_len",
                          f"They hold {stream.numel()} tokens ({names}), fewer than one window of "
                          f"train.seq_len={seq_len} plus one target token.")
        self.stream = stream
        self.seq_len = seq_len
        self.files = list(files)
        self.num_sequences = (stream.numel() - 1) // seq_len
        # View [num_sequences, seq_len + 1] with row stride seq_len: window i without copying the stream.
        self._windows = stream[: self.num_sequences * seq_len + 1].unfold(0, seq_len + 1, seq_len)
        self._perm_cache: tuple[int, int, torch.Tensor] | None = None  # (seed, epoch, perm), per instance

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (f"TokenWindows(tokens={self.stream.numel()}, seq_len={self.seq_len}, "
                f"num_sequences={self.num_sequences})")

    @property
    def num_tokens(self) -> int:
        return self.stream.numel()

    def window(self, i: int) -> torch.Tensor:
        """Window i (0 <= i < num_sequences): stream[i*seq_len : i*seq_len + seq_len + 1]."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"window {i} out of range [0, {self.num_sequences})")
        return self.stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1]

    def _perm(self, seed: int, epoch: int) -> torch.Tensor:
        cached = self._perm_cache
        if cached is not None and cached[0] == seed and cached[1] == epoch:
            return cached[2]
        perm = epoch_permutation(self.num_sequences, seed, epoch)
        self._perm_cache = (seed, epoch, perm)
        return perm

    def indices(self, start: int, count: int, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        """Window indices at global positions start .. start+count-1 (epoch e = position // num_sequences)."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        pos = torch.arange(start, start + count, dtype=torch.int64)
        k = pos % self.num_sequences
        if not shuffle:
            return k
        epochs = pos // self.num_sequences
        idx = torch.empty_like(k)
        for e in range(start // self.num_sequences, (start + count - 1) // self.num_sequences + 1):
            mask = epochs == e
            idx[mask] = self._perm(seed, e)[k[mask]]
        return idx

    def batch(self, start: int, count: int, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        """LongTensor[count, seq_len + 1]: the windows at global positions start .. start+count-1.

        batch(a, n + m) == cat(batch(a, n), batch(a + n, m)) for any split, which makes resume exact.
        """
        idx = self.indices(start, count, shuffle=shuffle, seed=seed)
        # index_select on the overlapping-window view copies whole rows; advanced indexing with a 2-D
        # index tensor is ~1000x slower on a busy multi-threaded CPU.
        return self._windows.index_select(0, idx)
