"""Fill-in-Middle in the Prefix-Suffix-Middle layout (arXiv 2412.19437 §4.1, Data Construction).

At sample time a document's tokens are cut at two positions into prefix / middle / suffix and laid out as
``fim_prefix prefix fim_suffix suffix fim_middle middle`` (then the eos every document ends with). With the
DeepSeek-V3 tokenizer's names: ``<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle``.
Cuts fall between tokens, so a FIM document is the same tokens as the plain one, moved, plus three markers.
"""

from __future__ import annotations

import numpy as np

# A document laid out for packing: segments (lo, hi, token); token >= 0 is one control token, otherwise
# the segment is the document's own tokens [lo, hi).
Segment = tuple[int, int, int]


def layout(length: int, fim: bool, a: int, b: int, tok) -> list[Segment]:
    """The segments of a document of `length` tokens; with `fim`, cut at a <= b (prefix [0, a),
    middle [a, b), suffix [b, length)). Every document ends with eos."""
    if not fim:
        return [(0, length, -1), (0, 0, tok.eos_id)]
    return [(0, 0, tok.fim_prefix_id), (0, a, -1), (0, 0, tok.fim_suffix_id), (b, length, -1),
            (0, 0, tok.fim_middle_id), (a, b, -1), (0, 0, tok.eos_id)]


def to_psm(tokens, a: int, b: int, tok) -> np.ndarray:
    """The PSM layout of `tokens` cut at a <= b, without the trailing eos (a direct reference for tests)."""
    t = np.asarray(tokens, dtype=np.int64)
    return np.concatenate([[tok.fim_prefix_id], t[:a], [tok.fim_suffix_id], t[b:], [tok.fim_middle_id], t[a:b]])


def parse_psm(ids, tok) -> tuple[list[int], list[int], list[int]]:
    """Inverse of the layout: (prefix, middle, suffix) token lists of one PSM document (eos stripped).

    Raises ValueError if the markers are missing or out of order.
    """
    ids = [int(i) for i in ids]
    if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
    if not ids or ids[0] != tok.fim_prefix_id:
        raise ValueError("a PSM document starts with the fim_prefix token")
    markers = (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id)
    if sum(i in markers for i in ids) != 3:
        raise ValueError("a PSM document has exactly one of each marker")
    hole = ids.index(tok.fim_suffix_id)
    end = ids.index(tok.fim_middle_id)
    if not 0 < hole < end:
        raise ValueError("PSM markers out of order")
    return ids[1:hole], ids[end + 1:], ids[hole + 1:end]
