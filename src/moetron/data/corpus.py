"""Build a small default corpus from text already on the machine: the Python standard library.

    python -m moetron.data.corpus OUT_DIR [--max-mb 8] [--force]

Writes OUT_DIR/train.jsonl and OUT_DIR/val.jsonl (one {"text": ...} per line). Every `.py` file of
the running interpreter's standard library (no site-packages, test directories or idlelib), in sorted
path order, is one document; every 50th document (the 1st, 51st, ...) goes to val; the build stops once train.jsonl holds
--max-mb megabytes (10^6 bytes). The output is a function of the interpreter and --max-mb only. Both
files are written under temporary names and renamed at the end, so an interrupted build leaves no
half file; an existing non-empty pair is kept unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
                       "__pycache__"})
VAL_EVERY = 50
MB = 1_000_000


def stdlib_sources(root: str | None = None) -> list[str]:
    """Relative paths (with '/') of the standard library's .py files, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _line(text: str) -> bytes:
    return (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")


def build_corpus(out_dir: str, max_mb: float = 8.0, force: bool = False, root: str | None = None) -> str:
    """Build the corpus; return the one-line summary that the command prints."""
    train_path = os.path.join(out_dir, "train.jsonl")
    val_path = os.path.join(out_dir, "val.jsonl")
    if not force and all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in (train_path, val_path)):
        return (f"corpus already present: {train_path} ({os.path.getsize(train_path) / MB:.2f} MB) and "
                f"{val_path}; nothing to do (--force rebuilds)")
    root = root or sysconfig.get_paths()["stdlib"]
    os.makedirs(out_dir, exist_ok=True)
    limit = max_mb * MB
    tmp_train, tmp_val = f"{train_path}.tmp{os.getpid()}", f"{val_path}.tmp{os.getpid()}"
    counts = {"train": 0, "val": 0}
    sizes = {"train": 0, "val": 0}
    try:
        with open(tmp_train, "wb") as ftrain, open(tmp_val, "wb") as fval:
            doc = 0
            for rel in stdlib_sources(root):
                if sizes["train"] >= limit:
                    break
                with open(os.path.join(root, rel), encoding="utf-8", errors="ignore") as f:
                    text = f.read()
                if not text.strip():
                    continue
                # Documents 0, 50, 100, ... go to val, so even a tiny build has a held-out split.
                split, out = ("val", fval) if doc % VAL_EVERY == 0 else ("train", ftrain)
                doc += 1
                data = _line(text)
                out.write(data)
                counts[split] += 1
                sizes[split] += len(data)
        if counts["train"] == 0 or counts["val"] == 0:
            raise SystemExit(f"error: found too few Python sources under {root} to build a corpus "
                             f"({counts['train']} train, {counts['val']} val documents); pass more --max-mb "
                             "or provide your own data.train_files / data.val_files")
        os.replace(tmp_val, val_path)
        os.replace(tmp_train, train_path)
    finally:
        for tmp in (tmp_train, tmp_val):
            if os.path.exists(tmp):
                os.remove(tmp)
    return (f"wrote {train_path} ({counts['train']} documents, {sizes['train'] / MB:.2f} MB) and "
            f"{val_path} ({counts['val']} documents, {sizes['val'] / MB:.2f} MB) from the Python "
            f"{sys.version_info.major}.{sys.version_info.minor} standard library")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetron.data.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory for train.jsonl and val.jsonl (created if missing)")
    parser.add_argument("--max-mb", type=float, default=8.0,
                        help="stop once train.jsonl holds this many megabytes (default 8)")
    parser.add_argument("--force", action="store_true", help="rebuild even if both files exist")
    args = parser.parse_args(argv)
    if not args.max_mb > 0:
        parser.error(f"--max-mb must be a positive number of megabytes, got {args.max_mb}")
    print(build_corpus(args.out_dir, args.max_mb, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
