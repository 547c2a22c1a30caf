"""Fill-in-Middle in the Prefix-Suffix-Middle layout (arXiv 2412.19437 §4.2).

A document is cut at two random character positions into prefix / middle / suffix and emitted as
``<|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle``; the caller appends ``<|eos|>``.
Cutting at characters (not tokens or bytes) keeps every part valid text; each part is encoded on its
own, so no token spans a cut.
"""

from __future__ import annotations

import random


def split_points(text: str, rng: random.Random) -> tuple[int, int]:
    """Two sorted cut positions in [0, len(text)], drawn uniformly (a part may be empty)."""
    a = rng.randint(0, len(text))
    b = rng.randint(0, len(text))
    return (a, b) if a <= b else (b, a)


def to_psm(text: str, rng: random.Random, tok) -> list[int]:
    """The PSM token sequence of `text` (without the trailing eos)."""
    i, j = split_points(text, rng)
    prefix, middle, suffix = text[:i], text[i:j], text[j:]
    return ([tok.fim_begin_id] + list(tok.encode(prefix))
            + [tok.fim_hole_id] + list(tok.encode(suffix))
            + [tok.fim_end_id] + list(tok.encode(middle)))


def parse_psm(ids: list[int], tok) -> tuple[list[int], list[int], list[int]]:
    """Inverse of the layout: (prefix, middle, suffix) token lists of one PSM document (eos stripped).

    Raises ValueError if the markers are missing or out of order.
    """
    ids = [int(i) for i in ids]
    if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
    if not ids or ids[0] != tok.fim_begin_id:
        raise ValueError("a PSM document starts with <|fim_begin|>")
    hole = ids.index(tok.fim_hole_id)
    end = ids.index(tok.fim_end_id)
    if not 0 < hole < end:
        raise ValueError("PSM markers out of order")
    markers = {tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id}
    if sum(i in markers for i in ids) != 3:
        raise ValueError("a PSM document has exactly one of each marker")
    return ids[1:hole], ids[end + 1:], ids[hole + 1:end]
