"""The data path at the default corpus size and at 10x: prepare throughput, loader throughput, rank memory.

1. prepare: `python -m moetron.data.prepare` on data/corpus/train.jsonl with the BPE tokenizer `make corpus`
   trains (data/corpus/tokenizer.json), --workers 2 (this machine's cores): MB of text/s and tokens/s, wall.
2. loader: a fresh process builds the data as the trainer does (build_data, seq_len 128) and reads batches
   of 16 windows at consecutive positions, the way every rank of `make train` reads its global batch;
   tokens delivered per second, against the ~1220 tokens/s `make train` consumes (README).
3. memory: a fresh process per corpus size imports torch and moetron.data (the baseline), builds the data
   and reads as many batches as a 300-step `make train` (4800 windows). It reports the peak RSS (VmHWM)
   and its parts at the end: anonymous memory (the process's own) and file-backed pages (libraries and
   the memory-mapped shards; the loader unmaps the shard pages it has read after each batch). The 10x corpus is the 1x shards
   listed ten times (hard links: the same tokens, ten times the documents and windows).

Timings share 2 CPU cores with other work on this machine; the byte and count figures do not depend on load.

Writes benchmarks/results/data_loader.json:
  corpus_mb, tokens, documents, shards           the 1x prepared corpus
  prepare_seconds, prepare_mb_per_s, prepare_tokens_per_s, prepare_workers   wall clock (load-dependent)
  prepare_cpu_seconds, prepare_mb_per_cpu_s, prepare_tokens_per_cpu_s         per CPU-second of prepare and
                                                 its workers (less load-dependent; x2 for 2 idle cores)
  loader_tokens_per_s, loader_vs_make_train      tokens/s delivered, and / 1220
  rss_<1x|10x>_{baseline,peak,anon,file}_mb      VmHWM after imports, VmHWM at the end, RssAnon, RssFile
  rss_peak_10x_over_1x, rss_anon_10x_over_1x     ratios (target: within 1.10)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MAKE_TRAIN_TOKENS_PER_S = 1220.0  # README: make train, 300 steps x 16 x 128 tokens in 7.6 minutes
SEQ_LEN, BATCH, STEPS = 128, 16, 300
MB = 1_000_000


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, data_dir: str, tokenizer: str) -> None:
    """Run in a fresh process; prints one JSON line."""
    import torch  # noqa: F401  (the trainer's process has torch loaded: count it in the baseline)

    from moetron.config.data import DataConfig
    from moetron.data import build_data

    baseline = status_mb("VmHWM")
    cfg = DataConfig(train_files=[data_dir], val_files=[], tokenizer=tokenizer)
    data = build_data(cfg, SEQ_LEN, seed=0)
    steps = STEPS if mode == "rss" else 2000
    start = time.perf_counter()
    for step in range(steps):
        data.train.batch(step * BATCH, BATCH, shuffle=True, seed=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "peak": status_mb("VmHWM"), "anon": status_mb("RssAnon"),
                      "file": status_mb("RssFile"), "tokens_per_s": steps * BATCH * SEQ_LEN / seconds,
                      "sequences": data.train.num_sequences}))


def run_child(mode: str, data_dir: str, tokenizer: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, data_dir, tokenizer], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def tenfold(src: Path, dst: Path) -> None:
    """A prepared directory listing src's shards ten times (hard links): ten times the corpus, same tokens."""
    manifest = json.loads((src / "manifest.json").read_text())
    shards = []
    dst.mkdir()
    for copy in range(10):
        for s in manifest["shards"]:
            name = f"{copy:02d}-{s['name']}"
            for ext in (".bin", ".idx"):
                os.link(src / (s["name"] + ext), dst / (name + ext))
            shards.append({**s, "name": name})
    manifest["shards"] = shards
    manifest["totals"] = {k: v * 10 for k, v in manifest["totals"].items()}
    (dst / "manifest.json").write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(ROOT / "data" / "corpus" / "train.jsonl"))
    parser.add_argument("--tokenizer", default=str(ROOT / "data" / "corpus" / "tokenizer.json"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "data_loader.json"))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "DIR", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    for path in (args.corpus, args.tokenizer):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} is missing; run `make corpus` first")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="moetron-data-bench-") as tmp:
        one = Path(tmp) / "1x"
        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "moetron.data.prepare", args.corpus, "--tokenizer", args.tokenizer,
                        "--out", str(one), "--workers", str(args.workers), "--shard-mb", "1", "--quiet"],
                       check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # prepare and its workers, waited for
        cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        totals = json.loads((one / "manifest.json").read_text())["totals"]
        result.update(corpus_mb=totals["bytes"] / MB, tokens=totals["tokens"], documents=totals["documents"],
                      shards=len(json.loads((one / "manifest.json").read_text())["shards"]),
                      prepare_seconds=seconds, prepare_mb_per_s=totals["bytes"] / MB / seconds,
                      prepare_tokens_per_s=totals["tokens"] / seconds, prepare_workers=args.workers,
                      prepare_cpu_seconds=cpu_seconds, prepare_mb_per_cpu_s=totals["bytes"] / MB / cpu_seconds,
                      prepare_tokens_per_cpu_s=totals["tokens"] / cpu_seconds)
        tenfold(one, Path(tmp) / "10x")
        speed = run_child("speed", str(one), args.tokenizer)
        result.update(loader_tokens_per_s=speed["tokens_per_s"],
                      loader_vs_make_train=speed["tokens_per_s"] / MAKE_TRAIN_TOKENS_PER_S)
        for size in ("1x", "10x"):
            rss = run_child("rss", str(Path(tmp) / size), args.tokenizer)
            result.update({f"rss_{size}_{k}_mb": rss[k] for k in ("baseline", "peak", "anon", "file")})
            result[f"sequences_{size}"] = rss["sequences"]
    result["rss_peak_10x_over_1x"] = result["rss_10x_peak_mb"] / result["rss_1x_peak_mb"]
    result["rss_anon_10x_over_1x"] = result["rss_10x_anon_mb"] / result["rss_1x_anon_mb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"prepare: {result['prepare_mb_per_s']:.2f} MB/s, {result['prepare_tokens_per_s']:,.0f} tokens/s "
          f"({args.workers} workers, {result['corpus_mb']:.1f} MB; {result['prepare_mb_per_cpu_s']:.2f} MB per "
          f"CPU-second); loader: {result['loader_tokens_per_s']:,.0f} "
          f"tokens/s = {result['loader_vs_make_train']:.0f}x make train; peak RSS 1x {result['rss_1x_peak_mb']:.0f} MB,"
          f" 10x {result['rss_10x_peak_mb']:.0f} MB (x{result['rss_peak_10x_over_1x']:.3f}; anonymous "
          f"x{result['rss_anon_10x_over_1x']:.3f}) [timings on a shared 2-core machine]")


if __name__ == "__main__":
    main()
