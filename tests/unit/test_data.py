"""The data pipeline: tokenizers, FIM (PSM), packing, resumable windows, errors, corpus builder."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from moetron.config import ConfigError, DataConfig
from moetron.data import DataBundle, build_data
from moetron.data.corpus import build_corpus
from moetron.data.corpus import main as corpus_main
from moetron.data.dataset import TokenWindows, encode_documents
from moetron.data.fim import parse_psm, to_psm
from moetron.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "héllo wörld — naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed\nlines\ttabs", ""]


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def split_docs(stream, eos):
    """The per-document token lists of a packed stream (the byte tokenizer never emits eos inside a doc)."""
    docs, cur = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "the stream ends with eos"
    return docs


def is_fim(doc, tok):
    return bool(doc) and doc[0] == tok.fim_begin_id


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids
    assert tok.decode([tok.eos_id, 104, 105, tok.fim_hole_id]) == "<|eos|>hi<|fim_hole|>"
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 is replaced, not raised
    # Text spelling a special token stays bytes.
    assert tok.eos_id not in tok.encode("<|eos|>")


def test_byte_tokenizer_specials():
    tok = ByteTokenizer()
    ids = [tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id, tok.pad_id]
    assert len(set(ids)) == 5
    assert all(256 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == 261
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def make_hf_tokenizer(path, specials=SPECIAL_TOKENS):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "the", "cat", "sat", "on", "mat"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = make_hf_tokenizer(tmp_path / "tok.json")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 8 + 5
    ids = [tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id, tok.pad_id]
    assert sorted(ids) == list(range(8, 13))
    enc = tok.encode("the cat sat on the mat")
    assert len(enc) == 6 and not set(enc) & set(ids)
    assert tok.decode(enc) == "the cat sat on the mat"
    assert tok.eos_id not in tok.encode("hello <|eos|> world")  # document text cannot inject specials
    # The whole pipeline runs on it, FIM included.
    data = write_jsonl(tmp_path / "d.jsonl", ["hello world the cat"] * 20)
    stream = encode_documents([data], tok, fim_rate=1.0, seed=0)
    assert (stream == tok.fim_begin_id).sum() == 20 and (stream == tok.eos_id).sum() == 20


def test_hf_tokenizer_errors(tmp_path):
    path = make_hf_tokenizer(tmp_path / "nopad.json", specials=SPECIAL_TOKENS[:-1])
    with pytest.raises(ConfigError, match=r"data\.tokenizer") as e:
        HFTokenizer(path)
    assert "<|pad|>" in str(e.value) and path in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*No such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*could not be loaded"):
        load_tokenizer(str(bad))


# ---------------------------------------------------------------- FIM

def test_psm_layout_round_trip():
    tok = ByteTokenizer()
    rng = random.Random(1)
    docs = TEXTS[:-1] + ["x", "ab", "".join(rng.choice("aé日🙂 \n") for _ in range(60))]
    for text in docs:
        cuts = set()
        for _ in range(30):
            ids = to_psm(text, rng, tok)
            assert ids[0] == tok.fim_begin_id
            assert ids.index(tok.fim_begin_id) < ids.index(tok.fim_hole_id) < ids.index(tok.fim_end_id)
            assert sum(i >= 256 for i in ids) == 3
            prefix, middle, suffix = (tok.decode(p) for p in parse_psm(ids, tok))
            # Cuts at characters: every part decodes cleanly and the parts reassemble the document.
            assert "\ufffd" not in prefix + middle + suffix
            assert prefix + middle + suffix == text
            assert suffix == text[len(text) - len(suffix):]
            cuts.add((len(prefix), len(middle)))
        if len(text) >= 10:  # the cuts are random: many distinct (prefix, middle) lengths, non-empty middles
            assert len(cuts) >= 10 and any(m > 0 for _, m in cuts)


def test_psm_in_stream(tmp_path):
    tok = ByteTokenizer()
    texts = [t for t in TEXTS if t] * 5
    stream = encode_documents([write_jsonl(tmp_path / "d.jsonl", texts)], tok, 1.0, seed=3)
    docs = split_docs(stream, tok.eos_id)
    assert len(docs) == len(texts)
    for ids, text in zip(docs, texts):
        p, m, s = parse_psm(ids, tok)
        assert tok.decode(p + m + s) == text


def test_fim_rate(tmp_path):
    tok = ByteTokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [f"document number {i}" for i in range(2000)])
    for rate, lo, hi in [(0.1, 0.07, 0.13), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]:
        docs = split_docs(encode_documents([path], tok, rate, seed=0), tok.eos_id)
        assert len(docs) == 2000
        share = sum(is_fim(d, tok) for d in docs) / len(docs)
        assert lo <= share <= hi, (rate, share)
    # Nested across rates: the FIM set at 0.1 is a subset of the one at 0.3 (same seed).
    a = [is_fim(d, tok) for d in split_docs(encode_documents([path], tok, 0.1, seed=0), tok.eos_id)]
    b = [is_fim(d, tok) for d in split_docs(encode_documents([path], tok, 0.3, seed=0), tok.eos_id)]
    assert all(y for x, y in zip(a, b) if x) and sum(b) > sum(a)
    # Another seed picks other documents.
    c = [is_fim(d, tok) for d in split_docs(encode_documents([path], tok, 0.1, seed=1), tok.eos_id)]
    assert a != c


def test_fim_decision_depends_only_on_seed_and_index(tmp_path):
    """Guarantee: document i's FIM decision and cut points are a function of (seed, i) only; changing
    any other document's content or length, or how the documents are split into files, changes nothing."""
    tok = ByteTokenizer()
    texts = [f"doc {i} " + "abcdefghij" * (i % 7 + 1) for i in range(200)]
    base = split_docs(encode_documents([write_jsonl(tmp_path / "a.jsonl", texts)], tok, 0.5, seed=7),
                      tok.eos_id)
    assert 50 < sum(is_fim(d, tok) for d in base) < 150
    # Rewrite every even document (other lengths, other content): the odd ones come out identical.
    changed = [t if i % 2 else f"rewritten {i} " * (i % 5 + 3) for i, t in enumerate(texts)]
    other = split_docs(encode_documents([write_jsonl(tmp_path / "b.jsonl", changed)], tok, 0.5, seed=7),
                       tok.eos_id)
    assert other[1::2] == base[1::2] and other[0::2] != base[0::2]
    assert [is_fim(d, tok) for d in other] == [is_fim(d, tok) for d in base]
    two_files = [write_jsonl(tmp_path / "c1.jsonl", texts[:77]), write_jsonl(tmp_path / "c2.jsonl", texts[77:])]
    assert split_docs(encode_documents(two_files, tok, 0.5, seed=7), tok.eos_id) == base


