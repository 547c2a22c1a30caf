"""Prepare raw text for training: tokenize on every core into Megatron-LM indexed shards (.bin/.idx).

    python -m moetron.data.prepare INPUTS... --tokenizer T --out DIR [--workers N] [--shard-mb 64]
        [--invalid-utf8 error|replace] [--text-key text] [--special-token eos=NAME ...] [--force]

INPUTS are .jsonl / .txt / .parquet files or globs. Every chunk of input (about --shard-mb megabytes of a
file, or one parquet row group) becomes one shard DIR/FFFFF-CCCCC.{bin,idx}, tokenized by a worker process
with the tokenizers library's batch encoding; each document is followed by the eos token, as Megatron-LM's
preprocessing does with --append-eod. DIR/manifest.json, written last, lists the shards: a directory without
it is not loadable. An interrupted prepare resumes when run again with the same arguments: shards whose
stats file DIR/NAME.stats.json exists are kept, the others are written again (a shard's .idx appears only
after its complete .bin, so no half-written shard ever loads). Documents that are not UTF-8 are counted and,
per --invalid-utf8, refused (the default; the error names the file and offset) or decoded with U+FFFD.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
from tqdm import tqdm

from moetron.config.data import INVALID_UTF8, SpecialTokens
from moetron.config.errors import ConfigError
from moetron.data.indexed import IndexedWriter, shard_paths, token_dtype
from moetron.data.manifest import FORMAT, MANIFEST, PLAN, read_json, write_json
from moetron.data.sources import Chunk, Counts, expand_inputs, plan_chunks, read_chunk
from moetron.data.tokenizer import load_tokenizer

BATCH_DOCS = 256  # documents per encode_batch call
MB = 1_000_000


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str | None, names: tuple):
    """One tokenizer per worker process and setting (workers load it once, not per chunk)."""
    return load_tokenizer(path, SpecialTokens(**dict(names)))


def encode_chunk(job: dict) -> dict:
    """Tokenize one chunk into the shard job["prefix"]; return (and store beside it) the shard's stats."""
    tok = _tokenizer(job["tokenizer"], tuple(sorted(job["special_tokens"].items())))
    chunk = Chunk(**job["chunk"])
    counts = Counts()
    writer = IndexedWriter(job["prefix"], np.dtype(job["dtype"]))
    eos = np.array([tok.eos_id], dtype=np.int64)
    tokens = written = 0
    batch: list[str] = []

    def flush() -> int:
        n = 0
        for ids in tok.encode_batch(batch):
            writer.add(np.concatenate([ids, eos]))
            n += len(ids) + 1
        batch.clear()
        return n

    try:
        for text in read_chunk(chunk, job["text_key"], job["invalid_utf8"], counts):
            batch.append(text)
            written += 1
            if len(batch) >= BATCH_DOCS:
                tokens += flush()
        tokens += flush()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    stats = {"name": os.path.basename(job["prefix"]), "source": chunk.path, "start": chunk.start,
             "stop": chunk.stop, "bytes": chunk.size, "documents": written, "tokens": tokens,
             "empty": counts.empty, "invalid_utf8": counts.invalid_utf8}
    write_json(job["prefix"] + ".stats.json", stats)
    return stats


def _worker_init() -> None:
    # Parallelism comes from the worker processes; the tokenizers library must not add threads to each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _settings(files: list[str], tok, dtype: np.dtype, invalid_utf8: str, text_key: str, shard_mb: float) -> dict:
    return {"format": FORMAT, "tokenizer": tok.fingerprint, "tokenizer_path": tok.path and os.path.abspath(tok.path), "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype.name, "invalid_utf8": invalid_utf8, "text_key": text_key,
            "shard_mb": shard_mb,
            "inputs": [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]}


def _is_done(prefix: str) -> bool:
    return all(os.path.isfile(p) for p in (*shard_paths(prefix), prefix + ".stats.json"))


