"""Raw text inputs (.jsonl, .txt, .parquet): globs, chunks that workers read independently, documents.

A chunk is a byte range of a .jsonl or .txt file that starts and ends on a document boundary, or one row
group of a .parquet file; its boundaries depend only on the file and the chunk size, so a resumed prepare
plans the same chunks. Bytes that are not UTF-8 are counted per document and refused or replaced.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from moetron.config.errors import ConfigError, invalid

EXTENSIONS = (".jsonl", ".txt", ".parquet")
TXT_SEPARATOR = "<|endoftext|>"
_TXT_SPLIT = re.compile(rb"^<\|endoftext\|>\r?(?:\n|\Z)", re.MULTILINE)
FORMATS = ("a .jsonl file (one JSON object with a string field \"text\" per line), a .txt file (documents "
           f"separated by a line that is exactly {TXT_SEPARATOR}) or a .parquet file with a string column \"text\"")


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int  # byte offset (.jsonl/.txt) or row group (.parquet)
    stop: int
    size: int  # bytes of input it covers, for progress and throughput


def expand_inputs(patterns: list[str], field: str = "INPUTS") -> list[str]:
    """Each pattern is a file or a glob; matches are sorted. Every file must exist and have a known format."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise invalid(field, pattern, f"a file or a glob that matches {FORMATS}", "It matches no file.")
        for path in matches:
            if not path.endswith(EXTENSIONS):
                raise invalid(field, path, FORMATS, "Unknown file extension.")
            if not os.path.isfile(path):
                raise invalid(field, path, FORMATS, f"No such file (resolved to {os.path.abspath(path)}).")
            files.append(path)
    return files


def _line_boundary(f, pos: int, separator_only: bool) -> int:
    """The first document boundary at or after byte `pos`: after a newline (.jsonl) or after a separator
    line (.txt)."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    if not separator_only and f.read(1) == b"\n":
        return pos
    f.readline()  # the rest of the line `pos` falls in
    if not separator_only:
        return f.tell()
    while True:
        line = f.readline()
        if not line or _TXT_SPLIT.fullmatch(line):
            return f.tell()


def plan_chunks(path: str, chunk_bytes: int) -> list[Chunk]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return [Chunk(path, g, g + 1, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        for pos in range(chunk_bytes, size, chunk_bytes):
            b = _line_boundary(f, pos, separator_only=path.endswith(".txt"))
            if bounds[-1] < b < size:
                bounds.append(b)
    bounds.append(size)
    return [Chunk(path, a, b, b - a) for a, b in zip(bounds, bounds[1:]) if b > a] or [Chunk(path, 0, 0, 0)]


@dataclass
class Counts:
    documents: int = 0
    empty: int = 0  # documents with no text (skipped)
    invalid_utf8: int = 0  # documents that held bytes which are not UTF-8


def _decode(raw: bytes, policy: str, counts: Counts, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        counts.invalid_utf8 += 1
        if policy != "replace":
            raise _not_utf8(where, f"byte 0x{raw[err.start]:02x} at offset {err.start} of the document") from None
        return raw.decode("utf-8", errors="replace")


def _not_utf8(where: str, detail: str) -> ConfigError:
    return ConfigError(f"Invalid input {where}: it is not UTF-8 ({detail}). Valid: UTF-8 text; "
                       "pass --invalid-utf8 replace to prepare (data.invalid_utf8=replace in training) to "
                       "replace such bytes with U+FFFD and count them, or fix the file.")


def _unpaired_surrogates(text: str, policy: str, counts: Counts, where: str) -> str:
    """JSON may escape a lone surrogate (\\ud800), which is no Unicode text either."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        counts.invalid_utf8 += 1
        if policy != "replace":
            raise _not_utf8(where, "an unpaired UTF-16 surrogate escape") from None
        return text.encode("utf-8", errors="replace").decode("utf-8")


def read_chunk(chunk: Chunk, text_key: str, policy: str, counts: Counts) -> Iterator[str]:
    """The non-empty documents of `chunk`, in order; `counts` is updated as they are read."""
    path = chunk.path
    if path.endswith(".parquet"):
        yield from _read_parquet(chunk, text_key, policy, counts)
        return
    with open(path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.stop - chunk.start)
    if path.endswith(".txt"):
        pos = 0
        for sep in [*_TXT_SPLIT.finditer(data), None]:
            end = sep.start() if sep else len(data)
            if sep is None and pos == len(data) and pos:
                break  # what follows a chunk's last separator is the next chunk, not an empty document
            counts.documents += 1
            text = _decode(data[pos:end], policy, counts, f"in {path}, document at byte {chunk.start + pos}")
            pos = sep.end() if sep else len(data)
            if not text:
                counts.empty += 1
                continue
            yield text
        return
    offset = chunk.start
    for line in data.split(b"\n"):
        where = f"in {path}, line at byte {offset}"
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(_decode(line, policy, counts, where))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Invalid input {where}: it is not valid JSON ({exc.msg} at column {exc.colno}). "
                              "Valid: JSON Lines, one object per line.") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
            got = f"an object with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
            raise ConfigError(f"Invalid input {where}: it is {got}, not a JSON object with a string field "
                              f"{text_key!r}. Valid: JSON Lines, one object per line (pass --text-key / "
                              "data.text_key for another field name).")
        counts.documents += 1
        doc = obj[text_key]
        if b"\\ud" in line or b"\\uD" in line:
            doc = _unpaired_surrogates(doc, policy, counts, where)
        if not doc:
            counts.empty += 1
            continue
        yield doc


def _read_parquet(chunk: Chunk, text_key: str, policy: str, counts: Counts) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(chunk.path)
    if text_key not in pf.schema_arrow.names:
        raise ConfigError(f"Invalid input {chunk.path}: it has no column {text_key!r} (columns: "
                          f"{', '.join(pf.schema_arrow.names[:8])}). Valid: a .parquet file with a string column "
                          "of the text (pass --text-key / data.text_key to name it).")
    column = pf.read_row_group(chunk.start, columns=[text_key]).column(0)
    for row, raw in enumerate(column.cast(pa.binary()).to_pylist()):
        counts.documents += 1
        text = _decode(raw or b"", policy, counts, f"in {chunk.path}, row group {chunk.start}, row {row}")
        if not text:
            counts.empty += 1
            continue
        yield text
