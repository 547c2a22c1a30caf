"""Megatron-LM's indexed dataset format (.bin + .idx), written and read here without Megatron.

PREFIX.bin holds the token ids of every sequence back to back. PREFIX.idx holds, little-endian:
the 9-byte magic ``MMIDIDX\\0\\0``, a u64 version (1), a u8 dtype code of the tokens, the u64 sequence
and document counts, then int32 sequence lengths, int64 byte offsets of the sequences in .bin, and
int64 document indices (the sequence index where each document starts, a leading 0, the count last),
optionally followed by one int8 mode per sequence (multimodal data). We write one sequence per document.

Writing is crash-safe: both files go to temporary names, .bin is renamed into place first and .idx last,
so an .idx that exists always describes a complete .bin. Reading validates the index against its .bin
before anything is memory-mapped, so a truncated or mismatched pair is a ConfigError, not garbage tokens.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from moetron.config.errors import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 ids (2 bytes a token), int32 above."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def shard_paths(prefix: str) -> tuple[str, str]:
    return prefix + ".bin", prefix + ".idx"


class IndexedWriter:
    """Write one shard: `add(tokens)` per document, then `finish()`; `abort()` leaves nothing behind."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._tmp = f".tmp{os.getpid()}"
        self._bin = open(self.bin_path + self._tmp, "wb")
        self.lengths: list[int] = []

    def add(self, tokens: np.ndarray) -> None:
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.lengths.append(len(tokens))

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self.idx_path + self._tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.bin_path + self._tmp, self.bin_path)
        os.replace(self.idx_path + self._tmp, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        for path in (self.bin_path + self._tmp, self.idx_path + self._tmp):
            if os.path.exists(path):
                os.remove(path)


def _bad(path: str, field: str, what: str, fix: str) -> ConfigError:
    return ConfigError(f"Invalid data in `{field}`: {path} {what}. {fix}")


REPREPARE = "Prepare the data again (python -m moetron.data.prepare ...) or restore the file from its source."


class IndexedShard:
    """One Megatron indexed dataset, memory-mapped: `tokens` (1-D, the .bin) and each document's token
    range [doc_start, doc_end). Nothing but the O(documents) start/end arrays lives in process memory;
    `release()` drops the mapped pages read so far from the process."""

    def __init__(self, prefix: str, field: str = "data.train_files") -> None:
        self.prefix = prefix
        bin_path, idx_path = shard_paths(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise _bad(path, field, "is missing: a shard is a PREFIX.bin and PREFIX.idx pair and this one "
                           "has no " + os.path.splitext(path)[1], REPREPARE)
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise _bad(idx_path, field, "is not a Megatron-LM index (.idx): its header is not MMIDIDX", REPREPARE)
        version, code = struct.unpack("<QB", head[9:18])
        seqs, docs = struct.unpack("<QQ", head[18:34])
        if version != VERSION or code not in DTYPE_CODES:
            raise _bad(idx_path, field, f"has index version {version} and dtype code {code}; version 1 with "
                       f"a code in {sorted(DTYPE_CODES)} is valid", REPREPARE)
        body = seqs * 4 + seqs * 8 + docs * 8
        if idx_size not in (HEADER_BYTES + body, HEADER_BYTES + body + seqs):
            raise _bad(idx_path, field, f"is {idx_size} bytes but its header announces {seqs} sequences and "
                       f"{docs} document indices ({HEADER_BYTES + body} bytes): the index is truncated or corrupt",
                       REPREPARE)
        self.dtype = np.dtype(DTYPE_CODES[code])
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        lengths = np.frombuffer(index, dtype=np.int32, count=seqs, offset=HEADER_BYTES)
        pointers = np.frombuffer(index, dtype=np.int64, count=seqs, offset=HEADER_BYTES + seqs * 4)
        doc_index = np.frombuffer(index, dtype=np.int64, count=docs, offset=HEADER_BYTES + seqs * 12)
        item = self.dtype.itemsize
        expected = int(pointers[-1]) + int(lengths[-1]) * item if seqs else 0
        actual = os.path.getsize(bin_path)
        if actual < expected:
            raise _bad(bin_path, field, f"is {actual} bytes but its index {idx_path} describes {expected} bytes "
                       f"of tokens: the .bin is truncated", REPREPARE)
        if actual != expected:
            raise _bad(bin_path, field, f"is {actual} bytes but its index {idx_path} describes {expected} bytes "
                       "of tokens: the index does not belong to this .bin", REPREPARE)
        if seqs and (pointers[0] != 0 or (lengths < 0).any()
                     or not np.array_equal(np.diff(pointers), lengths[:-1].astype(np.int64) * item)):
            raise _bad(idx_path, field, f"disagrees with {bin_path}: its sequence offsets are not the running sum "
                       "of its sequence lengths", REPREPARE)
        if docs < 1 or doc_index[0] != 0 or doc_index[-1] != seqs or (np.diff(doc_index) < 0).any():
            raise _bad(idx_path, field, f"has document indices that do not run from 0 to its {seqs} sequences",
                       REPREPARE)
        # A document is the run of sequences doc_index[d] .. doc_index[d+1], contiguous in .bin.
        starts = doc_index[:-1]
        ends = doc_index[1:]
        keep = ends > starts  # a document without sequences has no tokens
        starts, ends = starts[keep], ends[keep]
        self.doc_start = pointers[starts] // item
        self.doc_end = pointers[ends - 1] // item + lengths[ends - 1]
        self.num_tokens = expected // item
        self._map = None
        self.tokens = np.zeros(0, dtype=self.dtype)
        if self.num_tokens:
            with open(bin_path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.tokens = np.frombuffer(self._map, dtype=self.dtype, count=self.num_tokens)
        del index, lengths, pointers, doc_index  # the O(sequences) index is not kept

    def release(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache, shared by the ranks),
        so that a rank's resident memory does not grow with the share of the corpus it has read."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    @property
    def num_documents(self) -> int:
        return len(self.doc_start)

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.doc_start[d]: self.doc_end[d]]

    def __repr__(self) -> str:
        return f"IndexedShard({self.prefix!r}, documents={self.num_documents}, tokens={self.num_tokens})"