def _clear(out_dir: str, everything: bool) -> None:
    """Remove temporary files (always) and, with `everything`, every shard and the plan and manifest."""
    for name in os.listdir(out_dir):
        ours = name.endswith((".bin", ".idx", ".stats.json")) or name in (PLAN, MANIFEST)
        if ".tmp" in name or (everything and ours):
            os.remove(os.path.join(out_dir, name))


def prepare(inputs: list[str], tokenizer: str | None, out_dir: str, special_tokens: SpecialTokens | None = None,
            workers: int = 0, shard_mb: float = 64.0, invalid_utf8: str = "error", text_key: str = "text",
            progress: bool = True, force: bool = False, field: str = "INPUTS") -> dict:
    """Prepare `inputs` into `out_dir` (resuming an interrupted run); return the manifest."""
    if invalid_utf8 not in INVALID_UTF8:
        raise ConfigError(f"Invalid value for `--invalid-utf8`: {invalid_utf8!r}. Valid: error or replace.")
    if not shard_mb > 0:
        raise ConfigError(f"Invalid value for `--shard-mb`: {shard_mb!r}. Valid: a positive number of megabytes.")
    names = special_tokens or SpecialTokens()
    tok = load_tokenizer(tokenizer, names)
    files = expand_inputs(inputs, field)
    dtype = token_dtype(tok.vocab_size)
    settings = _settings(files, tok, dtype, invalid_utf8, text_key, shard_mb)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path, plan_path = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, PLAN)
    if not force and os.path.isfile(manifest_path) and read_json(manifest_path)["settings"] == settings:
        done = read_json(manifest_path)  # already prepared: nothing written by this run
        return {**done, "resumed_shards": len(done["shards"]), "this_run": {"bytes": 0, "tokens": 0}}
    old = read_json(plan_path)["settings"] if os.path.isfile(plan_path) else None
    if old is not None and old != settings and not force:
        changed = sorted(k for k in settings if settings[k] != old.get(k))
        raise ConfigError(f"Invalid value for `--out`: {out_dir!r}. It holds a prepare of other inputs or "
                          f"settings (differing: {', '.join(changed)}). Valid: a new directory, the same "
                          "arguments as before (to resume), or --force to start over in it.")
    if old is None and not force and any(n.endswith((".bin", ".idx")) for n in os.listdir(out_dir)):
        raise ConfigError(f"Invalid value for `--out`: {out_dir!r}. It holds .bin/.idx files that no prepare "
                          "of this tool started there. Valid: a new or empty directory, or --force to replace them.")
    _clear(out_dir, everything=force)

    chunk_bytes = max(1, int(shard_mb * MB))
    jobs = []
    for f, path in enumerate(files):
        for c, chunk in enumerate(plan_chunks(path, chunk_bytes)):
            jobs.append({"prefix": os.path.join(out_dir, f"{f:05d}-{c:05d}"), "chunk": asdict(chunk),
                         "tokenizer": tok.path, "special_tokens": asdict(names), "dtype": dtype.name,
                         "invalid_utf8": invalid_utf8, "text_key": text_key})
    write_json(plan_path, {"settings": settings, "shards": [os.path.basename(j["prefix"]) for j in jobs]})
    todo = [j for j in jobs if not _is_done(j["prefix"])]
    _run(todo, workers, progress, total=sum(j["chunk"]["size"] for j in jobs),
         done=sum(j["chunk"]["size"] for j in jobs if j not in todo))

    shards = [read_json(j["prefix"] + ".stats.json") for j in jobs]
    totals = {k: sum(s[k] for s in shards) for k in ("bytes", "documents", "tokens", "empty", "invalid_utf8")}
    fresh = {os.path.basename(j["prefix"]) for j in todo}
    manifest = {"settings": settings, "shards": shards, "totals": totals, "resumed_shards": len(jobs) - len(todo),
                "this_run": {k: sum(s[k] for s in shards if s["name"] in fresh) for k in ("bytes", "tokens")}}
    write_json(manifest_path, manifest)
    return manifest