# ---------------------------------------------------------------- packing and windows

def test_txt_format(tmp_path):
    tok = ByteTokenizer()
    p = tmp_path / "a.txt"
    p.write_text("first doc\n<|endoftext|>\nsecond\n<|endoftext|> not a separator\n<|endoftext|>\n")
    q = tmp_path / "b.txt"
    q.write_text("one document\nwithout separators\n")
    docs = [tok.decode(d) for d in split_docs(encode_documents([str(p), str(q)], tok, 0.0, 0), tok.eos_id)]
    assert docs == ["first doc\n", "second\n<|endoftext|> not a separator\n",
                    "one document\nwithout separators\n"]


def test_windows_overlap_and_cover():
    stream = torch.arange(1000, 1103)
    w = TokenWindows(stream, seq_len=10)
    assert w.num_sequences == 10 == len(w)
    wins = w.batch(0, w.num_sequences, shuffle=False)
    assert wins.shape == (10, 11) and wins.dtype == torch.int64
    for i in range(10):
        assert torch.equal(wins[i], stream[i * 10: i * 10 + 11])
        assert torch.equal(wins[i], w.window(i))
    assert torch.equal(wins[:-1, -1], wins[1:, 0])  # consecutive windows share exactly one token
    covered = torch.cat([wins[:, :-1].reshape(-1), wins[-1, -1:]])
    assert torch.equal(covered, stream[: 10 * 10 + 1])
    # Exactly seq_len + 1 tokens is one window; fewer is an error naming seq_len and the files.
    assert TokenWindows(torch.arange(11), 10).num_sequences == 1
    with pytest.raises(ConfigError, match=r"data\.train_files.*f\.jsonl.*seq_len=10"):
        TokenWindows(torch.arange(10), 10, files=["f.jsonl"])


def test_batch_resumable_and_deterministic():
    stream = torch.arange(10 * 7 + 1)
    w = TokenWindows(stream, seq_len=7)
    n = w.num_sequences
    assert n == 10
    assert torch.equal(w.batch(0, 10), torch.cat([w.batch(0, 4), w.batch(4, 6)]))
    # Any split of a span crossing several epochs, on a fresh instance (no hidden iterator state).
    whole = w.batch(3, 3 * n + 5, seed=11)
    rng = random.Random(0)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, 3 * n + 5), 4))
        fresh = TokenWindows(stream, seq_len=7)
        parts, pos = [], 3
        for end in cuts + [3 * n + 5]:
            parts.append(fresh.batch(pos, 3 + end - pos, seed=11))
            pos = 3 + end
        assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(w.batch(5, 20, seed=11), TokenWindows(stream, 7).batch(5, 20, seed=11))
    assert not torch.equal(w.batch(0, n, seed=0), w.batch(0, n, seed=1))
    # Each epoch is a permutation of all windows, and epochs differ.
    epochs = [w.indices(e * n, n, seed=11) for e in range(4)]
    for idx in epochs:
        assert sorted(idx.tolist()) == list(range(n))
    assert len({tuple(e.tolist()) for e in epochs}) > 1
    starts = w.batch(0, n, seed=11)[:, 0]
    assert sorted(starts.tolist()) == [i * 7 for i in range(n)]
    # Unshuffled: windows in order, wrapping around.
    assert w.indices(8, 5, shuffle=False).tolist() == [8, 9, 0, 1, 2]
    assert w.batch(4, 0).shape == (0, 8)


