"""Config paths -> memory-mapped shards: prepared directories, Megatron prefixes, raw files (cached).

A path in data.train_files / data.val_files / data.blend[i].path is one of
* a directory written by `python -m moetron.data.prepare` (its manifest.json lists the shards),
* a Megatron-LM indexed dataset prefix: PREFIX.bin and PREFIX.idx (PREFIX.bin / PREFIX.idx also accepted),
* a raw .jsonl / .txt / .parquet file, prepared on first use into data.cache_dir (default: a .prepared/
  folder beside the file), keyed by the file's path, size and mtime and the tokenizer, under a file lock
  so that the ranks of a run prepare it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from dataclasses import asdict

from moetron.config.data import DataConfig
from moetron.config.errors import invalid
from moetron.data.indexed import IndexedShard
from moetron.data.manifest import FORMAT, MANIFEST, PLAN, read_json
from moetron.data.sources import EXTENSIONS

CORPUS_HINT = "to build the default corpus run `make corpus`"
VALID = ("a directory written by `python -m moetron.data.prepare`, a Megatron-LM PREFIX (PREFIX.bin + "
         "PREFIX.idx), or a .jsonl, .txt or .parquet file")


def _shown(path: str) -> str:
    absolute = os.path.abspath(path)
    return path if absolute == path else f"{path} (resolved to {absolute})"


def check_paths(paths, field: str) -> list[str]:
    """Validate the list and that every entry exists, before any slow work."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if not paths:
        raise invalid(field, paths, f"a non-empty list of: {VALID}; {CORPUS_HINT}")
    for path in paths:
        if not isinstance(path, str) or not path:
            raise invalid(field, path, VALID)
        kind = _kind(path)
        if kind is None:
            raise invalid(field, path, f"{VALID}; {CORPUS_HINT}", f"No such file or directory: {_shown(path)}.")
    return paths


def _kind(path: str) -> str | None:
    if os.path.isdir(path):
        return "prepared"
    stem = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(stem + ".bin") or os.path.isfile(stem + ".idx"):
        return "megatron"
    if os.path.isfile(path):
        return "raw"
    return None


def open_shards(path: str, field: str, tok, cfg: DataConfig) -> list[IndexedShard]:
    """The shards behind one config path, in order, validated."""
    kind = _kind(path)
    if kind == "megatron":
        return [IndexedShard(path[:-4] if path.endswith((".bin", ".idx")) else path, field)]
    if kind == "raw":
        if not path.endswith(EXTENSIONS):
            raise invalid(field, path, VALID, "Unknown file extension.")
        path = _cached(path, field, tok, cfg)
    return _prepared(path, field, tok)


def _prepared(directory: str, field: str, tok) -> list[IndexedShard]:
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        resume = (" A prepare into it did not finish: run the same prepare command again to resume it."
                  if os.path.isfile(os.path.join(directory, PLAN)) else "")
        raise invalid(field, directory, VALID, f"The directory has no {MANIFEST}.{resume}")
    try:
        manifest = read_json(manifest_path)
        settings, names = manifest["settings"], [s["name"] for s in manifest["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise invalid(field, directory, VALID, f"{manifest_path} is not a prepare manifest ({err}).") from None
    if settings.get("format") != FORMAT:
        raise invalid(field, directory, VALID, f"{manifest_path} has format {settings.get('format')!r}, not {FORMAT}.")
    if settings["tokenizer"] != tok.fingerprint or settings["eos_id"] != tok.eos_id:
        raise invalid("data.tokenizer", tok.path,
                      f"the tokenizer {directory} was prepared with ({settings.get('tokenizer_path') or 'bytes'}), or "
                      "prepare the data again with this one",
                      f"{directory} holds token ids of another tokenizer or eos token (its {settings['tokenizer']}, "
                      f"eos {settings['eos_id']}; this one {tok.fingerprint}, eos {tok.eos_id}).")
    return [IndexedShard(os.path.join(directory, name), field) for name in names]


def _cached(path: str, field: str, tok, cfg: DataConfig) -> str:
    """Prepare raw `path` once (per file, tokenizer and settings) and return the prepared directory."""
    st = os.stat(path)
    key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, tok.fingerprint, asdict(cfg.special_tokens),
                      cfg.invalid_utf8, cfg.text_key])
    root = cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), ".prepared")
    out = os.path.join(root, f"{os.path.basename(path)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(out + ".lock", "w")
    except OSError as err:
        raise invalid("data.cache_dir", cfg.cache_dir, "a writable directory for prepared copies of raw files",
                      f"Cannot prepare {path} into {root} ({err.strerror}).") from None
    from moetron.data.prepare import prepare  # not at import: `python -m moetron.data.prepare` imports us

    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank prepares; the others wait and then find it done
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            print(f"data: preparing {path} into {out} (first use)", file=sys.stderr, flush=True)
        prepare([path], tok.path, out, cfg.special_tokens, workers=1, invalid_utf8=cfg.invalid_utf8,
                text_key=cfg.text_key, progress=False, field=field)
    return out
