"""The data path: tokenizers, FIM (PSM) at sample time, packing over memory-mapped shards, resumable
windows, blends, build_data and its errors, the corpus builder."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from moetron.config import ConfigError, DataConfig
from moetron.config.data import BlendSource, SpecialTokens
from moetron.data import DataBundle, build_data
from moetron.data.corpus import build_corpus
from moetron.data.corpus import main as corpus_main
from moetron.data.dataset import BlendedWindows, Documents, PackedWindows
from moetron.data.fim import parse_psm, to_psm
from moetron.data.indexed import IndexedShard, IndexedWriter
from moetron.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from moetron.data.train_tokenizer import train_tokenizer

TEXTS = ["hello world", "héllo wörld — naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed\nlines\ttabs"]
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜fim▁begin｜>", "<｜fim▁hole｜>",
            "<｜fim▁end｜>")


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


def write_shard(prefix, docs, dtype=np.uint16):
    w = IndexedWriter(str(prefix), dtype)
    for d in docs:
        w.add(np.asarray(d))
    w.finish()
    return IndexedShard(str(prefix))


def windows(tmp_path, docs, seq_len, fim_rate=0.0, seed=0, tok=None, name="s", shards=1):
    """PackedWindows over `docs` written as `shards` consecutive shards."""
    tok = tok or ByteTokenizer()
    cuts = np.linspace(0, len(docs), shards + 1).astype(int)
    parts = [write_shard(tmp_path / f"{name}{k}", docs[a:b]) for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    return PackedWindows(Documents(parts, tok.eos_id), seq_len, tok, fim_rate, seed)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
        assert tok.encode_batch([text])[0].tolist() == ids
    ids = [tok.eos_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id, tok.pad_id, tok.bos_id]
    assert ids == list(range(256, 262)) and tok.vocab_size == 262  # eos keeps id 256
    assert tok.decode([tok.eos_id, 104, 105]) == "<｜end▁of▁sentence｜>hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def make_hf_tokenizer(path, specials=DEEPSEEK):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_special_tokens_from_config(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "tok.json"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 8 + 6
    # DeepSeek-V3's names by default, in the order they were added.
    assert [tok.bos_id, tok.eos_id, tok.pad_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id] == \
        list(range(8, 14))
    enc = tok.encode("the cat sat on the mat")
    assert len(enc) == 6 and tok.decode(enc) == "the cat sat on the mat"
    assert [a.tolist() for a in tok.encode_batch(["the cat", "mat"])] == [tok.encode("the cat"), tok.encode("mat")]
    assert tok.eos_id not in tok.encode("hello <｜end▁of▁sentence｜> world")  # text cannot inject specials
    # Other names come from the config.
    own = make_hf_tokenizer(tmp_path / "own.json", ["<s>", "</s>", "<pad>", "<fp>", "<fs>", "<fm>"])
    names = SpecialTokens(bos="<s>", eos="</s>", pad="<pad>", fim_prefix="<fp>", fim_suffix="<fs>", fim_middle="<fm>")
    assert load_tokenizer(own, names).eos_id == 9


def test_unknown_special_token_name_names_the_field_and_file(tmp_path):
    path = make_hf_tokenizer(tmp_path / "tok.json")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(path, SpecialTokens(pad="<|pad|>"))
    msg = str(e.value)
    assert "data.special_tokens.pad" in msg and "<|pad|>" in msg and path in msg and "\n" not in msg
    assert "<｜end▁of▁sentence｜>" in msg  # it lists the names the file does have
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*No such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*could not be loaded"):
        load_tokenizer(str(bad))


def test_trained_bpe_tokenizer(tmp_path):
    text = "def function(argument):\n    return argument + 1\n"
    data = write_jsonl(tmp_path / "c.jsonl", [text * 20, "class Thing:\n    pass\n" * 20] * 5)
    out = str(tmp_path / "tokenizer.json")
    train_tokenizer([data], out, vocab_size=400)
    tok = load_tokenizer(out)
    assert tok.vocab_size <= 400 and tok.eos_id < 6  # the six specials come first
    for sample in [text, "héllo 🙂 unseen bytes\x00", ""]:
        assert tok.decode(tok.encode(sample)) == sample  # byte-level: nothing is unknown
    assert len(tok.encode(text)) < len(text.encode()) / 3  # merges were learned
    with pytest.raises(ConfigError, match="--vocab-size"):
        train_tokenizer([data], out, vocab_size=200)


# ---------------------------------------------------------------- packing and FIM at sample time

def packed_reference(docs, w, tok):
    """The packed stream built directly: each document (its trailing eos dropped) as plain or PSM, then eos."""
    parts = []
    for d, doc in enumerate(docs):
        doc = np.asarray(doc, dtype=np.int64)
        if len(doc) and doc[-1] == tok.eos_id:
            doc = doc[:-1]
        body = to_psm(doc, int(w.cut_a[d]), int(w.cut_b[d]), tok) if w.fim[d] else doc
        parts += [body, [tok.eos_id]]
    return np.concatenate(parts)


def random_docs(n, seed=0, eos=None):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 256, int(rng.integers(0, 40))) for _ in range(n)]
    return [np.append(d, eos) if eos is not None and i % 2 else d for i, d in enumerate(docs)]


@pytest.mark.parametrize("fim_rate,shards", [(0.0, 1), (0.5, 1), (1.0, 1), (0.5, 7)])
def test_windows_are_cut_from_the_packed_stream(tmp_path, fim_rate, shards):
    tok = ByteTokenizer()
    docs = random_docs(60, eos=tok.eos_id)  # every other document already ends with eos (Megatron --append-eod)
    w = windows(tmp_path, docs, seq_len=9, fim_rate=fim_rate, seed=3, shards=shards)
    stream = packed_reference(docs, w, tok)
    assert w.num_tokens == len(stream) and w.num_sequences == (len(stream) - 1) // 9
    assert (stream == tok.eos_id).sum() == len(docs)  # exactly one eos per document, never two
    wins = w.batch(0, w.num_sequences, shuffle=False).numpy()
    for i in range(w.num_sequences):
        assert np.array_equal(wins[i], stream[i * 9: i * 9 + 10]), i
    assert np.array_equal(wins[:-1, -1], wins[1:, 0])  # consecutive windows share exactly one token


def test_fim_documents_are_psm_of_their_tokens(tmp_path):
    tok = ByteTokenizer()
    docs = [np.frombuffer(t.encode(), dtype=np.uint8) for t in TEXTS * 10]
    w = windows(tmp_path, docs, seq_len=8, fim_rate=1.0, seed=1)
    cuts = set()
    for d, doc in enumerate(docs):
        packed = w.document(d)
        assert packed[-1] == tok.eos_id and packed[0] == tok.fim_prefix_id
        prefix, middle, suffix = parse_psm(packed.tolist(), tok)
        assert prefix + middle + suffix == doc.tolist()  # the same tokens, moved
        cuts.add((len(prefix), len(middle)))
    assert len(cuts) > 20  # random cuts


def test_fim_rate_nested_and_per_document(tmp_path):
    docs = random_docs(3000)
    share = {}
    for rate in (0.0, 0.1, 0.3, 1.0):
        share[rate] = windows(tmp_path, docs, 8, rate, seed=0, name=f"r{rate}").fim
    assert not share[0.0].any() and share[1.0].all() and 0.08 < share[0.1].mean() < 0.12
    assert (share[0.3] | ~share[0.1]).all() and share[0.3].sum() > share[0.1].sum()  # nested across rates
    other_seed = windows(tmp_path, docs, 8, 0.1, seed=1, name="seed1").fim
    assert not np.array_equal(other_seed, share[0.1])
    # Document d's decision depends on (seed, d) only: not on the other documents or how many there are.
    fewer = windows(tmp_path, [np.ones(5, np.int64)] * 1000, 8, 0.1, seed=0, name="few").fim
    assert np.array_equal(fewer, share[0.1][:1000])


def test_batch_resumable_and_deterministic(tmp_path):
    docs = [np.arange(i * 10, i * 10 + 9) % 250 for i in range(7)]  # 7 documents of 9 tokens + eos = 70 tokens
    w = windows(tmp_path, docs, seq_len=6)
    n = w.num_sequences
    assert n == (70 - 1) // 6
    whole = w.batch(3, 3 * n + 5, seed=11)
    rng = random.Random(0)
    for _ in range(5):  # any split of a span crossing several epochs, on a fresh instance
        cuts = sorted(rng.sample(range(1, 3 * n + 5), 4))
        fresh = windows(tmp_path, docs, seq_len=6, name="fresh")
        parts, pos = [], 3
        for end in cuts + [3 * n + 5]:
            parts.append(fresh.batch(pos, 3 + end - pos, seed=11))
            pos = 3 + end
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(w.batch(0, n, seed=0), w.batch(0, n, seed=1))
    epochs = [w.indices(e * n, n, seed=11) for e in range(4)]
    assert all(sorted(idx.tolist()) == list(range(n)) for idx in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) > 1
    assert w.indices(n - 2, 4, shuffle=False).tolist() == [n - 2, n - 1, 0, 1]
    assert w.batch(4, 0).shape == (0, 7) and w.batch(0, 2).dtype == torch.int64
    with pytest.raises(ConfigError, match=r"data\.train_files.*seq_len"):
        windows(tmp_path, docs, seq_len=70, name="short")


def test_blend_weights_and_exact_resume(tmp_path):
    tok = ByteTokenizer()
    a = windows(tmp_path, [np.full(50, 1)] * 40, 8, name="a")  # every token of source a is 1, of b is 2
    b = windows(tmp_path, [np.full(50, 2)] * 5, 8, name="b")
    blend = BlendedWindows([a, b], [0.7, 0.3])
    big = blend.batch(0, 20_000, seed=4)
    from_a = (big == 1).any(dim=1)  # a row holds its source's token and eos
    assert torch.equal(from_a, ~(big == 2).any(dim=1))
    assert abs(from_a.float().mean().item() - 0.7) < 1e-3
    for k in (10, 1000):  # evenly spread: every run of positions holds its share
        assert abs(from_a[:k].float().mean().item() - 0.7) <= 1.5 / k + 1e-9
    assert torch.equal(big, torch.cat([blend.batch(0, 7777, seed=4), blend.batch(7777, 20_000 - 7777, seed=4)]))
    # Each source runs through its own shuffled epochs: b's positions are b.batch's, in order.
    j, local = blend.locate(0, 20_000)
    assert np.array_equal(local[j == 1], np.arange((j == 1).sum()))
    assert torch.equal(big[torch.from_numpy(j == 1)][:300], b.batch(0, 300, seed=4))
    assert tok.eos_id in big


# ---------------------------------------------------------------- build_data and errors

def test_build_data_prepares_raw_files_once(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [f"some training text {i} " * 5 for i in range(30)])
    val = write_jsonl(tmp_path / "v.jsonl", ["held out text " * 5] * 10)
    cfg = DataConfig(train_files=[train], val_files=[val], fim_rate=0.2, cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg, seq_len=16, seed=1)
    assert isinstance(bundle, DataBundle) and isinstance(bundle.tokenizer, ByteTokenizer)
    assert bundle.train.batch(0, 3).shape == (3, 17) and bundle.val is not None
    manifests = sorted(p for p in (tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 2
    stamp = [p.stat().st_mtime_ns for p in manifests]
    again = build_data(cfg, seq_len=16, seed=1)
    assert [p.stat().st_mtime_ns for p in manifests] == stamp  # cached: not prepared again
    assert torch.equal(bundle.train.batch(0, 50, seed=1), again.train.batch(0, 50, seed=1))
    # The stream holds every document in order: decode it back.
    text = ByteTokenizer().decode(bundle.train.batch(0, bundle.train.num_sequences, shuffle=False)[:, :-1].flatten())
    assert "some training text 0 " in text and "some training text 29 " in text
    assert build_data(DataConfig(train_files=[train], val_files=[], cache_dir=cfg.cache_dir), 16, 1).val is None
    with pytest.raises(ConfigError, match=r"data\.fim_rate"):
        build_data(DataConfig(train_files=[train], val_files=[], fim_rate=1.5), 16, 0)
    with pytest.raises(ConfigError, match=r"data\.val_files.*v\.jsonl.*seq_len"):
        build_data(cfg, seq_len=1000, seed=0)


def test_build_data_blend(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["a" * 100] * 20)
    b = write_jsonl(tmp_path / "b.jsonl", ["b" * 100] * 20)
    cfg = DataConfig(blend=[BlendSource(a, 3.0), BlendSource(b, 1.0)], val_files=[], fim_rate=0.0)
    bundle = build_data(cfg, seq_len=32, seed=0)
    rows = bundle.train.batch(0, 4000)
    from_a = (rows == ord("a")).any(dim=1)
    assert torch.equal(from_a, ~(rows == ord("b")).any(dim=1))
    assert abs(from_a.float().mean().item() - 0.75) < 1e-3


def test_data_errors(tmp_path):
    missing = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(ConfigError) as e:
        build_data(DataConfig(train_files=[missing], val_files=[]), 16, 0)
    msg = str(e.value)
    assert "data.train_files" in msg and missing in msg and "make corpus" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"data\.blend\[1\]\.path"):
        build_data(DataConfig(blend=[BlendSource(write_jsonl(tmp_path / "ok.jsonl", ["x" * 40])),
                                     BlendSource(missing)], val_files=[]), 16, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl, line at byte 18: it is not valid JSON"):
        build_data(DataConfig(train_files=[str(bad)], val_files=[]), 4, 0)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"nofield\.jsonl, line at byte 17.*'text'"):
        build_data(DataConfig(train_files=[str(nofield)], val_files=[]), 4, 0)
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data\.train_files.*d\.csv.*extension"):
        build_data(DataConfig(train_files=[str(csv)], val_files=[]), 4, 0)
    with pytest.raises(ConfigError, match=r"data\.train_files"):
        build_data(DataConfig(train_files=[], val_files=[]), 4, 0)


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
    # The corpus feeds the pipeline (prepared into a cache on first use).
    bundle = build_data(DataConfig(train_files=[str(a / "train.jsonl")], val_files=[str(a / "val.jsonl")]),
                        seq_len=64, seed=0)
    assert bundle.train.num_sequences > 1000 and bundle.val.num_sequences > 10


def test_ranks_prepare_a_raw_file_once(tmp_path, capfd):
    """The ranks of a run call build_data at once on the same raw file: one prepares, the others wait."""
    from concurrent.futures import ThreadPoolExecutor

    train = write_jsonl(tmp_path / "t.jsonl", [f"text {i} " * 40 for i in range(400)])
    cfg = DataConfig(train_files=[train], val_files=[])
    with ThreadPoolExecutor(4) as pool:
        bundles = list(pool.map(lambda _: build_data(cfg, 32, 0), range(4)))
    assert capfd.readouterr().err.count("(first use)") == 1
    first = bundles[0].train.batch(0, 64)
    assert all(torch.equal(b.train.batch(0, 64), first) for b in bundles[1:])