# ---------------------------------------------------------------- build_data and errors

def test_build_data_and_val(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", ["some training text " * 5] * 30)
    val = write_jsonl(tmp_path / "v.jsonl", ["held out text " * 5] * 10)
    bundle = build_data(DataConfig(train_files=[train], val_files=[val], fim_rate=0.2), seq_len=16, seed=1)
    assert isinstance(bundle, DataBundle) and isinstance(bundle.tokenizer, ByteTokenizer)
    assert bundle.train.seq_len == 16 and bundle.val is not None
    assert bundle.train.batch(0, 3).shape == (3, 17)
    again = build_data(DataConfig(train_files=[train], val_files=[val], fim_rate=0.2), seq_len=16, seed=1)
    assert torch.equal(bundle.train.stream, again.train.stream)
    assert build_data(DataConfig(train_files=[train], val_files=[]), seq_len=16, seed=1).val is None
    with pytest.raises(ConfigError, match=r"data\.fim_rate"):
        build_data(DataConfig(train_files=[train], val_files=[], fim_rate=1.5), 16, 0)
    with pytest.raises(ConfigError, match=r"data\.val_files.*v\.jsonl.*seq_len=1000"):
        build_data(DataConfig(train_files=[train], val_files=[val]), seq_len=1000, seed=0)


def test_data_errors(tmp_path):
    tok = ByteTokenizer()
    missing = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(ConfigError) as e:
        build_data(DataConfig(train_files=[missing], val_files=[]), 16, 0)
    msg = str(e.value)
    assert "data.train_files" in msg and missing in msg and "moetron.data.corpus" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"data\.val_files"):
        build_data(DataConfig(train_files=[write_jsonl(tmp_path / "ok.jsonl", ["x" * 40])],
                              val_files=[missing]), 16, 0)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"Line 3 of .*bad\.jsonl is not valid JSON"):
        encode_documents([str(bad)], tok, 0.0, 0)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"Line 2 of .*nofield\.jsonl"):
        encode_documents([str(nofield)], tok, 0.0, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"data\.train_files.*empty\.jsonl.*contains no documents"):
        encode_documents([str(empty)], tok, 0.0, 0)
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data\.train_files.*d\.csv.*extension"):
        encode_documents([str(csv)], tok, 0.0, 0)
    with pytest.raises(ConfigError, match=r"data\.train_files"):
        encode_documents([], tok, 0.0, 0)


# ---------------------------------------------------------------- corpus builder

def test_corpus_builder(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert corpus_main([str(a), "--max-mb", "0.2"]) == 0
    assert "wrote" in capsys.readouterr().out
    build_corpus(str(b), max_mb=0.2)
    for name in ("train.jsonl", "val.jsonl"):
        data = (a / name).read_bytes()
        assert data and data == (b / name).read_bytes()
    assert sorted(os.listdir(a)) == ["train.jsonl", "val.jsonl"]  # no temporary files left
    train_size = (a / "train.jsonl").stat().st_size
    assert 200_000 <= train_size < 200_000 + 2_000_000
    lines = (a / "val.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines and all(json.loads(line)["text"] for line in lines)
    # Idempotent: the existing pair is kept (here through the real `-m` entry point), --force rebuilds.
    (a / "train.jsonl").write_bytes(b"x" + (a / "train.jsonl").read_bytes()[1:])
    out = subprocess.run([sys.executable, "-m", "moetron.data.corpus", str(a), "--max-mb", "0.2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "already present" in out.stdout
    assert (a / "train.jsonl").read_bytes()[:1] == b"x"
    build_corpus(str(a), max_mb=0.2, force=True)
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes()
    # The corpus feeds the pipeline.
    bundle = build_data(DataConfig(train_files=[str(a / "train.jsonl")], val_files=[str(a / "val.jsonl")]),
                        seq_len=64, seed=0)
    assert bundle.train.num_sequences > 1000 and bundle.val.num_sequences > 10
