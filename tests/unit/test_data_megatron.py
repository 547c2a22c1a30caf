"""Interop with Megatron-Core 0.16.1's indexed dataset (a test-only dependency, `make install` adds it):
data its builder writes reads here token for token, and data our prepare writes reads there."""

import json
import os

import numpy as np
import pytest
import torch

from moetron.config import DataConfig
from moetron.data import build_data
from moetron.data.dataset import Documents, PackedWindows
from moetron.data.indexed import IndexedShard
from moetron.data.prepare import prepare
from moetron.data.tokenizer import load_tokenizer

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                      reason="megatron-core is installed by `make install` (test-only)")


def megatron_documents(rng, n, vocab):
    """Documents of 1..3 sequences each (as Megatron's sentence-split preprocessing writes them)."""
    docs = []
    for _ in range(n):
        seqs = [rng.integers(0, vocab, int(rng.integers(1, 30))) for _ in range(int(rng.integers(1, 4)))]
        docs.append(seqs)
    return docs


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_builder_output_reads_here_token_for_token(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = megatron_documents(rng, 50, 4000)
    prefix = str(tmp_path / "megatron")
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for seqs in docs:
        builder.add_document(torch.from_numpy(np.concatenate(seqs)), [len(s) for s in seqs])
    builder.finalize(prefix + ".idx")

    shard = IndexedShard(prefix)
    assert shard.dtype == np.dtype(dtype) and shard.num_documents == len(docs)
    for d, seqs in enumerate(docs):
        assert shard.document(d).tolist() == np.concatenate(seqs).tolist()
    # And through build_data, by prefix: the packed stream is the documents, each followed by eos.
    tok = load_tokenizer(None)
    docs_bytes = [np.concatenate(s) % 256 for s in docs]  # the byte tokenizer's range
    small = str(tmp_path / "bytes")
    builder = indexed_dataset.IndexedDatasetBuilder(small + ".bin", dtype=dtype)
    for d in docs_bytes:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(small + ".idx")
    bundle = build_data(DataConfig(train_files=[small], val_files=[], fim_rate=0.0), seq_len=16, seed=0)
    stream = np.concatenate([np.append(d, tok.eos_id) for d in docs_bytes])
    got = bundle.train.batch(0, bundle.train.num_sequences, shuffle=False).numpy()
    assert np.array_equal(np.concatenate([got[:, :-1].ravel(), got[-1, -1:]]), stream[: got.shape[0] * 16 + 1])


def test_our_prepare_reads_in_megatron(tmp_path):
    texts = [f"document {i} " + "naïve café 🙂 " * (i % 7) for i in range(120)]
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    manifest = prepare([str(src)], None, str(tmp_path / "out"), shard_mb=0.002, progress=False)
    tok = load_tokenizer(None)
    got = []
    for s in manifest["shards"]:
        prefix = os.path.join(tmp_path, "out", s["name"])
        assert indexed_dataset.IndexedDataset.exists(prefix)
        ds = indexed_dataset.IndexedDataset(prefix)
        assert len(ds) == s["documents"] and len(ds.document_indices) == s["documents"] + 1
        got += [ds[i].tolist() for i in range(len(ds))]
        assert ds.index.dtype == np.uint16
        # Megatron's view of each document equals ours, read through the same files.
        ours = Documents([IndexedShard(prefix)], tok.eos_id)
        assert ds.sequence_lengths.tolist() == (ours.length + 1).tolist()
    assert got == [tok.encode(t) + [tok.eos_id] for t in texts]  # --append-eod layout
    windows = PackedWindows(Documents([IndexedShard(os.path.join(tmp_path, "out", s["name"]))
                                       for s in manifest["shards"]], tok.eos_id), 32, tok)
    assert windows.num_tokens == sum(len(g) for g in got)  # the eos stored in the shard is not doubled
