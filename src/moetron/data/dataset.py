"""Memory-mapped documents -> one packed token stream -> fixed-length training windows, at sample time.

* `Documents` lists the documents of one or more indexed shards in order (a trailing eos, as written by
  prepare or by Megatron-LM's --append-eod, is not part of a document: the packer adds exactly one).
* `PackedWindows` packs them, each followed by eos, a `fim_rate` share rewritten as Fill-in-Middle (PSM),
  into a virtual stream that is never materialized: only O(documents) offsets live in memory and a window's
  tokens are copied out of the memory-mapped shards when it is asked for. Whether and where document d is
  cut for FIM depends only on (seed, split, d): row d of one counter-based random stream, so the decision is
  reproducible, independent of every other document, and nested across rates (the FIM set at rate r is a
  subset of the one at any r' > r). Windows of seq_len + 1 tokens overlap by one (inputs w[:-1], targets
  w[1:]) and are served as an endless sequence of shuffled epochs addressed by a global position:
  `batch(start, count)` depends only on (start, count, seed). Resuming is choosing `start`.
* `BlendedWindows` interleaves several of them by weight in a fixed cycle, each in its own epochs.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from moetron.config.errors import invalid
from moetron.data.fim import layout
from moetron.data.indexed import IndexedShard

BLEND_CYCLE = 10_000  # positions per blend cycle: weights are honoured to 1e-4


class Documents:
    """The documents of `shards`, in order: document d is shard_of[d]'s tokens [start[d], start[d] + length[d])."""

    def __init__(self, shards: Sequence[IndexedShard], eos_id: int) -> None:
        self.shards = list(shards)
        self.shard_of = np.concatenate([np.full(s.num_documents, k, dtype=np.int32)
                                        for k, s in enumerate(self.shards)] or [np.zeros(0, np.int32)])
        self.start = np.concatenate([s.doc_start for s in self.shards] or [np.zeros(0, np.int64)]).astype(np.int64)
        end = np.concatenate([s.doc_end for s in self.shards] or [np.zeros(0, np.int64)]).astype(np.int64)
        last = np.full(len(end), -1, dtype=np.int64)
        first = 0
        for s in self.shards:
            mine = slice(first, first + s.num_documents)
            nonempty = s.doc_end > s.doc_start
            last[mine][nonempty] = s.tokens[s.doc_end[nonempty] - 1]
            s.release()  # one shard's pages resident at a time, however many shards
            first += s.num_documents
        self.length = end - self.start - (last == eos_id)
        self._touched: set[int] = set()  # shards read since the last release()

    def release(self) -> None:
        """Unmap the pages of the shards read since the last call (IndexedShard.release)."""
        for k in self._touched:
            self.shards[k].release()
        self._touched = set()

    def __len__(self) -> int:
        return len(self.start)

    def read(self, d: int, lo: int, hi: int) -> np.ndarray:
        self._touched.add(int(self.shard_of[d]))
        shard = self.shards[self.shard_of[d]]
        begin = int(self.start[d])
        return shard.tokens[begin + lo: begin + hi]


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"moetron.data.epoch/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the windows in `epoch`: torch.randperm seeded with (seed, epoch) only."""
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_sequences, generator=gen)


def fim_draws(seed: int, split: str, count: int) -> np.ndarray:
    """Row d: three uniforms for document d (FIM or not, then the two cuts); row d does not depend on `count`."""
    key = np.random.SeedSequence([int(seed) & (2**63 - 1), zlib.crc32(f"moetron.data.fim/{split}".encode())])
    return np.random.Generator(np.random.PCG64(key)).random((count, 3))