def _run(jobs: list[dict], workers: int, progress: bool, total: int, done: int) -> None:
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="prepare", disable=not progress,
               dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0

    def report(stats: dict) -> None:
        nonlocal tokens
        tokens += stats["tokens"]
        bar.update(stats["bytes"])
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")

    try:
        if workers <= 1:
            for job in jobs:
                report(encode_chunk(job))
            return
        # fork: the parent holds no threads yet, and workers start without re-importing the package.
        # fork is fast, but forking a process that runs threads (torch's pools, a process group's threads: a
        # training rank preparing a raw file on first use) can deadlock the children: spawn there.
        threaded = "torch" in sys.modules or threading.active_count() > 1
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not threaded else "spawn"
        with multiprocessing.get_context(method).Pool(workers, initializer=_worker_init) as pool:
            for stats in pool.imap_unordered(encode_chunk, jobs):
                report(stats)
    finally:
        bar.close()


def summary(manifest: dict, out_dir: str, seconds: float) -> str:
    t = manifest["totals"]
    mb = t["bytes"] / MB
    if manifest.get("resumed_shards") == len(manifest["shards"]):
        return (f"already prepared: {out_dir} ({t['documents']} documents, {t['tokens']} tokens, {mb:.2f} MB of "
                "input); nothing to do (--force prepares it again)")
    policy = manifest["settings"]["invalid_utf8"]
    bad = (f"{t['invalid_utf8']} document(s) were not UTF-8 and had their bad bytes replaced with U+FFFD"
           if t["invalid_utf8"] else "every document was UTF-8")
    resumed = f", {manifest['resumed_shards']} shard(s) kept from an earlier run" if manifest.get("resumed_shards") \
        else ""
    run = manifest.get("this_run", t)  # throughput of the shards written by this run only
    return (f"prepared {t['documents']} documents ({t['tokens']} tokens, {mb:.2f} MB of input; {t['empty']} empty "
            f"skipped) into {len(manifest['shards'])} shard(s) in {out_dir} in {seconds:.1f} s: "
            f"{run['bytes'] / MB / max(seconds, 1e-9):.2f} MB/s, {run['tokens'] / max(seconds, 1e-9):,.0f} "
            f"tokens/s{resumed}; "
            f"{bad} (--invalid-utf8 {policy})")


def _special(value: str) -> tuple[str, str]:
    role, sep, name = value.partition("=")
    if not sep or role not in SpecialTokens.__dataclass_fields__ or not name:
        raise argparse.ArgumentTypeError(f"{value!r}: expected ROLE=NAME with ROLE one of "
                                         f"{', '.join(SpecialTokens.__dataclass_fields__)}")
    return role, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUTS", help=".jsonl, .txt or .parquet files or globs")
    parser.add_argument("--tokenizer", required=True,
                        help="a Hugging Face tokenizer.json, or 'bytes' for the built-in byte-level tokenizer")
    parser.add_argument("--out", required=True, help="output directory (created; resumed if it holds this prepare)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="megabytes of input per shard (default 64)")
    parser.add_argument("--invalid-utf8", choices=INVALID_UTF8, default="error",
                        help="input that is not UTF-8: error (refuse, the default) or replace with U+FFFD")
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column of the text")
    parser.add_argument("--special-token", type=_special, action="append", default=[], metavar="ROLE=NAME",
                        help="a special token's name if not DeepSeek-V3's (roles: "
                             f"{', '.join(SpecialTokens.__dataclass_fields__)})")
    parser.add_argument("--force", action="store_true", help="start over even if DIR holds another prepare")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = prepare(args.inputs, None if args.tokenizer == "bytes" else args.tokenizer, args.out,
                           SpecialTokens(**dict(args.special_token)), args.workers, args.shard_mb,
                           args.invalid_utf8, args.text_key, progress=not args.quiet, force=args.force)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
