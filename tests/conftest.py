"""Shared fixtures: small model configs and a tiny text corpus, so tests run in seconds on 2 cores."""

import json
import random

import pytest
import torch

torch.set_num_threads(2)


def write_corpus(directory) -> dict[str, str]:
    """A small word-salad corpus (train + val JSONL) that a tiny model learns quickly."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven merry ships sail past green hills".split()
    paths = {}
    for split, docs in [("train", 600), ("val", 30)]:
        path = directory / f"{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(docs):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
                f.write(json.dumps({"text": text}) + "\n")
        paths[split] = str(path)
    return paths


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)