class PackedWindows:
    """Windows of seq_len + 1 tokens over the packed documents; window i starts at packed token i * seq_len."""

    def __init__(self, docs: Documents, seq_len: int, tok, fim_rate: float = 0.0, seed: int = 0,
                 split: str = "train", field: str = "data.train_files", names: Sequence[str] = ()) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise invalid("train.seq_len", seq_len, "a positive integer")
        self.docs, self.seq_len, self.tok = docs, seq_len, tok
        draws = fim_draws(seed, split, len(docs))
        self.fim = draws[:, 0] < fim_rate
        n = docs.length
        cuts = np.sort(np.floor(draws[:, 1:] * (n[:, None] + 1)).astype(np.int64), axis=1)
        self.cut_a, self.cut_b = cuts[:, 0], cuts[:, 1]
        self.ends = np.cumsum(n + 1 + 3 * self.fim)  # packed end of each document (eos and FIM markers)
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0
        if self.num_tokens < seq_len + 1:
            raise invalid(field, list(names),
                          f"data with at least train.seq_len + 1 = {seq_len + 1} tokens, or a smaller train.seq_len",
                          f"It holds {self.num_tokens} tokens in {len(docs)} documents, fewer than one window.")
        self.num_sequences = (self.num_tokens - 1) // seq_len
        self.names = list(names)
        self._perm_cache: tuple[int, int, torch.Tensor] | None = None  # (seed, epoch, perm), per instance

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (f"PackedWindows(documents={len(self.docs)}, tokens={self.num_tokens}, seq_len={self.seq_len}, "
                f"num_sequences={self.num_sequences})")

    def document(self, d: int) -> np.ndarray:
        """Document d as packed (FIM applied, eos appended): the reference `window` is cut from."""
        parts = [np.array([t]) if t >= 0 else self.docs.read(d, lo, hi).astype(np.int64)
                 for lo, hi, t in self._layout(d)]
        return np.concatenate(parts).astype(np.int64)

    def _layout(self, d: int):
        return layout(int(self.docs.length[d]), bool(self.fim[d]), int(self.cut_a[d]), int(self.cut_b[d]), self.tok)

    def _fill(self, out: np.ndarray, s: int) -> None:
        """Packed tokens [s, s + len(out)) into `out`, walking only the documents that overlap them."""
        e = s + len(out)
        d = int(np.searchsorted(self.ends, s, side="right"))
        cursor = int(self.ends[d - 1]) if d else 0
        while cursor < e:
            for lo, hi, token in self._layout(d):
                n = 1 if token >= 0 else hi - lo
                a, b = max(cursor, s), min(cursor + n, e)
                if a < b:
                    out[a - s: b - s] = token if token >= 0 else self.docs.read(d, lo + a - cursor, lo + b - cursor)
                cursor += n
                if cursor >= e:
                    break
            d += 1

    def window(self, i: int) -> np.ndarray:
        """Window i (0 <= i < num_sequences): packed tokens [i*seq_len, i*seq_len + seq_len + 1)."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"window {i} out of range [0, {self.num_sequences})")
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        self._fill(out, i * self.seq_len)
        return out

    def _perm(self, seed: int, epoch: int) -> torch.Tensor:
        cached = self._perm_cache
        if cached is not None and cached[0] == seed and cached[1] == epoch:
            return cached[2]
        perm = epoch_permutation(self.num_sequences, seed, epoch)
        self._perm_cache = (seed, epoch, perm)
        return perm

    def indices_at(self, positions: torch.Tensor, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        """Window indices at global positions (epoch e = position // num_sequences, shuffled per epoch)."""
        k = positions % self.num_sequences
        if not shuffle:
            return k
        epochs = positions // self.num_sequences
        idx = torch.empty_like(k)
        for e in torch.unique(epochs).tolist():
            mask = epochs == e
            idx[mask] = self._perm(seed, e)[k[mask]]
        return idx

    def indices(self, start: int, count: int, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        return self.indices_at(torch.arange(start, start + count, dtype=torch.int64), shuffle, seed)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        out = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for r, i in enumerate(idx.tolist()):
            self._fill(out[r], i * self.seq_len)
        self.docs.release()  # the rows are copies: the mapped pages need not stay resident
        return torch.from_numpy(out)

    def batch(self, start: int, count: int, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        """LongTensor[count, seq_len + 1]: the windows at global positions start .. start+count-1.

        batch(a, n + m) == cat(batch(a, n), batch(a + n, m)) for any split, which makes resume exact.
        """
        return self.rows(self.indices(start, count, shuffle=shuffle, seed=seed))


def blend_schedule(weights: Sequence[float], cycle: int = BLEND_CYCLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, source, rank): each source's positions per cycle (largest remainder, at least 1 each), the
    source of each position in the cycle (spread evenly: the source furthest behind its share goes next),
    and the position's index among its source's positions in the cycle."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    counts = np.maximum(np.floor(w * cycle).astype(np.int64), 1)
    order = np.argsort(-(w * cycle - np.floor(w * cycle)), kind="stable")
    for j in order[: max(cycle - int(counts.sum()), 0)]:
        counts[j] += 1
    cycle = int(counts.sum())
    source = np.empty(cycle, dtype=np.int64)
    rank = np.empty(cycle, dtype=np.int64)
    taken = np.zeros(len(counts), dtype=np.int64)
    for r in range(cycle):
        j = int(np.argmax(counts * (r + 1) / cycle - taken))
        source[r], rank[r] = j, taken[j]
        taken[j] += 1
    return counts, source, rank


class BlendedWindows:
    """Several PackedWindows sampled by weight: position p is source[p % C]'s position
    (p // C) * counts[j] + rank[p % C] in that source's own shuffled epochs."""

    def __init__(self, parts: Sequence[PackedWindows], weights: Sequence[float]) -> None:
        self.parts = list(parts)
        self.weights = [float(w) for w in weights]
        self.counts, self.source, self.rank = blend_schedule(self.weights)
        self.seq_len = self.parts[0].seq_len
        self.num_sequences = sum(p.num_sequences for p in self.parts)
        self.num_tokens = sum(p.num_tokens for p in self.parts)

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return f"BlendedWindows(weights={self.weights}, parts={self.parts})"

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, position within that source) of global positions start .. start+count-1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        pos = np.arange(start, start + count, dtype=np.int64)
        cycle, r = np.divmod(pos, len(self.source))
        j = self.source[r]
        return j, cycle * self.counts[j] + self.rank[r]

    def batch(self, start: int, count: int, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        j, local = self.locate(start, count)
        out = torch.empty((count, self.seq_len + 1), dtype=torch.int64)
        for k, part in enumerate(self.parts):
            mine = np.nonzero(j == k)[0]
            if len(mine):
                idx = part.indices_at(torch.from_numpy(local[mine]), shuffle, seed)
                out[torch.from_numpy(mine)] = part.rows(idx)
        return out
