"""python -m moetron.data.prepare: formats, workers, resume after an interruption, non-UTF-8 input, and
the errors for damaged shards (truncated .bin, index that disagrees with its .bin, missing shard)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moetron.config import ConfigError, DataConfig
from moetron.data import build_data
from moetron.data import prepare as prepare_module
from moetron.data.indexed import IndexedShard
from moetron.data.prepare import main, prepare
from moetron.data.tokenizer import ByteTokenizer

DOCS = [f"document {i}: " + "héllo wörld 🙂 " * (i % 9 + 1) for i in range(300)]


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return str(path)


def shard_documents(out_dir):
    """Every document of a prepared directory, read straight from its .bin/.idx pairs."""
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    docs = []
    for s in manifest["shards"]:
        shard = IndexedShard(os.path.join(out_dir, s["name"]))
        docs += [shard.document(d).tolist() for d in range(shard.num_documents)]
    return docs


def expected(texts, tok=None):
    tok = tok or ByteTokenizer()
    return [tok.encode(t) + [tok.eos_id] for t in texts if t]


def test_jsonl_txt_parquet_in_shards_equal_direct_tokenization(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = write_jsonl(tmp_path / "a.jsonl", DOCS[:100] + [""])  # the empty document is skipped
    (tmp_path / "b.txt").write_text("\n<|endoftext|>\n".join(DOCS[100:200]), encoding="utf-8")
    pq.write_table(pa.table({"text": DOCS[200:]}), tmp_path / "c.parquet", row_group_size=40)
    manifest = prepare([a, str(tmp_path / "*.txt"), str(tmp_path / "c.parquet")], None, str(tmp_path / "out"),
                       shard_mb=0.002, workers=1, progress=False)
    txt_docs = [d + "\n" for d in DOCS[100:199]] + [DOCS[199]]  # a separator line ends the line before it
    assert shard_documents(tmp_path / "out") == expected(DOCS[:100] + txt_docs + DOCS[200:])
    assert len(manifest["shards"]) > 5 and manifest["totals"]["empty"] == 1  # several chunks per file
    assert manifest["totals"]["documents"] == 300 and manifest["totals"]["invalid_utf8"] == 0
    # Worker processes write the same shards, byte for byte.
    prepare([a, str(tmp_path / "*.txt"), str(tmp_path / "c.parquet")], None, str(tmp_path / "par"),
            shard_mb=0.002, workers=2, progress=False)
    for s in manifest["shards"]:
        for ext in (".bin", ".idx"):
            assert (tmp_path / "out" / (s["name"] + ext)).read_bytes() == \
                   (tmp_path / "par" / (s["name"] + ext)).read_bytes()


def test_interrupted_prepare_resumes_and_never_loads_half_written(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = str(tmp_path / "out")
    real = prepare_module.encode_chunk
    calls = []

    def dies_on_the_third(job):
        calls.append(job["prefix"])
        if len(calls) == 3:
            # Killed mid-shard: a partial temporary .bin is on disk, no .idx.
            with open(job["prefix"] + ".bin.tmp999", "wb") as f:
                f.write(b"\x01\x02")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare_module, "encode_chunk", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], None, out, shard_mb=0.003, workers=1, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(ConfigError, match=r"no manifest\.json.*did not finish.*resume"):
        build_data(DataConfig(train_files=[out], val_files=[]), 8, 0)
    monkeypatch.setattr(prepare_module, "encode_chunk", real)
    stamp = os.stat(calls[0] + ".bin").st_mtime_ns
    manifest = prepare([src], None, out, shard_mb=0.003, workers=1, progress=False)
    assert manifest["resumed_shards"] == 2 and os.stat(calls[0] + ".bin").st_mtime_ns == stamp
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert shard_documents(out) == expected(DOCS)
    # A finished prepare is not repeated; other settings in the same directory are refused.
    again = prepare([src], None, out, shard_mb=0.003, progress=False)
    assert again["shards"] == manifest["shards"] and again["this_run"] == {"bytes": 0, "tokens": 0}
    with pytest.raises(ConfigError, match=r"--out.*shard_mb.*--force"):
        prepare([src], None, out, shard_mb=0.01, progress=False)


def test_non_utf8_is_counted_and_refused_or_replaced(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n{"text": "lone \\ud800 surrogate"}\n'
                    b'{"text": "also fine"}\n')
    with pytest.raises(ConfigError) as e:
        prepare([str(src)], None, str(tmp_path / "a"), progress=False)
    msg = str(e.value)
    assert str(src) in msg and "byte 17" in msg and "0xe9" in msg and "--invalid-utf8 replace" in msg
    manifest = prepare([str(src)], None, str(tmp_path / "b"), invalid_utf8="replace", progress=False)
    assert manifest["totals"]["invalid_utf8"] == 2 and manifest["totals"]["documents"] == 4
    docs = [ByteTokenizer().decode(d[:-1]) for d in shard_documents(tmp_path / "b")]
    assert docs == ["fine", "caf\ufffd latin-1", "lone ? surrogate", "also fine"]
    # Training from the raw file follows data.invalid_utf8 too.
    with pytest.raises(ConfigError, match="not UTF-8"):
        build_data(DataConfig(train_files=[str(src)], val_files=[]), 4, 0)
    ok = build_data(DataConfig(train_files=[str(src)], val_files=[], invalid_utf8="replace"), 4, 0)
    assert ok.train.num_tokens > 0


def test_cli_reports_throughput_and_exits_2_on_bad_input(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:50])
    run = subprocess.run([sys.executable, "-m", "moetron.data.prepare", src, "--tokenizer", "bytes",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "prepared 50 documents" in run.stdout and "tokens/s" in run.stdout and "MB/s" in run.stdout
    assert "tokens/s" in run.stderr  # the progress bar
    assert main([src, "--tokenizer", str(tmp_path / "none.json"), "--out", str(tmp_path / "p")]) == 2
    bad = subprocess.run([sys.executable, "-m", "moetron.data.prepare", str(tmp_path / "*.csv"), "--tokenizer",
                          "bytes", "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "matches no file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "ds"
    prepare([write_jsonl(tmp_path / "a.jsonl", DOCS)], None, str(out), shard_mb=0.005, progress=False)
    return out


def load_error(path) -> str:
    with pytest.raises(ConfigError) as e:
        build_data(DataConfig(train_files=[str(path)], val_files=[]), 8, 0)
    msg = str(e.value)
    assert "\n" not in msg and "data.train_files" in msg
    return msg


def test_truncated_bin(prepared):
    bin_path = prepared / "00000-00001.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-6])
    msg = load_error(prepared)
    assert str(bin_path) in msg and "the .bin is truncated" in msg and f"is {len(data) - 6} bytes" in msg


def test_index_that_disagrees_with_its_bin(prepared):
    shutil.copy(prepared / "00000-00002.idx", prepared / "00000-00001.idx")  # another shard's index
    msg = load_error(prepared)
    assert str(prepared / "00000-00001.bin") in msg and "does not belong to this .bin" in msg


def test_index_offsets_not_matching_lengths(prepared):
    path = prepared / "00000-00000.idx"
    idx = bytearray(path.read_bytes())
    n = int.from_bytes(idx[18:26], "little")
    lengths = np.frombuffer(bytes(idx[34:34 + 4 * n]), dtype=np.int32).copy()
    lengths[0] += 1
    lengths[1] -= 1  # total unchanged, so the .bin size still matches
    idx[34:34 + 4 * n] = lengths.tobytes()
    path.write_bytes(bytes(idx))
    msg = load_error(prepared)
    assert str(path) in msg and "running sum" in msg


def test_missing_shard(prepared):
    os.remove(prepared / "00000-00001.bin")
    msg = load_error(prepared)
    assert str(prepared / "00000-00001.bin") in msg and "missing" in msg
    os.remove(prepared / "00000-00002.idx")
    assert "00000-00001.bin" in load_error(prepared)  # the first problem, in order


def test_truncated_index(prepared):
    path = prepared / "00000-00000.idx"
    path.write_bytes(path.read_bytes()[:-3])
    msg = load_error(prepared)
    assert str(path) in msg and "truncated or corrupt" in msg


def test_prepared_with_another_tokenizer(prepared, tmp_path):
    from test_data import make_hf_tokenizer

    tok = make_hf_tokenizer(tmp_path / "t.json")
    with pytest.raises(ConfigError) as e:
        build_data(DataConfig(train_files=[str(prepared)], val_files=[], tokenizer=tok), 8, 0)
    assert "data.tokenizer" in str(e.value) and str(prepared) in str(e.value)
